//! The error every endpoint answers with: an HTTP status and OpenAI's body shape
//! `{"error": {"message", "type", "param", "code"}}` (OpenAI API reference, "Errors"), plus a
//! `Retry-After` for 503 and `WWW-Authenticate: Bearer` for 401. Its own module so that request parsing (`api`) and the queue can both
//! use it without importing each other.

use serde_json::Value;

/// An HTTP error answered as `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// The error `type` (OpenAI's names where one fits).
    pub kind: &'static str,
    /// What is wrong, for a person.
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// OpenAI's machine-readable `code` (`invalid_api_key`, `model_not_found`), if one fits.
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (503 only).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: u16, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, kind, message: message.into(), param: None, code: None, retry_after: None }
    }

    /// 400 about one field.
    pub fn field(param: &str, message: impl Into<String>) -> ApiError {
        ApiError { param: Some(param.to_string()), ..ApiError::new(400, "invalid_request_error", message) }
    }

    /// 400 about the request as a whole.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "invalid_request_error", message)
    }

    /// 401: no API key (`code` null, as OpenAI answers) or a wrong one (`invalid_api_key`).
    pub fn unauthorized(message: impl Into<String>, code: Option<&'static str>) -> ApiError {
        ApiError { code, ..ApiError::new(401, "invalid_request_error", message) }
    }

    /// 404 for a request naming a model this server does not serve (OpenAI's `model_not_found`).
    pub fn model_not_found(asked: &str, served: &str) -> ApiError {
        let message =
            format!("The model `{asked}` does not exist; this server serves `{served}` (--served-model-name)");
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..ApiError::new(404, "invalid_request_error", message)
        }
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(404, "not_found_error", message)
    }

    /// 405.
    pub fn method_not_allowed(message: impl Into<String>) -> ApiError {
        ApiError::new(405, "method_not_allowed", message)
    }

    /// 413.
    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(413, "request_too_large", message)
    }

    /// 503 with `Retry-After: seconds`.
    pub fn busy(message: impl Into<String>, seconds: u64) -> ApiError {
        ApiError { retry_after: Some(seconds), ..ApiError::new(503, "server_overloaded", message) }
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "server_error", message)
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        serde_json::json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}
