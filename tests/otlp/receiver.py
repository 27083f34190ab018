#!/usr/bin/env python3
"""A test stand-in for an OpenTelemetry Collector's OTLP/HTTP trace receiver.

No Collector can be installed from the package registries this project uses, so the end-to-end
tests send their spans here: `POST /v1/traces` with a protobuf `ExportTraceServiceRequest`
(optionally gzip-encoded), decoded with the official definitions from the PyPI package
`opentelemetry-proto`, and printed to stdout as one JSON line per span. The first stdout line is
`LISTENING <port>`. A body that does not decode is answered 400 and printed as `{"error": ...}`;
with `--fail-status N` every request is answered N (an unavailable collector) and printed as
`{"refused": ...}`.

    receiver.py --port 0              # serve; the port chosen is on the first line
    receiver.py --self-test           # prove the decoding on a request built here; exit 0 if it holds

`scripts/test.sh` installs the package (scripts/lib/services.sh, `ensure_otlp_proto`) and exports
MALL_TEST_OTLP_PYTHON, the interpreter that has it; `tests/tests/common/otlp.rs` starts this script
with it.
"""

import argparse
import gzip
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

TRACES_PATH = "/v1/traces"
# A collector refuses bodies this large (the Collector's default is 20 MiB); more is a bug.
MAX_BODY = 20 * 1024 * 1024


