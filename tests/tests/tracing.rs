//! Issue 35: one trace per request, across the sidecar, the app and the database, exported as
//! OTLP/HTTP protobuf and decoded by a receiver built on the official definitions
//! (`tests/otlp/receiver.py`). The sidecar and the app run in this process, configured by the
//! standard OpenTelemetry variables, as `scripts/run.sh` and the operator's pods configure them.
//!
//! One test (one process): the app's exporter is process-wide and reads the variables once.

mod common;

use std::time::{Duration, Instant};

use common::otlp::OtlpReceiver;
use common::{free_addr, fresh_database, metric_sum, metric_sum_where, redis, until_ok};
use mall_app::testing::{RunningApp, PASSWORD};
use mall_sidecar_config::{SidecarConfig, UpstreamServer};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

fn sidecar(upstream: &str) -> (std::net::SocketAddr, std::net::SocketAddr) {
    let (listen, admin) = (free_addr(), free_addr());
    let mut config = SidecarConfig::default();
    config.server.listen = listen;
    config.server.admin_listen = admin;
    config.server.threads = 1;
    config.upstream.servers = vec![UpstreamServer {
        address: upstream.to_string(),
        weight: 1,
    }];
    config.upstream.retries = 0;
    std::thread::spawn(move || mall_sidecar::run(config, None));
    (listen, admin)
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

fn service(span: &Value) -> &str {
    span["resource"]["service.name"].as_str().unwrap_or("")
}

/// The sidecar's server span of the request answered with `request_id`.
fn server_span(spans: &[Value], request_id: &str) -> Option<Value> {
    spans
        .iter()
        .find(|s| service(s) == "mall-sidecar" && attr(s, "mall.request_id") == request_id)
        .cloned()
}

fn in_trace(spans: &[Value], trace_id: &str) -> Vec<Value> {
    spans.iter().filter(|s| s["trace_id"] == trace_id).cloned().collect()
}

fn child_of<'a>(spans: &'a [Value], parent: &Value, pred: impl Fn(&Value) -> bool) -> Option<&'a Value> {
    spans
        .iter()
        .find(|s| s["parent_span_id"] == parent["span_id"] && pred(s))
}

