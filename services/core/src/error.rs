//! The one error type of the HTTP APIs: a status, a stable code and a message,
//! sent as `{"error": {"code": "...", "message": "..."}}`.
//!
//! Unexpected failures keep their cause for the logs and show clients only
//! an opaque message.

use actix_web::{HttpResponse, ResponseError, http::StatusCode};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
    source: Option<anyhow::Error>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            source: None,
        }
    }

    /// 400 with a specific code, for input that breaks the contract.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than the maximum of {limit} bytes"),
        )
    }

    /// 503: a dependency (the store) is down; nothing was accepted, retry later.
    pub fn unavailable(
        code: &'static str,
        message: impl Into<String>,
        source: anyhow::Error,
    ) -> Self {
        ApiError {
            retry_after: Some(1),
            source: Some(source),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }

    /// 500 with an opaque message; the cause goes to the logs only.
    pub fn internal(source: anyhow::Error) -> Self {
        ApiError {
            source: Some(source),
            ..Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
        }
    }

    pub fn code(&self) -> &'static str {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.status.as_u16(),
            self.code,
            self.message
        )?;
        if let Some(source) = &self.source {
            write!(f, ": {source:#}")?;
        }
        Ok(())
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        if let Some(source) = &self.source {
            tracing::warn!(code = self.code, error.cause_chain = ?source, "request failed");
        }
        let mut response = HttpResponse::build(self.status);
        if let Some(secs) = self.retry_after {
            response.insert_header(("Retry-After", secs.to_string()));
        }
        response.json(json!({"error": {"code": self.code, "message": self.message}}))
    }
}

impl From<crate::event::TopicError> for ApiError {
    fn from(e: crate::event::TopicError) -> Self {
        ApiError::bad_request("invalid_topic", e.to_string())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Unavailable(_) => ApiError::unavailable(
                "store_unavailable",
                "the event log is unavailable; retry later",
                e.into(),
            ),
            crate::store::StoreError::Corrupt(_) => ApiError::internal(e.into()),
        }
    }
}

impl From<crate::hub::HubError> for ApiError {
    fn from(e: crate::hub::HubError) -> Self {
        match e {
            crate::hub::HubError::Store(e) => e.into(),
            e => ApiError::unavailable(
                "feed_unavailable",
                "the live feed is unavailable; retry later",
                e.into(),
            ),
        }
    }
}
