//! The vocabulary of the API 3.0 envelope every module speaks: the error an action answers
//! with, and reading a request's headers and parameters.

use axum::http::HeaderMap;
use envelope_core::EncryptionContext;
use serde_json::Value;

/// An API error: HTTP 200 with `Response.Error`, as the real service answers.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

pub(crate) fn api_error(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        code,
        message: message.into(),
    }
}

/// 16 bytes in the 8-4-4-4-12 hex form of a UUID.
pub(crate) fn uuid_text(b: [u8; 16]) -> String {
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

pub(crate) fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub(crate) fn str_param<'a>(params: &'a Value, name: &str) -> Result<&'a str, ApiError> {
    match params.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) | None => Err(api_error(
            "MissingParameter",
            format!("the parameter {name} is missing"),
        )),
        Some(_) => Err(api_error(
            "InvalidParameter",
            format!("the parameter {name} must be a string"),
        )),
    }
}

pub(crate) fn opt_str<'a>(params: &'a Value, name: &str) -> Result<Option<&'a str>, ApiError> {
    match params.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(api_error(
            "InvalidParameter",
            format!("the parameter {name} must be a string"),
        )),
    }
}

pub(crate) fn int_param(params: &Value, name: &str) -> Result<Option<i64>, ApiError> {
    match params.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or_else(|| {
            api_error(
                "InvalidParameter",
                format!("the parameter {name} must be an integer"),
            )
        }),
    }
}

/// The context as the bytes the blob is bound to: parsed, sorted and compact, so that equal
/// maps match whatever their spacing or order.
pub(crate) fn context_bytes(params: &Value, name: &str) -> Result<String, ApiError> {
    match opt_str(params, name)? {
        None | Some("") => Ok(String::new()),
        Some(text) => {
            if text.len() > 1024 {
                return Err(api_error(
                    "InvalidParameterValue",
                    format!("{name} is longer than 1024 characters"),
                ));
            }
            EncryptionContext::from_json(text)
                .map(|c| c.canonical_json())
                .map_err(|_| {
                    api_error(
                        "InvalidParameterValue",
                        format!("{name} must be a JSON object of string values"),
                    )
                })
        }
    }
}