def any_value(value):
    """An OTLP AnyValue as plain JSON: arrays as lists, key-value lists as objects, bytes as hex."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def attributes(key_values):
    return {kv.key: any_value(kv.value) for kv in key_values}


def span_lines(request, headers):
    """One flat dict per span of an ExportTraceServiceRequest."""
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield {
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(),
                    "trace_state": span.trace_state,
                    "name": span.name,
                    "kind": span.kind,
                    "start_time_unix_nano": span.start_time_unix_nano,
                    "end_time_unix_nano": span.end_time_unix_nano,
                    "attributes": attributes(span.attributes),
                    "events": [
                        {
                            "name": event.name,
                            "time_unix_nano": event.time_unix_nano,
                            "attributes": attributes(event.attributes),
                        }
                        for event in span.events
                    ],
                    "links": [
                        {
                            "trace_id": link.trace_id.hex(),
                            "span_id": link.span_id.hex(),
                            "attributes": attributes(link.attributes),
                        }
                        for link in span.links
                    ],
                    "status": {"code": span.status.code, "message": span.status.message},
                    "resource": resource,
                    "scope": {"name": scope_spans.scope.name, "version": scope_spans.scope.version},
                    "headers": headers,
                }


class Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, emit, fail_status=None):
        super().__init__(address, Handler)
        self.emit = emit
        self.fail_status = fail_status


class Handler(BaseHTTPRequestHandler):
    # Exporters keep their connection open between batches.
    protocol_version = "HTTP/1.1"
    server: Receiver

    def log_message(self, format, *args):
        # stdout carries the spans; access logs would only get in the way.
        pass

    def headers_seen(self):
        seen = {}
        for name, value in self.headers.items():
            name = name.lower()
            seen[name] = f"{seen[name]}, {value}" if name in seen else value
        return seen

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
                if len(body) > MAX_BODY:
                    raise ValueError(f"body over {MAX_BODY} bytes")
        length = int(self.headers.get("Content-Length", "0"))
        if length > MAX_BODY:
            raise ValueError(f"body of {length} bytes, over {MAX_BODY}")
        return self.rfile.read(length)

    def answer(self, status, body=b"", content_type="application/x-protobuf"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def refuse(self, status, error, headers):
        self.server.emit({"error": error, "status": status, "path": self.path, "headers": headers})
        self.answer(status, error.encode(), "text/plain; charset=utf-8")

    def do_POST(self):
        headers = self.headers_seen()
        try:
            body = self.read_body()
        except ValueError as e:
            self.close_connection = True
            return self.refuse(400, f"unreadable body: {e}", headers)
        if getattr(self.server, "discard", False):
            # A sink for benchmarks: the exporter's cost is measured, not the decoding's.
            return self.answer(200, b"", "application/x-protobuf")
        if self.server.fail_status is not None:
            self.server.emit({"refused": {"status": self.server.fail_status, "path": self.path, "headers": headers}})
            return self.answer(self.server.fail_status, b"", "text/plain; charset=utf-8")
        if self.path.split("?")[0] != TRACES_PATH:
            return self.refuse(404, f"no receiver at {self.path} (only POST {TRACES_PATH})", headers)
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/x-protobuf":
            return self.refuse(415, f"Content-Type {content_type or '(none)'}: only application/x-protobuf is decoded", headers)
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding == "gzip":
            try:
                body = gzip.decompress(body)
            except (OSError, EOFError) as e:
                return self.refuse(400, f"Content-Encoding gzip, but the body is not gzip: {e}", headers)
        elif encoding != "identity":
            return self.refuse(415, f"Content-Encoding {encoding}: only gzip and identity are decoded", headers)
        request = ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except DecodeError as e:
            return self.refuse(400, f"not an ExportTraceServiceRequest: {e}", headers)
        for line in span_lines(request, headers):
            self.server.emit(line)
        self.answer(200, ExportTraceServiceResponse().SerializeToString())

    def do_GET(self):
        self.refuse(405, f"only POST {TRACES_PATH}", self.headers_seen())

    do_PUT = do_GET


def stdout_emitter():
    lock = threading.Lock()

    def emit(line):
        text = json.dumps(line, sort_keys=True)
        with lock:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    return emit


def self_test():
    """Builds a request with the same pb2 classes, posts it to a receiver in this process (plain
    and gzip-encoded), and checks every field of the printed lines; then the refusals."""
    import queue
    import urllib.error
    import urllib.request

    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
    from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

    def kv(key, **value):
        return KeyValue(key=key, value=AnyValue(**value))

    trace_id = bytes.fromhex("5b8efff798038103d269b633813fc60c")
    parent = bytes.fromhex("eee19b7ec3c1b174")
    child = bytes.fromhex("eee19b7ec3c1b173")
    linked = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.extend(
        [kv("service.name", string_value="mall-sidecar"), kv("k8s.pod.name", string_value="shop-7d9f-x2")]
    )
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.name = "mall-sidecar"
    scope_spans.scope.version = "0.1.0"
    server_span = scope_spans.spans.add(
        trace_id=trace_id,
        span_id=parent,
        name="GET /api/products/{id}",
        kind=Span.SPAN_KIND_SERVER,
        start_time_unix_nano=1_764_230_400_000_000_000,
        end_time_unix_nano=1_764_230_400_004_000_000,
        status=Status(code=Status.STATUS_CODE_ERROR, message="upstream timed out"),
    )
    server_span.attributes.extend(
        [
            kv("http.request.method", string_value="GET"),
            kv("http.response.status_code", int_value=504),
            kv("mall.cache_hit", bool_value=False),
            kv("mall.wait_seconds", double_value=0.25),
            kv("mall.tags", array_value=ArrayValue(values=[AnyValue(string_value="a"), AnyValue(int_value=2)])),
        ]
    )
    event = server_span.events.add(name="exception", time_unix_nano=1_764_230_400_003_000_000)
    event.attributes.append(kv("exception.message", string_value="timed out"))
    link = server_span.links.add(trace_id=linked, span_id=child)
    link.attributes.append(kv("mall.link", string_value="retry"))
    scope_spans.spans.add(
        trace_id=trace_id,
        span_id=child,
        parent_span_id=parent,
        name="upstream",
        kind=Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=1_764_230_400_001_000_000,
        end_time_unix_nano=1_764_230_400_003_500_000,
    )
    body = request.SerializeToString()

    lines = queue.Queue()
    servers = []

    def serve(fail_status=None):
        receiver = Receiver(("127.0.0.1", 0), lines.put, fail_status)
        threading.Thread(target=receiver.serve_forever, daemon=True).start()
        servers.append(receiver)
        return f"http://127.0.0.1:{receiver.server_address[1]}"

    def post(url, data, headers):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers, method="POST"), timeout=5) as r:
                return r.status, r.headers.get("Content-Type"), r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type"), e.read()

    def take():
        return lines.get(timeout=5)

    failures = []

    def check(what, got, want):
        if got != want:
            failures.append(f"{what}: got {got!r}, want {want!r}")

    base = serve()
    protobuf = {"Content-Type": "application/x-protobuf", "Authorization": "Bearer test-token"}
    for encoding, data in [("identity", body), ("gzip", gzip.compress(body))]:
        status, content_type, answer = post(base + TRACES_PATH, data, {**protobuf, "Content-Encoding": encoding})
        check(f"{encoding}: status", status, 200)
        check(f"{encoding}: answer's Content-Type", content_type, "application/x-protobuf")
        check(f"{encoding}: answer", ExportTraceServiceResponse.FromString(answer), ExportTraceServiceResponse())
        first, second = take(), take()
        check(f"{encoding}: trace_id", first["trace_id"], "5b8efff798038103d269b633813fc60c")
        check(f"{encoding}: span_id", first["span_id"], "eee19b7ec3c1b174")
        check(f"{encoding}: root has no parent", first["parent_span_id"], "")
        check(f"{encoding}: name", first["name"], "GET /api/products/{id}")
        check(f"{encoding}: kind", first["kind"], 2)
        check(f"{encoding}: start", first["start_time_unix_nano"], 1_764_230_400_000_000_000)
        check(f"{encoding}: end", first["end_time_unix_nano"], 1_764_230_400_004_000_000)
        check(
            f"{encoding}: attributes",
            first["attributes"],
            {
                "http.request.method": "GET",
                "http.response.status_code": 504,
                "mall.cache_hit": False,
                "mall.wait_seconds": 0.25,
                "mall.tags": ["a", 2],
            },
        )
        check(
            f"{encoding}: events",
            first["events"],
            [{"name": "exception", "time_unix_nano": 1_764_230_400_003_000_000, "attributes": {"exception.message": "timed out"}}],
        )
        check(
            f"{encoding}: links",
            first["links"],
            [{"trace_id": linked.hex(), "span_id": child.hex(), "attributes": {"mall.link": "retry"}}],
        )
        check(f"{encoding}: status", first["status"], {"code": 2, "message": "upstream timed out"})
        check(f"{encoding}: resource", first["resource"], {"service.name": "mall-sidecar", "k8s.pod.name": "shop-7d9f-x2"})
        check(f"{encoding}: scope", first["scope"], {"name": "mall-sidecar", "version": "0.1.0"})
        check(f"{encoding}: authorization header", first["headers"].get("authorization"), "Bearer test-token")
        check(f"{encoding}: child's parent", second["parent_span_id"], "eee19b7ec3c1b174")
        check(f"{encoding}: child's trace", second["trace_id"], first["trace_id"])
        check(f"{encoding}: child's kind", second["kind"], 3)
        check(f"{encoding}: child's status", second["status"], {"code": 0, "message": ""})
        # What a real exporter's line looks like, once.
        if encoding == "identity":
            print(json.dumps(first, sort_keys=True), file=sys.stderr)

    # The printed line is JSON: what the Rust helper parses.
    check("a line survives JSON", json.loads(json.dumps(first)), first)

    for what, data, headers, want in [
        ("not protobuf", b"\xff\xff\xff\xff", protobuf, 400),
        ("not gzip", b"plain", {**protobuf, "Content-Encoding": "gzip"}, 400),
        ("JSON encoding", b"{}", {"Content-Type": "application/json"}, 415),
    ]:
        status, _, _ = post(base + TRACES_PATH, data, headers)
        check(f"{what}: status", status, want)
        line = take()
        check(f"{what}: printed as an error", "error" in line and line["status"] == want, True)
    status, _, _ = post(base + "/v1/metrics", body, protobuf)
    check("another path", status, 404)
    check("another path: printed", take()["status"], 404)

    failing = serve(fail_status=503)
    status, _, _ = post(failing + TRACES_PATH, body, protobuf)
    check("--fail-status 503", status, 503)
    refused = take().get("refused", {})
    check("--fail-status: printed", (refused.get("status"), refused.get("path")), (503, TRACES_PATH))
    check("--fail-status: headers", refused.get("headers", {}).get("authorization"), "Bearer test-token")
    check("nothing else printed", lines.empty(), True)

    for receiver in servers:
        receiver.shutdown()
    if failures:
        print("SELF-TEST FAILED\n  " + "\n  ".join(failures))
        return 1
    print("SELF-TEST OK: 2 spans decoded (plain and gzip), 4 refusals, --fail-status answered")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one")
    parser.add_argument("--fail-status", type=int, metavar="N", help="answer every request with status N")
    parser.add_argument("--self-test", action="store_true", help="check the decoding and exit")
    parser.add_argument("--discard", action="store_true", help="answer 200 to every export without decoding it (a benchmark sink)")
    args = parser.parse_args()
    if args.self_test:
        sys.exit(self_test())
    receiver = Receiver((args.host, args.port), stdout_emitter(), args.fail_status)
    receiver.discard = args.discard
    sys.stdout.write(f"LISTENING {receiver.server_address[1]}\n")
    sys.stdout.flush()
    try:
        receiver.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
