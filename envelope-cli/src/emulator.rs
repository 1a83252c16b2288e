//! A local Tencent-compatible KMS: the API 3.0 protocol, TC3 signature checks, key states,
//! encryption contexts, fault injection and call counters, for development and tests.
//!
//! It is not a KMS to keep real keys in: its master keys live in its memory and, with a state
//! file, on disk in the clear (mode 0600).
//!
//! Start it with `envelope kms-emulator` or, in a test, with [`Emulator::start`], which runs it
//! on its own thread so that it never shares a runtime with the code under test.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use envelope_core::kms::tencent::{API_VERSION, sign};
use envelope_core::{EncryptionContext, SecretString};
use rand::{Rng as _, RngExt as _};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use zeroize::Zeroizing;

/// Requests whose timestamp is further than this from the emulator's clock are refused.
pub const MAX_CLOCK_SKEW_SECS: i64 = 300;
const BLOB_SEPARATOR: &str = "-k-";
const BLOB_MARKER: &[u8; 16] = b"envelope-emu/v1\0";

/// Injected faults. All zero means none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Faults {
    /// Fraction of KMS calls (0 to 1) answered with `InternalError`.
    #[serde(default)]
    pub fail_rate: f64,
    /// Delay added before each KMS call is answered.
    #[serde(default)]
    pub latency_ms: u64,
    /// KMS calls allowed per second; more get `RequestLimitExceeded`. 0 = unlimited.
    #[serde(default)]
    pub max_qps: u32,
}

/// How to run the emulator.
#[derive(Clone)]
pub struct EmulatorConfig {
    /// Where to listen; port 0 picks a free port.
    pub listen: SocketAddr,
    /// The one SecretId it accepts.
    pub secret_id: String,
    /// Its SecretKey.
    pub secret_key: SecretString,
    /// If set, requests must carry this `X-TC-Token`.
    pub session_token: Option<SecretString>,
    /// Where to keep keys across restarts.
    pub state_file: Option<PathBuf>,
    /// Faults from the start.
    pub faults: Faults,
    /// Serve a CVM instance's role credentials on the metadata path, as
    /// `metadata.tencentyun.com` does: each read hands out new temporary credentials (accepted
    /// with their `X-TC-Token` until they expire).
    pub instance_role: Option<InstanceRole>,
}

/// The role of the emulated CVM instance.
#[derive(Clone, Debug)]
pub struct InstanceRole {
    /// The CAM role name the metadata service lists.
    pub name: String,
    /// How long each set of temporary credentials lives.
    pub ttl: Duration,
}

/// The metadata path that lists the instance's role, as on a CVM.
pub const ROLE_PATH: &str = "/latest/meta-data/cam/security-credentials/";

/// Temporary credentials handed out by the metadata path.
struct TempCredentials {
    secret_key: SecretString,
    token: SecretString,
    expires: i64,
}

impl std::fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Written out so that a field added later has to decide whether it may be printed.
        f.debug_struct("EmulatorConfig")
            .field("listen", &self.listen)
            .field("secret_id", &self.secret_id)
            .field("secret_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("state_file", &self.state_file)
            .field("faults", &self.faults)
            .field("instance_role", &self.instance_role)
            .finish()
    }
}

