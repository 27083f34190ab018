//! The machine's ceiling for the benchmarks: a bare hyper HTTP/1.1 server that answers every
//! request with one fixed JSON body (the size of a product), doing nothing else.
//! `fixed-body [ADDR]` (default 127.0.0.1:8082).

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8082".into());
    let body = Bytes::from(format!(
        "{{\"id\":1,\"name\":\"Product 1\",\"category\":\"electronics\",\"price\":8118,\"stock\":10000,\"status\":\"active\",\"description\":\"{}\"}}",
        "x".repeat(120)
    ));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("fixed-body listening on {addr}");
    loop {
        let (stream, _) = listener.accept().await?;
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
                let body = body.clone();
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(body))
                            .expect("response"),
                    )
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
