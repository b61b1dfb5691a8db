//! Who may call what: the `Host` allow-list, the bearer token and write access, checked in
//! that order before any handler runs.
//!
//! - `Host`: a server on loopback is reachable from any web page the user opens, through DNS
//!   rebinding (a name of the attacker's that resolves to 127.0.0.1 makes the browser treat
//!   the server as the attacker's site, and send it requests with `Host: attacker.example`).
//!   On loopback only `localhost`, `127.0.0.1` and `[::1]` with the server's port are
//!   accepted, plus `--allowed-host` names (which are also enforced on other addresses).
//!   403 otherwise.
//! - Token (`--token`): every endpoint but `/health` needs `Authorization: Bearer <token>`
//!   (401), and `/health` shows the model only with it. Both sides are hashed (SHA-256) and
//!   the digests compared in full, so the time taken says nothing about the token, its
//!   length included.
//! - Writes (PUT/DELETE: uploading and deleting tasks, which write to disk) are off unless
//!   the server has a token or `--allow-writes` (403 naming both).

use crate::error::ApiError;
use crate::http::AppState;
use crate::ServeConfig;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// The middleware: Host, then token, then write access.
pub async fn guard(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Err(e) = check_host(&s.cfg, req.headers()) {
        return e.into_response();
    }
    if req.uri().path() != "/health" && !authorized(&s.cfg, req.headers()) {
        let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong bearer token").into_response();
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    }
    let writes = req.method() == Method::PUT || req.method() == Method::DELETE;
    if writes && s.cfg.token.is_none() && !s.cfg.allow_writes {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "uploads and deletions are off: start the server with --token (and send it as a bearer token) or with --allow-writes",
        )
        .into_response();
    }
    next.run(req).await
}

/// Whether the request carries the server's token (always, when the server has none).
pub fn authorized(cfg: &ServeConfig, headers: &HeaderMap) -> bool {
    let Some(token) = &cfg.token else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    digests_equal(given.as_bytes(), token.as_bytes())
}

/// Compares the SHA-256 digests of `a` and `b` in full (no early exit, whatever the inputs'
/// lengths).
fn digests_equal(a: &[u8], b: &[u8]) -> bool {
    let (da, db) = (Sha256::digest(a), Sha256::digest(b));
    let diff = da.iter().zip(db.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// 403 unless the `Host` header is allowed (see the module documentation); a missing `Host`
/// is refused where the list applies.
pub fn check_host(cfg: &ServeConfig, headers: &HeaderMap) -> Result<(), ApiError> {
    let loopback = cfg.addr.ip().is_loopback();
    if !loopback && cfg.allowed_hosts.is_empty() {
        return Ok(());
    }
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let port = cfg.addr.port();
    let (name, given_port) = split_host(host);
    let ours = |p: Option<&str>| match p {
        Some(p) => p.parse::<u16>().ok() == Some(port),
        None => port == 80,
    };
    let local = loopback && ["localhost", "127.0.0.1", "[::1]"].iter().any(|n| name.eq_ignore_ascii_case(n)) && ours(given_port);
    let listed = cfg.allowed_hosts.iter().any(|allowed| {
        let (a_name, a_port) = split_host(allowed);
        a_name.eq_ignore_ascii_case(name) && (a_port.is_none() || a_port == given_port)
    });
    if local || listed {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "Host `{}` is not allowed (protection against DNS rebinding); use localhost:{port} or 127.0.0.1:{port}, or start the server with --allowed-host NAME",
            host.chars().take(100).collect::<String>()
        ),
    ))
}

/// `name[:port]` (an IPv6 name in brackets keeps them).
fn split_host(host: &str) -> (&str, Option<&str>) {
    let after_name = if host.starts_with('[') { host.find(']').map_or(host.len(), |i| i + 1) } else { 0 };
    match host[after_name..].rfind(':') {
        Some(i) => (&host[..after_name + i], Some(&host[after_name + i + 1..])),
        None => (host, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(addr: &str, allowed: &[&str]) -> ServeConfig {
        let mut c = ServeConfig::new("/nonexistent");
        c.addr = addr.parse().unwrap();
        c.allowed_hosts = allowed.iter().map(|s| s.to_string()).collect();
        c
    }

    fn host(h: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::HOST, HeaderValue::from_str(h).unwrap());
        m
    }

    #[test]
    fn loopback_names_with_our_port_only() {
        let c = cfg("127.0.0.1:8080", &[]);
        for ok in ["127.0.0.1:8080", "localhost:8080", "LOCALHOST:8080", "[::1]:8080"] {
            assert!(check_host(&c, &host(ok)).is_ok(), "{ok}");
        }
        for bad in ["evil.example:8080", "localhost:8081", "localhost", "127.0.0.1", "127.0.0.1.evil:8080", "[::1]", ""] {
            let e = check_host(&c, &host(bad)).unwrap_err();
            assert_eq!(e.status, StatusCode::FORBIDDEN, "{bad}");
            assert!(e.message.contains("--allowed-host"), "{}", e.message);
        }
        assert!(check_host(&c, &HeaderMap::new()).is_err());
        // Port 80 may be left out of the Host header.
        assert!(check_host(&cfg("[::1]:80", &[]), &host("localhost")).is_ok());
    }

    #[test]
    fn allowed_hosts_add_names() {
        let c = cfg("127.0.0.1:8080", &["api.example", "proxy.example:443"]);
        assert!(check_host(&c, &host("api.example")).is_ok());
        assert!(check_host(&c, &host("api.example:9000")).is_ok());
        assert!(check_host(&c, &host("proxy.example:443")).is_ok());
        assert!(check_host(&c, &host("proxy.example:444")).is_err());
        assert!(check_host(&c, &host("localhost:8080")).is_ok());
        // Off loopback: anything without a list, only the list with one.
        assert!(check_host(&cfg("0.0.0.0:8080", &[]), &host("whatever:1")).is_ok());
        let c = cfg("0.0.0.0:8080", &["api.example"]);
        assert!(check_host(&c, &host("api.example")).is_ok());
        assert!(check_host(&c, &host("localhost:8080")).is_err());
    }

    #[test]
    fn tokens_compare_by_digest() {
        assert!(digests_equal(b"s3cret", b"s3cret"));
        assert!(!digests_equal(b"s3cre", b"s3cret"));
        assert!(!digests_equal(b"", b"s3cret"));
        let mut c = cfg("127.0.0.1:1", &[]);
        assert!(authorized(&c, &HeaderMap::new()));
        c.token = Some("s3cret".into());
        assert!(!authorized(&c, &HeaderMap::new()));
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"));
        assert!(authorized(&c, &h));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer s3cret2"));
        assert!(!authorized(&c, &h));
    }
}