impl EmulatorConfig {
    /// Listen on 127.0.0.1 (a free port) with these credentials, no state file, no faults.
    pub fn local(secret_id: &str, secret_key: &str) -> Self {
        EmulatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            secret_id: secret_id.to_owned(),
            secret_key: SecretString::new(secret_key),
            session_token: None,
            state_file: None,
            faults: Faults::default(),
            instance_role: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum KeyState {
    Enabled,
    Disabled,
    PendingDelete,
}

impl KeyState {
    fn as_str(self) -> &'static str {
        match self {
            KeyState::Enabled => "Enabled",
            KeyState::Disabled => "Disabled",
            KeyState::PendingDelete => "PendingDelete",
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StoredKey {
    key_id: String,
    alias: String,
    description: String,
    key_state: KeyState,
    create_time: i64,
    deletion_date: Option<i64>,
    /// The master key, base64. The state file is the emulator's own; it is never a real KMS.
    material: String,
}

struct CmkEntry {
    meta: StoredKey,
    cipher: LessSafeKey,
}

/// An AES-256-GCM key; `None` unless `material` is 32 bytes.
fn cmk_cipher(material: &[u8]) -> Option<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, material)
        .ok()
        .map(LessSafeKey::new)
}

#[derive(Default)]
struct Counters {
    /// Every request to `/`, authenticated or not.
    requests: u64,
    calls: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
}

struct Shared {
    config: EmulatorConfig,
    keys: Mutex<BTreeMap<String, CmkEntry>>,
    counters: Mutex<Counters>,
    faults: Mutex<Faults>,
    window: Mutex<(Instant, u32)>,
    /// Temporary credentials handed out on the metadata path, by SecretId.
    temp: Mutex<BTreeMap<String, TempCredentials>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data consistent, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running emulator. Dropping it stops the server.
pub struct Emulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Emulator {
    /// Start serving on a thread of its own.
    ///
    /// # Errors
    /// When the address cannot be bound or the state file cannot be read.
    pub fn start(config: EmulatorConfig) -> Result<Emulator, String> {
        let keys = match &config.state_file {
            Some(path) => load_state(path)?,
            None => BTreeMap::new(),
        };
        let faults = config.faults;
        let shared = Arc::new(Shared {
            config,
            keys: Mutex::new(keys),
            counters: Mutex::default(),
            faults: Mutex::new(faults),
            window: Mutex::new((Instant::now(), 0)),
            temp: Mutex::default(),
        });
        let std_listener = std::net::TcpListener::bind(shared.config.listen)
            .map_err(|e| format!("cannot listen on {}: {e}", shared.config.listen))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| format!("cannot configure the listener: {e}"))?;
        let addr = std_listener
            .local_addr()
            .map_err(|e| format!("cannot read the listening address: {e}"))?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server_shared = shared.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = std::thread::Builder::new()
            .name("kms-emulator".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("kms-emulator-worker")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("cannot start a runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("cannot listen: {e}")));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    let app = axum::Router::new().fallback(move |method, uri, headers, body| {
                        handle(server_shared.clone(), method, uri, headers, body)
                    });
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = rx.await;
                        })
                        .await;
                });
            })
            .map_err(|e| format!("cannot start the emulator thread: {e}"))?;
        ready_rx
            .recv()
            .map_err(|_| "the emulator thread died while starting".to_owned())??;
        Ok(Emulator {
            addr,
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL for [`envelope_core::kms::tencent::TencentConfig::endpoint`].
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many authenticated requests for `action` arrived (including ones answered with an
    /// injected fault).
    pub fn calls(&self, action: &str) -> u64 {
        lock(&self.shared.counters)
            .calls
            .get(action)
            .copied()
            .unwrap_or(0)
    }

    /// How many requests arrived at all, including ones refused by the signature check.
    pub fn requests(&self) -> u64 {
        lock(&self.shared.counters).requests
    }

    /// How many requests for `action` were answered with an error.
    pub fn errors(&self, action: &str) -> u64 {
        lock(&self.shared.counters)
            .errors
            .get(action)
            .copied()
            .unwrap_or(0)
    }

    /// Forget the counters.
    pub fn reset_counters(&self) {
        *lock(&self.shared.counters) = Counters::default();
    }

    /// Change the injected faults.
    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.shared.faults) = faults;
    }

    /// Block until the server stops (for the command line).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An API error: HTTP 200 with `Response.Error`, as the real service answers.
struct ApiError {
    code: &'static str,
    message: String,
}

fn api_error(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        code,
        message: message.into(),
    }
}

fn request_id() -> String {
    let b: [u8; 16] = rand::rng().random();
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

async fn handle(
    shared: Arc<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
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

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn now_secs() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
    )
    .unwrap_or(i64::MAX)
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

/// Verify the TC3 signature the way the real service does.
fn authenticate(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
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
fn secrets_equal(sent: &str, expected: &str) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(sent.as_bytes(), expected.as_bytes()).is_ok()
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

fn str_param<'a>(params: &'a Value, name: &str) -> Result<&'a str, ApiError> {
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

fn opt_str<'a>(params: &'a Value, name: &str) -> Result<Option<&'a str>, ApiError> {
    match params.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(api_error(
            "InvalidParameter",
            format!("the parameter {name} must be a string"),
        )),
    }
}

