//! TC3-HMAC-SHA256 signature checks and the clock-skew window.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use envelope_core::__private::tc3 as sign;

use crate::api::{ApiError, api_error, header};
use crate::{MAX_CLOCK_SKEW_SECS, Shared, lock};

pub(crate) fn now_secs() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
    )
    .unwrap_or(i64::MAX)
}

/// Verify the TC3 signature the way the real service does.
pub(crate) fn authenticate(
    shared: &Shared,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), ApiError> {
    let config = &shared.config;
    let authorization = header(headers, "authorization").ok_or_else(|| {
        api_error(
            "AuthFailure.InvalidAuthorization",
            "Authorization header is missing",
        )
    })?;
    let parsed = sign::parse_authorization(authorization).ok_or_else(|| {
        api_error(
            "AuthFailure.InvalidAuthorization",
            "Authorization is not `TC3-HMAC-SHA256 Credential=.../tc3_request, SignedHeaders=..., Signature=...`",
        )
    })?;
    let signed: Vec<String> = parsed.signed_headers.clone();
    if !signed.iter().any(|h| h == "content-type") || !signed.iter().any(|h| h == "host") {
        return Err(api_error(
            "AuthFailure.InvalidAuthorization",
            "SignedHeaders must include content-type and host",
        ));
    }
    let timestamp: i64 = header(headers, "x-tc-timestamp")
        .ok_or_else(|| api_error("MissingParameter", "X-TC-Timestamp is missing"))?
        .parse()
        .map_err(|_| api_error("InvalidParameter", "X-TC-Timestamp is not a number"))?;
    if (now_secs() - timestamp).abs() > MAX_CLOCK_SKEW_SECS {
        return Err(api_error(
            "AuthFailure.SignatureExpire",
            "the request timestamp is more than 5 minutes from the server's clock",
        ));
    }
    // The static credentials, or a set of temporary ones from the metadata path.
    let (secret_key, token, expires) = if parsed.secret_id == config.secret_id {
        (
            config.secret_key.clone(),
            config.session_token.clone(),
            None,
        )
    } else {
        let temp = lock(&shared.temp);
        let Some(c) = temp.get(&parsed.secret_id) else {
            return Err(api_error(
                "AuthFailure.SecretIdNotFound",
                "the SecretId does not exist",
            ));
        };
        (c.secret_key.clone(), Some(c.token.clone()), Some(c.expires))
    };
    let mismatch = || {
        api_error(
            "AuthFailure.SignatureFailure",
            "The provided credentials could not be validated. Please check your signature is correct.",
        )
    };
    if parsed.service != "kms" || parsed.date != sign::utc_date(timestamp) {
        return Err(mismatch());
    }
    let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(signed.len());
    for name in &signed {
        let value = header(headers, name).ok_or_else(mismatch)?;
        pairs.push((name.as_str(), value));
    }
    let input = sign::CanonicalInput {
        method: "POST",
        uri: "/",
        query: "",
        headers: &pairs,
        payload: body,
    };
    let expected = sign::signature(secret_key.expose().as_bytes(), timestamp, "kms", &input);
    if !sign::signatures_equal(&expected, &parsed.signature) {
        return Err(mismatch());
    }
    if let Some(token) = &token
        && !secrets_equal(header(headers, "x-tc-token").unwrap_or(""), token.expose())
    {
        return Err(api_error(
            "AuthFailure.TokenFailure",
            "the X-TC-Token is not valid",
        ));
    }
    if let Some(expires) = expires
        && now_secs() >= expires
    {
        return Err(api_error(
            "AuthFailure.TokenFailure",
            "the temporary credentials have expired",
        ));
    }
    Ok(())
}

/// Compare a secret a client sent with the expected one in constant time (the length is not
/// hidden).
pub(crate) fn secrets_equal(sent: &str, expected: &str) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(sent.as_bytes(), expected.as_bytes()).is_ok()
}
