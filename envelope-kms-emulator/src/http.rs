//! The HTTP side: the API 3.0 envelope of requests and answers, the metadata path, the server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use envelope_core::SecretString;
use envelope_core::kms::tencent::API_VERSION;
use rand::{Rng as _, RngExt as _};
use serde_json::{Value, json};

use crate::actions::{
    create_key, decrypt, describe_key, encrypt, generate_data_key, generate_random, re_encrypt,
    schedule_deletion, set_state,
};
use crate::api::{ApiError, api_error, header, uuid_text};
use crate::auth::{authenticate, now_secs};
use crate::state::KeyState;
use crate::{Faults, ROLE_PATH, Shared, TempCredentials, lock};

fn request_id() -> String {
    uuid_text(rand::rng().random())
}

fn respond(body: Result<Value, ApiError>) -> Response {
    let rid = request_id();
    let response = match body {
        Ok(mut v) => {
            if let Some(obj) = v.as_object_mut() {
                obj.insert("RequestId".into(), Value::String(rid));
            }
            json!({ "Response": v })
        }
        Err(e) => json!({
            "Response": {"Error": {"Code": e.code, "Message": e.message}, "RequestId": rid}
        }),
    };
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        response.to_string(),
    )
        .into_response()
}

pub(crate) async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // The admin endpoints change faults and count calls without any signature: only a client
    // on the emulator's own machine may use them, whatever address it listens on.
    if uri.path().starts_with("/_emulator/") && !peer.ip().to_canonical().is_loopback() {
        return (
            StatusCode::FORBIDDEN,
            "the /_emulator/ endpoints answer loopback clients only\n",
        )
            .into_response();
    }
    match (method.as_str(), uri.path()) {
        ("GET", "/_emulator/stats") => {
            let c = lock(&shared.counters);
            let v = json!({"requests": c.requests, "calls": c.calls, "errors": c.errors, "keys": lock(&shared.keys).len()});
            return (
                StatusCode::OK,
                [("content-type", "application/json")],
                v.to_string(),
            )
                .into_response();
        }
        ("POST", "/_emulator/faults") => {
            return match serde_json::from_slice::<Faults>(&body) {
                Ok(f) => {
                    *lock(&shared.faults) = f;
                    (StatusCode::OK, "faults set\n").into_response()
                }
                Err(e) => {
                    (StatusCode::BAD_REQUEST, format!("bad faults JSON: {e}\n")).into_response()
                }
            };
        }
        ("GET", path) if path.starts_with(ROLE_PATH) => {
            return instance_metadata(&shared, &path[ROLE_PATH.len()..]);
        }
        ("POST", "/") => {}
        _ => {
            return respond(Err(api_error(
                "UnsupportedProtocol",
                "only POST / with a JSON body is supported",
            )));
        }
    }
    let action = header(&headers, "x-tc-action").unwrap_or("").to_owned();
    lock(&shared.counters).requests += 1;
    if let Err(e) = authenticate(&shared, &headers, &body) {
        return respond(Err(e));
    }
    *lock(&shared.counters)
        .calls
        .entry(action.clone())
        .or_default() += 1;
    let result = serve(&shared, &action, &headers, &body).await;
    if result.is_err() {
        *lock(&shared.counters)
            .errors
            .entry(action.clone())
            .or_default() += 1;
    }
    respond(result)
}

/// `GET /latest/meta-data/cam/security-credentials/[ROLE]`: the role's name, or new temporary
/// credentials for it, in the shape the CVM metadata service uses.
fn instance_metadata(shared: &Shared, rest: &str) -> Response {
    let Some(role) = &shared.config.instance_role else {
        return (StatusCode::NOT_FOUND, "no role is bound to this instance\n").into_response();
    };
    *lock(&shared.counters)
        .calls
        .entry("metadata".to_owned())
        .or_default() += 1;
    if rest.is_empty() {
        return (StatusCode::OK, role.name.clone()).into_response();
    }
    if rest != role.name {
        return (StatusCode::NOT_FOUND, "no such role\n").into_response();
    }
    let random = |n: usize| {
        let mut b = vec![0u8; n];
        rand::rng().fill_bytes(&mut b);
        hex::encode(b)
    };
    let secret_id = format!("AKIDtmp{}", random(12));
    let secret_key = random(20);
    let token = random(32);
    let ttl = i64::try_from(role.ttl.as_secs()).unwrap_or(i64::MAX);
    let expires = now_secs().saturating_add(ttl);
    let mut temp = lock(&shared.temp);
    // Forget long-expired sets, so a long-running emulator does not grow without bound.
    temp.retain(|_, c| c.expires > now_secs() - 3600);
    temp.insert(
        secret_id.clone(),
        TempCredentials {
            secret_key: SecretString::new(secret_key.clone()),
            token: SecretString::new(token.clone()),
            expires,
        },
    );
    let body = json!({
        "TmpSecretId": secret_id,
        "TmpSecretKey": secret_key,
        "ExpiredTime": expires,
        "Token": token,
        "Code": "Success",
    });
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn serve(
    shared: &Shared,
    action: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Value, ApiError> {
    if header(headers, "x-tc-version") != Some(API_VERSION) {
        return Err(api_error(
            "NoSuchVersion",
            format!("KMS speaks version {API_VERSION}"),
        ));
    }
    if header(headers, "x-tc-region").is_none_or(str::is_empty) {
        return Err(api_error("MissingParameter", "X-TC-Region is missing"));
    }
    let faults = *lock(&shared.faults);
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    if faults.max_qps > 0 {
        let mut w = lock(&shared.window);
        if w.0.elapsed() >= Duration::from_secs(1) {
            *w = (Instant::now(), 0);
        }
        w.1 += 1;
        if w.1 > faults.max_qps {
            return Err(api_error(
                "RequestLimitExceeded",
                "request rate above the emulator's --max-qps",
            ));
        }
    }
    if faults.fail_rate > 0.0 && rand::rng().random::<f64>() < faults.fail_rate {
        return Err(api_error("InternalError", "injected failure (--fail-rate)"));
    }
    let params: Value = serde_json::from_slice(body)
        .map_err(|_| api_error("InvalidParameter", "the body is not a JSON object"))?;
    if !params.is_object() {
        return Err(api_error(
            "InvalidParameter",
            "the body is not a JSON object",
        ));
    }
    match action {
        "CreateKey" => create_key(shared, &params),
        "DescribeKey" => describe_key(shared, &params),
        "EnableKey" => set_state(shared, &params, KeyState::Enabled),
        "DisableKey" => set_state(shared, &params, KeyState::Disabled),
        "ScheduleKeyDeletion" => schedule_deletion(shared, &params),
        "GenerateDataKey" => generate_data_key(shared, &params),
        "Decrypt" => decrypt(shared, &params),
        "Encrypt" => encrypt(shared, &params),
        "ReEncrypt" => re_encrypt(shared, &params),
        "GenerateRandom" => generate_random(&params),
        "" => Err(api_error("MissingParameter", "X-TC-Action is missing")),
        other => Err(api_error(
            "InvalidAction",
            format!("unknown action {other}"),
        )),
    }
}
