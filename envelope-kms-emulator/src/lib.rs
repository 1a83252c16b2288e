//! A local Tencent-compatible KMS: the API 3.0 protocol, TC3 signature checks, key states,
//! encryption contexts, fault injection and call counters, for development and tests.
//!
//! It is not a KMS to keep real keys in: its master keys live in its memory and, with a state
//! file, on disk in the clear (mode 0600). So that it is not reached from other machines by
//! accident:
//!
//! - it listens on a loopback address only, unless [`EmulatorConfig::allow_remote`] is set
//!   (`envelope kms-emulator --allow-remote`);
//! - its admin endpoints (`GET /_emulator/stats`, `POST /_emulator/faults`) answer loopback
//!   clients only, even with `allow_remote`: use them from the emulator's own machine (or
//!   container). Everything else a client does goes through the TC3 signature check, except
//!   the instance-role metadata path (as on a real CVM, anyone who reaches it gets credentials).
//!
//! Without a state file every key is lost when it stops, and with it every data key a key
//! table holds under it: [`Emulator::state_file`] tells which, and the command line prints it.
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
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use envelope_core::SecretString;
use serde::{Deserialize, Serialize};

use crate::http::handle;
use crate::state::{CmkEntry, load_state};

mod actions;
mod api;
mod auth;
mod blob;
mod http;
mod state;

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
    /// Allow `listen` to be an address other machines can reach (not loopback). Off, such an
    /// address is refused by [`Emulator::start`]: the emulator is not a KMS to expose.
    pub allow_remote: bool,
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
            .field("allow_remote", &self.allow_remote)
            .finish()
    }
}

impl EmulatorConfig {
    /// Listen on 127.0.0.1 (a free port) with these credentials, no state file, no faults,
    /// loopback only.
    pub fn local(secret_id: &str, secret_key: &str) -> Self {
        EmulatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            secret_id: secret_id.to_owned(),
            secret_key: SecretString::new(secret_key),
            session_token: None,
            state_file: None,
            faults: Faults::default(),
            instance_role: None,
            allow_remote: false,
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
    fn new(config: EmulatorConfig) -> Result<Shared, StartError> {
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

/// Why the emulator did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// `listen` is not a loopback address, and [`EmulatorConfig::allow_remote`] is off.
    #[error(
        "refusing to listen on {0}, which other machines can reach: the emulator is not a KMS \
         (its master keys are in memory, and in the clear in a state file). Listen on \
         127.0.0.1, or allow it explicitly (--allow-remote)"
    )]
    Remote(SocketAddr),
    /// The address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The state file cannot be read.
    #[error("{}: cannot read the state file: {source}", path.display())]
    ReadState {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The state file is not one the emulator wrote (its message names no key material).
    #[error("{}: not an emulator state file: {detail}", path.display())]
    BadState {
        /// The file.
        path: PathBuf,
        /// What is wrong: the parser's position, or the key whose material is bad.
        detail: String,
    },
    /// The operating system refused a thread, a runtime or a socket setting.
    #[error("cannot start the emulator ({doing}): {source}")]
    Io {
        /// What the emulator was doing.
        doing: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The server thread ended before it was ready.
    #[error("the emulator thread died while starting")]
    Died,
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
    /// When `listen` is not a loopback address and [`EmulatorConfig::allow_remote`] is off,
    /// when the address cannot be bound, or when the state file cannot be read.
    pub fn start(config: EmulatorConfig) -> Result<Emulator, StartError> {
        if !config.allow_remote && !config.listen.ip().is_loopback() {
            return Err(StartError::Remote(config.listen));
        }
        let shared = Arc::new(Shared::new(config)?);
        let std_listener = std::net::TcpListener::bind(shared.config.listen).map_err(|source| {
            StartError::Listen {
                addr: shared.config.listen,
                source,
            }
        })?;
        std_listener
            .set_nonblocking(true)
            .map_err(|source| StartError::Io {
                doing: "configuring the listener",
                source,
            })?;
        let addr = std_listener.local_addr().map_err(|source| StartError::Io {
            doing: "reading the listening address",
            source,
        })?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server_shared = shared.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), StartError>>();
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
                        let _ = ready_tx.send(Err(StartError::Io {
                            doing: "starting its runtime",
                            source: e,
                        }));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(StartError::Io {
                                doing: "listening",
                                source: e,
                            }));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    let app = axum::Router::new().fallback(
                        move |ConnectInfo(peer): ConnectInfo<SocketAddr>,
                              method,
                              uri,
                              headers,
                              body| {
                            handle(server_shared.clone(), peer, method, uri, headers, body)
                        },
                    );
                    let app = app.into_make_service_with_connect_info::<SocketAddr>();
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = rx.await;
                        })
                        .await;
                });
            })
            .map_err(|source| StartError::Io {
                doing: "starting its thread",
                source,
            })?;
        ready_rx.recv().map_err(|_| StartError::Died)??;
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

    /// The state file that keeps its keys across restarts, or `None`: then every key is lost
    /// when it stops.
    pub fn state_file(&self) -> Option<&Path> {
        self.shared.config.state_file.as_deref()
    }

    /// How many keys it holds (those of the state file, at start).
    pub fn key_count(&self) -> usize {
        lock(&self.shared.keys).len()
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
    use crate::auth::secrets_equal;

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
    fn a_listen_address_other_machines_reach_needs_allow_remote() {
        let mut c = EmulatorConfig::local("AKIDtest", "test-secret-key");
        c.listen = SocketAddr::from(([0, 0, 0, 0], 0));
        let refused = Emulator::start(c.clone()).unwrap_err();
        assert!(refused.to_string().contains("--allow-remote"), "{refused}");
        c.allow_remote = true;
        let e = Emulator::start(c).unwrap();
        assert!(e.addr().ip().is_unspecified());
        let mut v6 = EmulatorConfig::local("AKIDtest", "test-secret-key");
        v6.listen = "[::1]:0".parse().unwrap();
        // Loopback over IPv6 is fine without the flag (when the machine has it).
        if let Err(e) = Emulator::start(v6) {
            assert!(!e.to_string().contains("--allow-remote"), "{e}");
        }
    }

    /// `GET /_emulator/stats` from `from` to `to`: the status code.
    fn stats_status(from: std::net::IpAddr, to: SocketAddr) -> u16 {
        use std::io::{Read as _, Write as _};
        let socket = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5));
        let mut stream = socket.unwrap();
        assert_eq!(stream.local_addr().unwrap().ip(), from);
        stream
            .write_all(
                b"GET /_emulator/stats HTTP/1.1\r\nHost: emulator\r\nConnection: close\r\n\r\n",
            )
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not HTTP: {answer}"))
    }

    #[test]
    fn admin_endpoints_answer_loopback_clients_only() {
        // This machine's address on its default route (no packet is sent), if it has one.
        let outward = std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| s.connect("192.0.2.1:9").map(|()| s))
            .and_then(|s| s.local_addr())
            .map(|a| a.ip())
            .ok()
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified());
        let mut c = EmulatorConfig::local("AKIDtest", "test-secret-key");
        c.listen = SocketAddr::from(([0, 0, 0, 0], 0));
        c.allow_remote = true;
        let e = Emulator::start(c).unwrap();
        let port = e.addr().port();
        let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
        assert_eq!(stats_status(loopback, SocketAddr::new(loopback, port)), 200);
        let Some(outward) = outward else {
            // Nothing but loopback here: no client that is not loopback to try.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: admin_endpoints_answer_loopback_clients_only: no address but loopback"
            );
            return;
        };
        assert_eq!(stats_status(outward, SocketAddr::new(outward, port)), 403);
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