fn int_param(params: &Value, name: &str) -> Result<Option<i64>, ApiError> {
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
fn context_bytes(params: &Value, name: &str) -> Result<String, ApiError> {
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

fn new_key_id() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
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

fn metadata(m: &StoredKey) -> Value {
    json!({
        "KeyId": m.key_id,
        "Alias": m.alias,
        "Description": m.description,
        "KeyState": m.key_state.as_str(),
        "KeyUsage": "ENCRYPT_DECRYPT",
        "CreateTime": m.create_time,
        "DeletionDate": m.deletion_date.unwrap_or(0),
        "Type": 1,
        "Origin": "TENCENT_KMS",
    })
}

fn create_key(shared: &Shared, params: &Value) -> Result<Value, ApiError> {
    let alias = str_param(params, "Alias")?.to_owned();
    let description = opt_str(params, "Description")?.unwrap_or("").to_owned();
    if let Some(usage) = opt_str(params, "KeyUsage")?
        && usage != "ENCRYPT_DECRYPT"
    {
        return Err(api_error(
            "UnsupportedOperation",
            "the emulator makes ENCRYPT_DECRYPT keys only",
        ));
    }
    let material: Zeroizing<[u8; 32]> = Zeroizing::new(rand::rng().random());
    let meta = StoredKey {
        key_id: new_key_id(),
        alias,
        description,
        key_state: KeyState::Enabled,
        create_time: now_secs(),
        deletion_date: None,
        material: STANDARD.encode(*material),
    };
    let response = metadata(&meta);
    let mut keys = lock(&shared.keys);
    if keys.values().any(|k| k.meta.alias == meta.alias) {
        return Err(api_error(
            "InvalidParameterValue.AliasAlreadyExists",
            "a key with this alias exists",
        ));
    }
    let cipher = cmk_cipher(&material[..])
        .ok_or_else(|| api_error("InternalError", "the key could not be initialized"))?;
    let entry = CmkEntry { cipher, meta };
    keys.insert(entry.meta.key_id.clone(), entry);
    persist(shared, &keys)?;
    Ok(response)
}

/// The entry for a KeyId (or `alias/NAME`).
fn find<'a>(keys: &'a BTreeMap<String, CmkEntry>, id: &str) -> Result<&'a CmkEntry, ApiError> {
    let found = match id.strip_prefix("alias/") {
        Some(alias) => keys.values().find(|k| k.meta.alias == alias),
        None => keys.get(id),
    };
    found.ok_or_else(|| api_error("ResourceUnavailable.CmkNotFound", format!("no key {id}")))
}

fn usable<'a>(keys: &'a BTreeMap<String, CmkEntry>, id: &str) -> Result<&'a CmkEntry, ApiError> {
    let entry = find(keys, id)?;
    match entry.meta.key_state {
        KeyState::Enabled => Ok(entry),
        KeyState::Disabled => Err(api_error(
            "ResourceUnavailable.CmkDisabled",
            "the key is disabled",
        )),
        KeyState::PendingDelete => Err(api_error(
            "ResourceUnavailable.KeyPendingDelete",
            "the key is pending deletion",
        )),
    }
}

fn describe_key(shared: &Shared, params: &Value) -> Result<Value, ApiError> {
    let keys = lock(&shared.keys);
    let entry = find(&keys, str_param(params, "KeyId")?)?;
    Ok(json!({ "KeyMetadata": metadata(&entry.meta) }))
}

fn set_state(shared: &Shared, params: &Value, state: KeyState) -> Result<Value, ApiError> {
    let id = str_param(params, "KeyId")?;
    let mut keys = lock(&shared.keys);
    let key_id = find(&keys, id)?.meta.key_id.clone();
    let entry = keys
        .get_mut(&key_id)
        .ok_or_else(|| api_error("ResourceUnavailable.CmkNotFound", "no such key"))?;
    if entry.meta.key_state == KeyState::PendingDelete {
        return Err(api_error(
            "ResourceUnavailable.KeyPendingDelete",
            "the key is pending deletion; cancel the deletion first",
        ));
    }
    entry.meta.key_state = state;
    persist(shared, &keys)?;
    Ok(json!({}))
}

