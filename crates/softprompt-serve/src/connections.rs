//! Serving connections: a cap on open connections, a deadline for request heads, graceful
//! shutdown.
//!
//! `axum::serve` has neither a connection cap nor read timeouts (hyper's header timeout needs
//! a timer, which it does not set), so connections are served here with hyper-util and
//! hyper's HTTP/1 builder, as `axum::serve` does, plus:
//! - at most `max_connections` open connections. One more is answered `503` right away and
//!   closed (its request read and dropped first, so that the client reads the answer instead
//!   of a reset): a client learns it was refused instead of waiting in the listen backlog;
//! - hyper's `header_read_timeout`: a connection that has not delivered a whole request head
//!   within `header_timeout` (a slow or silent client, or an idle keep-alive connection) is
//!   closed, so slow clients cannot hold the connection slots;
//! - the body's read deadline, `body_timeout`, is applied where bodies are read (`body`).

use crate::metrics::Metrics;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Connection limits (the `--max-connections`, `--header-timeout-ms` and
/// `--body-timeout-ms` flags).
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Most connections open at once; keep it above `--queue` + `--max-batch` so that a full
    /// queue, not the connection cap, is what refuses work under load.
    pub max_connections: usize,
    /// Time a client has to send a whole request head (closed after).
    pub header_timeout: Duration,
    /// Time a client has to send a whole request body (408 after).
    pub body_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// Refusals being written at once; beyond it a refused connection is closed without an answer
/// (each refusal holds its socket for up to a second while the request is read).
const MAX_REFUSALS: usize = 64;

/// Serves `router` on `listener` until `stop` completes, then stops accepting, lets the
/// connections finish their requests in flight and returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.connection_refused();
            if let Ok(permit) = refusals.clone().try_acquire_owned() {
                let max = limits.max_connections;
                tokio::spawn(async move {
                    refuse(stream, max).await;
                    drop(permit);
                });
            }
            continue;
        };
        metrics.connection(true);
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router.clone())));
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection: {e}");
            }
            metrics.connection(false);
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Answers 503 on a connection over the cap, then closes it.
async fn refuse(mut stream: TcpStream, max: usize) {
    let body = format!("{{\"error\":\"the server has {max} connections open (--max-connections); retry later\"}}");
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sends (its request) until it closes, at most 64 KiB: closing
        // with unread data would reset the connection and the client might lose the answer.
        let mut sink = [0u8; 4096];
        let mut total = 0;
        while total < 64 << 10 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => total += n,
            }
        }
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), exchange).await;
}
