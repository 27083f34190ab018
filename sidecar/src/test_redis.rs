//! Test support: the real Redis the tests run against, and a delay line in front of it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The test Redis as `host:port`: `MALL_TEST_REDIS_URL` or the local one. Under `CI=true` a
/// Redis that does not answer fails the test; elsewhere the test is skipped, saying so.
pub async fn test_redis() -> Option<String> {
    let url = std::env::var("MALL_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let target = url.trim_start_matches("redis://").trim_end_matches('/').to_string();
    if tokio::net::TcpStream::connect(&target).await.is_ok() {
        return Some(target);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("Redis is not reachable at {url}; run scripts/test.sh, which installs and starts it");
    }
    eprintln!("SKIPPED: Redis not reachable at {url} (scripts/test.sh starts it)");
    None
}

/// A TCP proxy to `target` that delays what a client sends by the milliseconds its handle
/// holds (0: passes at once): Redis as slow as a busy network makes it, commands in order.
pub async fn slow_proxy(target: String) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicU64>) {
    let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = proxy.local_addr().unwrap();
    let delay = delay_ms.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((client, _)) = proxy.accept().await {
            let server = tokio::net::TcpStream::connect(&target).await.unwrap();
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            let delay = delay.clone();
            // A delay line: each read is sent on at its own deadline, in order, so requests
            // sent side by side arrive side by side, each late by the delay.
            let (line, mut due) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = client_read.read(&mut buf).await {
                    let at = tokio::time::Instant::now() + Duration::from_millis(delay.load(Ordering::Relaxed));
                    if line.send((at, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                while let Some((at, bytes)) = due.recv().await {
                    tokio::time::sleep_until(at).await;
                    if server_write.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            });
        }
    });
    (addr, delay_ms)
}
