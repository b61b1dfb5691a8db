//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, with the
//! status codes the official clients map to their exception classes (400 `BadRequestError`,
//! 401, 403, 404 `NotFoundError`, 413, 429 `RateLimitError`, 5xx).

use crate::error::ApiError;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

#[derive(Debug, Clone)]
pub struct OpenAiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<&'static str>,
    /// A machine-readable reason (`model_not_found`, ...).
    pub code: Option<&'static str>,
}

impl OpenAiError {
    pub fn bad_param(param: &'static str, message: impl Into<String>) -> Self {
        OpenAiError { status: StatusCode::BAD_REQUEST, message: message.into(), param: Some(param), code: None }
    }

    pub fn model_not_found(model: &str) -> Self {
        OpenAiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist: it is neither a served task nor `base` (see GET /v1/models)"),
            param: Some("model"),
            code: Some("model_not_found"),
        }
    }

    /// OpenAI's `type` for a status code.
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The error object (also sent as a server-sent event when a stream fails).
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        OpenAiError { status: e.status, message: e.message, param: None, code: None }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Middleware (outermost, so it sees the access guard's and the body reader's refusals too):
/// on the OpenAI paths, an error rendered natively (`{"error": "..."}`, carrying its
/// [`ApiError`]) is rendered again in OpenAI's shape, headers such as `Connection: close`
/// and `WWW-Authenticate` kept.
pub async fn reshape_errors(req: Request, next: Next) -> Response {
    let openai = super::is_openai_path(req.uri().path());
    let resp = next.run(req).await;
    if !openai {
        return resp;
    }
    let Some(e) = resp.extensions().get::<ApiError>().cloned() else {
        return resp;
    };
    let (mut parts, _) = resp.into_parts();
    let body = OpenAiError::from(e).body().to_string();
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}