fn schedule_deletion(shared: &Shared, params: &Value) -> Result<Value, ApiError> {
    let id = str_param(params, "KeyId")?;
    let days = int_param(params, "PendingWindowInDays")?
        .ok_or_else(|| api_error("MissingParameter", "PendingWindowInDays is missing"))?;
    if !(7..=30).contains(&days) {
        return Err(api_error(
            "InvalidParameterValue",
            "PendingWindowInDays must be 7 to 30",
        ));
    }
    let mut keys = lock(&shared.keys);
    let key_id = find(&keys, id)?.meta.key_id.clone();
    let entry = keys
        .get_mut(&key_id)
        .ok_or_else(|| api_error("ResourceUnavailable.CmkNotFound", "no such key"))?;
    let date = now_secs() + days * 86_400;
    entry.meta.key_state = KeyState::PendingDelete;
    entry.meta.deletion_date = Some(date);
    persist(shared, &keys)?;
    Ok(json!({"KeyId": key_id, "DeletionDate": date}))
}

/// `base64(key id, nonce, filler: 64 bytes) -k- base64(marker: 16 bytes) -k- base64(ciphertext || tag)`.
fn seal_blob(entry: &CmkEntry, context: &str, plaintext: &[u8]) -> Result<String, ApiError> {
    let nonce: [u8; 12] = rand::rng().random();
    let mut head = [0u8; 64];
    let id = entry.meta.key_id.as_bytes();
    if id.len() > 36 {
        return Err(api_error("InternalError", "key id too long"));
    }
    head[..id.len()].copy_from_slice(id);
    head[36..48].copy_from_slice(&nonce);
    rand::rng().fill_bytes(&mut head[48..]);
    let mut body = plaintext.to_vec();
    let aad = blob_aad(&entry.meta.key_id, context);
    let tag = entry
        .cipher
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad),
            &mut body,
        )
        .map_err(|_| api_error("FailedOperation.EncryptionError", "encryption failed"))?;
    body.extend_from_slice(tag.as_ref());
    Ok(format!(
        "{}{BLOB_SEPARATOR}{}{BLOB_SEPARATOR}{}",
        STANDARD.encode(head),
        STANDARD.encode(BLOB_MARKER),
        STANDARD.encode(&body)
    ))
}