/// Spans below `root` (any depth).
fn below<'a>(spans: &'a [Value], root: &Value) -> Vec<&'a Value> {
    let mut out: Vec<&Value> = Vec::new();
    let mut frontier = vec![root["span_id"].clone()];
    while let Some(id) = frontier.pop() {
        for s in spans.iter().filter(|s| s["parent_span_id"] == id) {
            frontier.push(s["span_id"].clone());
            out.push(s);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_follows_a_request_through_the_sidecar_the_app_and_the_database() {
    let Some(receiver) = OtlpReceiver::start() else {
        return;
    };
    let Some(url) = fresh_database("MALL_TEST_POSTGRES_URL", "postgres://mall:mall@127.0.0.1:5432/test").await else {
        return;
    };
    let redis_port = free_addr().port();
    let Some(_redis) = redis(redis_port) else {
        return;
    };
    // Before anything reads them: every request recorded, the collector flushed to each second.
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint);
    std::env::set_var("OTEL_TRACES_SAMPLER", "parentbased_always_on");
    std::env::set_var("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test");

    let dir = tempfile::tempdir().unwrap();
    let flags = [
        format!("--database-url={url}"),
        format!("--redis-url=redis://127.0.0.1:{redis_port}"),
        // Nothing in the cache before the first read: the miss goes to the database.
        "--warmup-products=0".into(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let app = RunningApp::start_in(dir.path(), &flags).await;
    let (front, front_admin) = sidecar(&app.addr.to_string());
    // A sidecar whose only instance takes connections and closes them unanswered: its requests
    // fail upstream.
    let closing = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (broken, _) = sidecar(&closing.local_addr().unwrap().to_string());
    std::thread::spawn(move || {
        for conn in closing.incoming() {
            drop(conn);
        }
    });
    let http = reqwest::Client::new();
    until_ok(
        &http,
        &format!("http://{front}/api/products/2"),
        Instant::now() + WAIT,
        "the sidecar",
    )
    .await;

    // 1. A cache miss: sidecar -> app -> cache (L1 miss, Redis) -> PostgreSQL.
    let r = http.get(format!("http://{front}/api/products/1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let miss_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let spans = receiver.wait_for(
        |spans| {
            server_span(spans, &miss_id).is_some_and(|s| {
                let trace = in_trace(spans, s["trace_id"].as_str().unwrap());
                trace.iter().any(|t| t["name"] == "SELECT products")
                    && trace.iter().any(|t| t["name"] == "GET /api/products/{id}")
            })
        },
        WAIT,
    );
    let server = server_span(&spans, &miss_id).unwrap();
    let trace = in_trace(&spans, server["trace_id"].as_str().unwrap());
    assert_eq!(server["kind"], 2, "{server}");
    assert_eq!(server["name"], "GET /api/products", "{server}");
    assert_eq!(attr(&server, "mall.cache.result"), "MISS");
    assert_eq!(attr(&server, "http.response.status_code"), 200);
    assert_eq!(server["resource"]["deployment.environment.name"], "test");
    let upstream = child_of(&trace, &server, |s| s["kind"] == 3).expect("the sidecar's upstream attempt");
    assert_eq!(attr(upstream, "network.transport"), "tcp");
    assert_eq!(
        attr(upstream, "server.address").as_str(),
        Some(app.addr.to_string().as_str())
    );
    // The app continued the trace under the upstream attempt.
    let app_span = child_of(&trace, upstream, |s| service(s) == "mall-app").expect("the app's span under the attempt");
    assert_eq!(app_span["name"], "GET /api/products/{id}");
    assert_eq!(app_span["kind"], 2);
    assert_eq!(attr(app_span, "http.response.status_code"), 200);
    let cache = child_of(&trace, app_span, |s| s["name"] == "cache").expect("the cache lookup");
    assert_eq!(attr(cache, "cache.l1"), "miss");
    assert_eq!(attr(cache, "cache.l2"), "miss");
    let inside = below(&trace, cache);
    let get = inside.iter().find(|s| s["name"] == "redis GET").expect("the Redis GET");
    assert_eq!(get["kind"], 3);
    let select = inside
        .iter()
        .find(|s| s["name"] == "SELECT products")
        .expect("the statement");
    assert_eq!(attr(select, "db.system.name"), "postgresql");
    assert_eq!(attr(select, "db.collection.name"), "products");
    assert_eq!(attr(select, "db.response.returned_rows"), 1);
    let (start, end) = (&select["start_time_unix_nano"], &select["end_time_unix_nano"]);
    assert!(
        start.as_u64().unwrap() > 0 && end.as_u64() >= start.as_u64(),
        "{select}"
    );
    // Every span of the trace hangs from the sidecar's server span.
    assert_eq!(below(&trace, &server).len(), trace.len() - 1, "{trace:#?}");

    // 2. A hit: the sidecar answers alone, in a trace of its own.
    let r = http.get(format!("http://{front}/api/products/1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let hit_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let spans = receiver.wait_for(|spans| server_span(spans, &hit_id).is_some(), WAIT);
    let hit = server_span(&spans, &hit_id).unwrap();
    assert_eq!(attr(&hit, "mall.cache.result"), "HIT");
    assert_ne!(hit["trace_id"], server["trace_id"]);
    // (Spans of one trace arrive in the same second's batch; give stragglers a moment.)
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(in_trace(&receiver.spans(), hit["trace_id"].as_str().unwrap()).len(), 1);

    // 3. An order, in the caller's own trace (a sampled traceparent): continued, not restarted.
    let token = mall_loadgen::login(&http, &format!("http://{front}"), "user1", PASSWORD)
        .await
        .unwrap();
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let r = http
        .post(format!("http://{front}/api/orders"))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .header("idempotency-key", "traced-order")
        .json(&json!({"items": [{"product_id": 3, "quantity": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let order_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let spans = receiver.wait_for(
        |spans| {
            in_trace(spans, caller_trace)
                .iter()
                .any(|s| s["name"] == "POST /api/orders" && service(s) == "mall-app")
                && server_span(spans, &order_id).is_some()
        },
        WAIT,
    );
    let order = server_span(&spans, &order_id).unwrap();
    assert_eq!(order["trace_id"], caller_trace);
    assert_eq!(order["parent_span_id"], caller_span);
    let trace = in_trace(&spans, caller_trace);
    let app_order = trace
        .iter()
        .find(|s| s["name"] == "POST /api/orders" && service(s) == "mall-app")
        .unwrap();
    assert_eq!(attr(app_order, "http.response.status_code"), 201);
    let statements: Vec<&str> = below(&trace, app_order)
        .iter()
        .filter(|s| s["attributes"]["db.system.name"] == "postgresql")
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(
        statements.iter().any(|s| s.starts_with("INSERT orders")),
        "{statements:?}"
    );

    // 3b. Orders placed together: each request's span links to the batch that placed it, whose
    // own span (a trace of its own) holds the statements and links back to its requests.
    let orders = (0..24).map(|i| {
        let (http, token, url) = (http.clone(), token.clone(), app.url("/api/orders"));
        tokio::spawn(async move {
            let r = http
                .post(url)
                .bearer_auth(&token)
                .header(
                    "traceparent",
                    format!("00-{:032x}-{:016x}-01", 0xabc000 + i, 0xdef000 + i),
                )
                .header("idempotency-key", format!("batched-{i}"))
                .json(&json!({"items": [{"product_id": 4, "quantity": 1}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        })
    });
    for o in orders.collect::<Vec<_>>() {
        o.await.unwrap();
    }
    let spans = receiver.wait_for(
        |spans| {
            spans.iter().any(|s| {
                s["name"] == "order batch"
                    && s["links"].as_array().is_some_and(|l| l.len() > 1)
                    && spans.iter().any(|r| {
                        r["name"] == "POST /api/orders"
                            && r["links"]
                                .as_array()
                                .is_some_and(|l| l.iter().any(|l| l["span_id"] == s["span_id"]))
                    })
            })
        },
        WAIT,
    );
    let batch = spans
        .iter()
        .find(|s| s["name"] == "order batch" && s["links"].as_array().is_some_and(|l| l.len() > 1))
        .unwrap();
    assert_eq!(batch["parent_span_id"], "");
    let batch_trace = in_trace(&spans, batch["trace_id"].as_str().unwrap());
    assert!(
        below(&batch_trace, batch).iter().any(|s| s["name"] == "INSERT orders"),
        "{batch_trace:#?}"
    );
    for link in batch["links"].as_array().unwrap() {
        let member = spans
            .iter()
            .find(|s| s["span_id"] == link["span_id"])
            .expect("each linked request's span");
        assert_eq!(member["name"], "POST /api/orders");
        assert!(member["links"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["span_id"] == batch["span_id"]));
    }

    // 4. A request that failed upstream (the sidecar's health checks took the instance out, so
    // no attempt is made): the server span is an error and says why.
    let r = http
        .get(format!("http://{broken}/api/products/1"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());
    let failed_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let spans = receiver.wait_for(|spans| server_span(spans, &failed_id).is_some(), WAIT);
    let failed = server_span(&spans, &failed_id).unwrap();
    assert_eq!(failed["status"]["code"], 2, "{failed}");
    assert!(
        failed["status"]["message"]
            .as_str()
            .unwrap()
            .contains("no healthy upstream"),
        "{failed}"
    );
    assert_eq!(attr(&failed, "http.response.status_code"), 503);

    // The statements are timed by name, whether or not a request was sampled.
    let selects = metric_sum(&http, &app.url("/metrics"), "db_statement_duration_seconds_count").await;
    assert!(selects > 0.0);
    let named = metric_sum_where(
        &http,
        &app.url("/metrics"),
        "db_statement_duration_seconds_count",
        "statement=\"SELECT products\"",
    )
    .await;
    assert!(named > 0.0, "no SELECT products statement timed");
    assert!(receiver.refusals().is_empty(), "{:?}", receiver.refusals());
    // What became of the spans, in both programs' metrics.
    let exported = |url: String, name: &'static str| {
        let http = http.clone();
        async move { metric_sum_where(&http, &url, name, "outcome=\"exported\"").await }
    };
    assert!(exported(app.url("/metrics"), "trace_spans_total").await > 0.0);
    assert!(exported(format!("http://{front_admin}/metrics"), "sidecar_trace_spans_total").await > 0.0);

    // 5. A collector that is gone changes nothing for users: a sidecar exporting to a dead port
    // and one exporting to a collector that refuses every batch answer every request.
    let dead = free_addr();
    let Some(refusing) = OtlpReceiver::start_failing(503) else {
        return;
    };
    for endpoint in [format!("http://{dead}"), refusing.endpoint.clone()] {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
        let (front, admin) = sidecar(&app.addr.to_string());
        until_ok(
            &http,
            &format!("http://{front}/api/products/2"),
            Instant::now() + WAIT,
            "the sidecar",
        )
        .await;
        for i in 0..200 {
            let r = http
                .get(format!("http://{front}/api/products?page={}", i % 5 + 1))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{endpoint}");
        }
        // The batches were tried, then dropped and counted.
        let deadline = Instant::now() + WAIT;
        loop {
            let failed = metric_sum(&http, &format!("http://{admin}/metrics"), "sidecar_trace_spans_total").await
                - exported(format!("http://{admin}/metrics"), "sidecar_trace_spans_total").await;
            if failed > 0.0 {
                break;
            }
            assert!(Instant::now() < deadline, "no span counted as dropped with {endpoint}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The refusing collector was asked (and said no): the exports were tried, then dropped.
    let deadline = Instant::now() + WAIT;
    while refusing.refusals().is_empty() {
        assert!(Instant::now() < deadline, "the refusing collector was never asked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
