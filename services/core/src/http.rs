//! Small request helpers shared by the services' routes.

use actix_web::{HttpResponse, web};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Reads a request body, refusing it with 413 as soon as it passes `limit` bytes.
pub async fn read_body(mut payload: web::Payload, limit: usize) -> Result<web::Bytes, ApiError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::bad_request("bad_body", format!("could not read the request body: {e}"))
        })?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::payload_too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Parses a JSON body, saying where and why it is malformed.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_json",
            "request body is empty; a JSON body is required",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        let code = if e.is_data() {
            "invalid_body"
        } else {
            "invalid_json"
        };
        ApiError::bad_request(code, format!("request body: {e}"))
    })
}

/// The JSON answer for a path no service serves.
pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found("not_found", "no such endpoint"))
}