fn blob_aad(key_id: &str, context: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(key_id.len() + 1 + context.len());
    aad.extend_from_slice(key_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(context.as_bytes());
    aad
}

fn invalid_ciphertext() -> ApiError {
    api_error(
        "InvalidParameterValue.InvalidCiphertext",
        "the ciphertext is invalid, or the EncryptionContext does not match",
    )
}

/// Open a blob: returns the key id and the plaintext.
fn open_blob(
    keys: &BTreeMap<String, CmkEntry>,
    blob: &str,
    context: &str,
) -> Result<(String, Zeroizing<Vec<u8>>), ApiError> {
    let parts: Vec<&str> = blob.split(BLOB_SEPARATOR).collect();
    let [head, marker, body] = parts[..] else {
        return Err(invalid_ciphertext());
    };
    let head = STANDARD.decode(head).map_err(|_| invalid_ciphertext())?;
    let marker = STANDARD.decode(marker).map_err(|_| invalid_ciphertext())?;
    let body = STANDARD.decode(body).map_err(|_| invalid_ciphertext())?;
    if head.len() != 64 || marker != BLOB_MARKER || body.len() < 16 {
        return Err(invalid_ciphertext());
    }
    let id_end = head[..36].iter().position(|&b| b == 0).unwrap_or(36);
    let key_id = std::str::from_utf8(&head[..id_end]).map_err(|_| invalid_ciphertext())?;
    let entry = usable(keys, key_id)?;
    let nonce =
        Nonce::try_assume_unique_for_key(&head[36..48]).map_err(|_| invalid_ciphertext())?;
    let (ct, tag) = body.split_at(body.len() - 16);
    let mut plaintext = Zeroizing::new(vec![0u8; ct.len()]);
    entry
        .cipher
        .open_separate_gather(
            nonce,
            Aad::from(&blob_aad(key_id, context)),
            ct,
            tag,
            &mut plaintext[..],
        )
        .map_err(|_| invalid_ciphertext())?;
    Ok((entry.meta.key_id.clone(), plaintext))
}

fn generate_data_key(shared: &Shared, params: &Value) -> Result<Value, ApiError> {
    let id = str_param(params, "KeyId")?;
    let len = match (
        int_param(params, "NumberOfBytes")?,
        opt_str(params, "KeySpec")?,
    ) {
        (Some(n), _) if (1..=1024).contains(&n) => usize::try_from(n).unwrap_or(32),
        (Some(_), _) => {
            return Err(api_error(
                "InvalidParameterValue",
                "NumberOfBytes must be 1 to 1024",
            ));
        }
        (None, Some("AES_256")) => 32,
        (None, Some("AES_128")) => 16,
        (None, Some(_)) => {
            return Err(api_error(
                "InvalidParameterValue",
                "KeySpec must be AES_128 or AES_256",
            ));
        }
        (None, None) => {
            return Err(api_error(
                "InvalidParameter",
                "one of KeySpec and NumberOfBytes is required",
            ));
        }
    };
    let context = context_bytes(params, "EncryptionContext")?;
    let keys = lock(&shared.keys);
    let entry = usable(&keys, id)?;
    let mut key = Zeroizing::new(vec![0u8; len]);
    rand::rng().fill_bytes(&mut key);
    let blob = seal_blob(entry, &context, &key)?;
    Ok(json!({
        "KeyId": entry.meta.key_id,
        "Plaintext": STANDARD.encode(&*key),
        "CiphertextBlob": blob,
    }))
}

fn decrypt(shared: &Shared, params: &Value) -> Result<Value, ApiError> {
    let blob = str_param(params, "CiphertextBlob")?;
    let context = context_bytes(params, "EncryptionContext")?;
    let keys = lock(&shared.keys);
    let (key_id, plaintext) = open_blob(&keys, blob, &context)?;
    Ok(json!({"KeyId": key_id, "Plaintext": STANDARD.encode(&*plaintext)}))
}

fn encrypt(shared: &Shared, params: &Value) -> Result<Value, ApiError> {
    let id = str_param(params, "KeyId")?;
    let plaintext = Zeroizing::new(STANDARD.decode(str_param(params, "Plaintext")?).map_err(
        |_| {
            api_error(
                "InvalidParameterValue.InvalidPlaintext",
                "Plaintext is not base64",
            )
        },
    )?);
    if plaintext.len() > 4096 {
        return Err(api_error(
            "InvalidParameterValue.InvalidPlaintext",
            "Plaintext is larger than 4 KB",
        ));
    }
    let context = context_bytes(params, "EncryptionContext")?;
    let keys = lock(&shared.keys);
    let entry = usable(&keys, id)?;
    Ok(
        json!({"KeyId": entry.meta.key_id, "CiphertextBlob": seal_blob(entry, &context, &plaintext)?}),
    )
}

fn re_encrypt(shared: &Shared, params: &Value) -> Result<Value, ApiError> {
    let blob = str_param(params, "CiphertextBlob")?;
    let source_context = context_bytes(params, "SourceEncryptionContext")?;
    let destination_context = context_bytes(params, "DestinationEncryptionContext")?;
    let keys = lock(&shared.keys);
    let (source_id, plaintext) = open_blob(&keys, blob, &source_context)?;
    let destination = match opt_str(params, "DestinationKeyId")? {
        None | Some("") => source_id.clone(),
        Some(d) => find(&keys, d)?.meta.key_id.clone(),
    };
    if destination == source_id && destination_context == source_context {
        // Nothing to change: the real service returns the blob as it is.
        return Ok(json!({
            "CiphertextBlob": blob, "KeyId": destination, "SourceKeyId": source_id, "ReEncrypted": false
        }));
    }
    let entry = usable(&keys, &destination)?;
    Ok(json!({
        "CiphertextBlob": seal_blob(entry, &destination_context, &plaintext)?,
        "KeyId": destination,
        "SourceKeyId": source_id,
        "ReEncrypted": true,
    }))
}

fn generate_random(params: &Value) -> Result<Value, ApiError> {
    let n = int_param(params, "NumberOfBytes")?
        .ok_or_else(|| api_error("MissingParameter", "NumberOfBytes is missing"))?;
    if !(1..=1024).contains(&n) {
        return Err(api_error(
            "InvalidParameterValue",
            "NumberOfBytes must be 1 to 1024",
        ));
    }
    let mut bytes = vec![0u8; usize::try_from(n).unwrap_or(0)];
    rand::rng().fill_bytes(&mut bytes);
    Ok(json!({"Plaintext": STANDARD.encode(bytes)}))
}

// ----- state file -----------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StateFile {
    version: u32,
    keys: Vec<StoredKey>,
}

