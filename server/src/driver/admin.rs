//! The admin endpoint: `GET /metrics` (Prometheus text, from
//! `crate::metrics`) and `GET /health`, served from one plain thread, one
//! request at a time. Nothing here touches a shard; scrapes are rare.

use crate::metrics::{render, ShardMetrics};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

/// Largest request head read from a scraper.
const REQUEST_BYTES_MAX: usize = 8 * 1024;

/// Serves `/metrics` and `/health` on `address`; returns the bound address.
pub fn serve_admin(address: SocketAddr, shards: Vec<Arc<ShardMetrics>>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(address)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new().name("admin".into()).spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
            // Read until the end of the request head (it may arrive in pieces).
            let mut request = vec![0u8; REQUEST_BYTES_MAX];
            let mut filled = 0;
            while filled < request.len() && !request[..filled].windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut request[filled..]) {
                    Ok(0) | Err(_) => break,
                    Ok(count) => filled += count,
                }
            }
            let head = String::from_utf8_lossy(&request[..filled]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match path {
                "/metrics" => ("200 OK", render(&shards)),
                "/health" => ("200 OK", "ok\n".to_string()),
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes());
        }
    })?;
    Ok(bound)
}
