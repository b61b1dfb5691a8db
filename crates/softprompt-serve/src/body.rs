//! Bodies of the JSON endpoints, checked before anything is parsed: the media type (415), the
//! size (413: declared `Content-Length` first, then the bytes as they arrive) and the time
//! the client takes to send it (408).
//!
//! Requiring `Content-Type: application/json` keeps browsers' cross-site form and text posts
//! (which need no CORS preflight) away from the API. Uploads (`PUT`) may be as large as
//! `--max-body-bytes`; generate/classify bodies only as large as the largest valid request
//! ([`crate::limits::InputLimits::body_bytes`]) when that is smaller.

use crate::error::ApiError;
use crate::http::AppState;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use std::sync::Arc;

/// A JSON request body, read whole within the limits.
pub struct JsonBody(pub Bytes);

/// An error after which the connection is closed: the rest of the body was never read.
fn closing(e: ApiError) -> Response {
    let mut resp = e.into_response();
    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// 415 unless the `Content-Type` is `application/json` (parameters such as `charset` allowed).
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("(not text)"));
    let essence = given.and_then(|v| v.split(';').next()).map(str::trim);
    if essence.is_some_and(|e| e.eq_ignore_ascii_case("application/json")) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        format!("the body must be JSON sent with `Content-Type: application/json` (got {})", given.unwrap_or("none")),
    ))
}

fn too_large(limit: usize, flag: &str) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body is larger than the server's limit of {limit} bytes ({flag})"),
    )
}

impl FromRequest<Arc<AppState>> for JsonBody {
    type Rejection = Response;

    async fn from_request(req: Request, s: &Arc<AppState>) -> Result<Self, Response> {
        require_json(req.headers()).map_err(closing)?;
        let inference = s.cfg.input.body_bytes();
        let (limit, flag) = if req.method() == Method::PUT || s.cfg.max_body_bytes <= inference {
            (s.cfg.max_body_bytes, "--max-body-bytes")
        } else {
            (inference, "--max-input-chars")
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(closing(too_large(limit, flag)));
        }
        let deadline = s.cfg.connections.body_timeout;
        let read = Limited::new(req.into_body(), limit).collect();
        match tokio::time::timeout(deadline, read).await {
            Ok(Ok(collected)) => Ok(JsonBody(collected.to_bytes())),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(closing(too_large(limit, flag))),
            Ok(Err(e)) => Err(closing(ApiError::bad_request(format!("cannot read the request body: {e}")))),
            Err(_) => Err(closing(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body did not arrive within {} ms (--body-timeout-ms)", deadline.as_millis()),
            ))),
        }
    }
}