fn load_state(path: &Path) -> Result<BTreeMap<String, CmkEntry>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => Zeroizing::new(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => {
            return Err(format!(
                "{}: cannot read the state file: {e}",
                path.display()
            ));
        }
    };
    let state: StateFile = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not an emulator state file: {e}", path.display()))?;
    let mut keys = BTreeMap::new();
    for meta in state.keys {
        let material =
            Zeroizing::new(STANDARD.decode(&meta.material).map_err(|_| {
                format!("{}: key {} has bad material", path.display(), meta.key_id)
            })?);
        let cipher = cmk_cipher(&material)
            .ok_or_else(|| format!("{}: key {} has bad material", path.display(), meta.key_id))?;
        keys.insert(meta.key_id.clone(), CmkEntry { meta, cipher });
    }
    Ok(keys)
}

/// Write the keys atomically (temporary file, then rename), readable by the owner only.
fn persist(shared: &Shared, keys: &BTreeMap<String, CmkEntry>) -> Result<(), ApiError> {
    let Some(path) = &shared.config.state_file else {
        return Ok(());
    };
    let state = StateFile {
        version: 1,
        keys: keys
            .values()
            .map(|k| StoredKey {
                key_id: k.meta.key_id.clone(),
                alias: k.meta.alias.clone(),
                description: k.meta.description.clone(),
                key_state: k.meta.key_state,
                create_time: k.meta.create_time,
                deletion_date: k.meta.deletion_date,
                material: k.meta.material.clone(),
            })
            .collect(),
    };
    let text = Zeroizing::new(
        serde_json::to_string_pretty(&state)
            .map_err(|_| api_error("InternalError", "cannot serialize the state"))?,
    );
    // A fresh name, created exclusively with mode 0600: the file is never readable by others,
    // not even for the moment between creating and writing it, and a stale or planted file (or
    // a symlink) at a fixed temporary name cannot lend it wider permissions or another target.
    let suffix: u64 = rand::rng().random();
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".{suffix:016x}.tmp"));
    let tmp = path.with_file_name(tmp_name);
    let write = || -> std::io::Result<()> {
        use std::io::Write as _;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        let written = f
            .write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    };
    write().map_err(|e| {
        api_error(
            "InternalError",
            format!("cannot write the state file {}: {e}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_debug_never_shows_the_secret_key_or_token() {
        let mut c = EmulatorConfig::local("AKIDvisible", "emulator-secret-key-value");
        c.session_token = Some(SecretString::new("emulator-session-token-value"));
        let dbg = format!("{c:?}");
        assert!(dbg.contains("AKIDvisible"), "{dbg}");
        assert!(
            !dbg.contains("emulator-secret-key-value")
                && !dbg.contains("emulator-session-token-value"),
            "{dbg}"
        );
        let e = Emulator::start(c).unwrap();
        assert!(!format!("{e:?}").contains("emulator-secret-key-value"));
    }

    #[test]
    fn session_tokens_compare_whole() {
        assert!(secrets_equal("sts-token", "sts-token"));
        assert!(!secrets_equal("sts-toke", "sts-token"));
        assert!(!secrets_equal("sts-tokenX", "sts-token"));
        assert!(!secrets_equal("", "sts-token"));
        assert!(!secrets_equal("STS-TOKEN", "sts-token"));
    }
}
