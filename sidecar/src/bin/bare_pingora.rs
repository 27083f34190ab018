//! `bare-pingora`: pingora's own floor, for `scripts/bench.sh`. A `ProxyHttp` with nothing of the
//! sidecar's: cache hits are answered from a map in `request_filter` (bodies fetched once at start),
//! everything else goes to one keep-alive upstream. The gap between it and the sidecar is the
//! sidecar's own per-request work; the gap between it and nginx is pingora's.
//!
//! bare-pingora LISTEN UPSTREAM THREADS HIT_PATH...
//!   e.g. bare-pingora 127.0.0.1:8183 127.0.0.1:3101 2 /api/products/1

use std::collections::HashMap;
use std::io::{Read, Write};

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::{ProxyHttp, Session};

struct Bare {
    upstream: String,
    hits: HashMap<String, Bytes>,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        let Some(body) = self.hits.get(session.req_header().uri.path()) else {
            return Ok(false);
        };
        let mut header = ResponseHeader::build(200, Some(2))?;
        header.insert_header("content-type", "application/json")?;
        header.insert_header("content-length", body.len())?;
        session.write_response_header(Box::new(header), false).await?;
        session.write_response_body(Some(body.clone()), true).await?;
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream.as_str(), false, String::new())))
    }
}

/// GET `path` from `upstream` over HTTP/1.0 and return the body (a benchmark helper, not a client).
fn fetch(upstream: &str, path: &str) -> Bytes {
    let mut stream = std::net::TcpStream::connect(upstream).unwrap_or_else(|e| panic!("{upstream}: {e}"));
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {upstream}\r\n\r\n").expect("request sent");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("response read");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header ends");
    Bytes::copy_from_slice(&response[split + 4..])
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, threads, paths @ ..] = args.as_slice() else {
        eprintln!("usage: bare-pingora LISTEN UPSTREAM THREADS HIT_PATH...");
        std::process::exit(2);
    };
    let hits: HashMap<String, Bytes> = paths.iter().map(|p| (p.clone(), fetch(upstream, p))).collect();
    let conf = ServerConf {
        work_stealing: false,
        // A benchmark contender: SIGTERM ends it at once.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    // The sidecar's worker layout, so the gap between the two is the sidecar's own work.
    let configuration = server.configuration.clone();
    let listen = listen.parse().expect("LISTEN is an address");
    let workers = threads.parse().expect("THREADS is a number");
    mall_sidecar::add_workers(&mut server, "bare pingora", listen, workers, || {
        pingora_proxy::http_proxy(
            &configuration,
            Bare {
                upstream: upstream.clone(),
                hits: hits.clone(),
            },
        )
    });
    server.run_forever();
}
