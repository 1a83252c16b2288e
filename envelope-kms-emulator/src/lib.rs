//! A local Tencent-compatible KMS: the API 3.0 protocol, TC3 signature checks, key states,
//! encryption contexts, fault injection and call counters, for development and tests.
//!
//! It is not a KMS to keep real keys in: its master keys live in its memory and, with a state
//! file, on disk in the clear (mode 0600).
//!
//! Start it with `envelope kms-emulator` or, in a test, with [`Emulator::start`], which runs it
//! on its own thread so that it never shares a runtime with the code under test.
//!
//! Here: the configuration and the running [`Emulator`]. `http` holds the API 3.0 envelope and
//! the server, `auth` the TC3 signature checks, `actions` the KMS actions, `blob` the
//! CiphertextBlob format, `state` key states and the state file.
#![forbid(unsafe_code)]

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
use envelope_core::__private::tc3 as sign;
use envelope_core::kms::tencent::API_VERSION;
use envelope_core::{EncryptionContext, SecretString};
use rand::{Rng as _, RngExt as _};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use zeroize::Zeroizing;

mod actions;
mod auth;
mod blob;
mod http;
mod state;

use actions::*;
use auth::*;
use blob::*;
use http::*;
use state::*;

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

impl Shared {
    /// The emulator's state, with the keys of the state file if there is one.
    fn new(config: EmulatorConfig) -> Result<Shared, String> {
        let keys = match &config.state_file {
            Some(path) => load_state(path)?,
            None => BTreeMap::new(),
        };
        let faults = config.faults;
        Ok(Shared {
            config,
            keys: Mutex::new(keys),
            counters: Mutex::default(),
            faults: Mutex::new(faults),
            window: Mutex::new((Instant::now(), 0)),
            temp: Mutex::default(),
        })
    }
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
        let shared = Arc::new(Shared::new(config)?);
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
