//! Several processes of one binary started at the same moment, as replicas of a new deployment
//! are, and stopped again by the pids this test started (never by name).
//!
//! Whether several processes' DDL collides depends on timing, so a test repeats the start
//! [`ROUNDS`] times, each on a fresh schema or database.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A name for a schema or database of one test: `prefix_`, then this process's id and the time,
/// lower case and `_` only, so it needs no quoting on any database.
pub fn database_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}_{}_{nanos}_{n}", std::process::id())
}

/// How many times a replicas test starts its replicas, each time on a fresh database: whether
/// concurrent DDL collides depends on timing, so one start proves little.
pub const ROUNDS: usize = 10;

/// `url` (`mysql://user@host:port/db?query`) with its database replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[after_scheme..]
        .find('/')
        .map_or(base.len(), |i| after_scheme + i);
    let mut out = format!("{}/{database}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// One process started by the test. Dropping it stops the process (by its pid) if it still
/// runs, so a failed assertion leaves nothing behind.
pub struct Replica {
    child: Child,
    /// Known once it prints its `listening on http://127.0.0.1:PORT` line.
    port: Option<u16>,
    lines: Receiver<String>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Replica {
    /// Start `bin` with `PORT=0` (it takes a free port and prints it: a port picked here
    /// could be taken meanwhile by any outgoing connection) and the variables `env` (a `None`
    /// value removes the variable from the environment the test runs in).
    pub fn spawn(bin: &str, env: &[(&str, Option<&str>)]) -> Replica {
        let mut cmd = Command::new(bin);
        cmd.env("PORT", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, value) in env {
            match value {
                Some(v) => cmd.env(name, v),
                None => cmd.env_remove(name),
            };
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let (tx, lines) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(String::new()));
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let seen = stdout.clone();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                seen.lock().unwrap().push_str(&format!("{line}\n"));
                // The receiver may be gone: the test only waits for the first lines.
                let _ = tx.send(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("piped stderr");
        let text = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = String::new();
            let _ = err.read_to_string(&mut buf);
            text.lock().unwrap().push_str(&buf);
        });
        Replica {
            child,
            port: None,
            lines,
            stdout,
            stderr,
        }
    }

    /// The port it listens on, once [`Replica::wait_until_listening`] succeeded.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    ///
    /// # Panics
    /// Before [`Replica::wait_until_listening`] succeeded.
    pub fn base(&self) -> String {
        let port = self.port.expect("the replica is not listening yet");
        format!("http://127.0.0.1:{port}")
    }

    /// The process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait until it prints its `listening on http://127.0.0.1:PORT` line. `Err` says why it
    /// did not: it exited first (with what it wrote to stderr), or `timeout` passed.
    ///
    /// # Errors
    /// A message for the test's failure.
    pub fn wait_until_listening(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains("listening") => {
                    self.port = listening_port(&line);
                    return match self.port {
                        Some(_) => Ok(()),
                        None => Err(format!("no http://127.0.0.1:PORT in {line:?}")),
                    };
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().map(|s| s.to_string());
                    // Let the stderr reader finish after the exit.
                    std::thread::sleep(Duration::from_millis(100));
                    return Err(format!(
                        "pid {} exited before listening ({}): {}{}",
                        self.pid(),
                        status.unwrap_or_else(|e| e.to_string()),
                        self.stdout.lock().unwrap(),
                        self.stderr.lock().unwrap()
                    ));
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "pid {} not listening after {timeout:?}: {}{}",
                        self.pid(),
                        self.stdout.lock().unwrap(),
                        self.stderr.lock().unwrap()
                    ));
                }
            }
        }
    }

    /// Stop it with SIGINT (Ctrl-C, which the showcase apps handle by stopping cleanly) sent to
    /// its pid, and wait up to 20 s, then SIGKILL. Returns what it printed.
    pub fn stop(mut self) -> String {
        self.stop_in_place();
        format!(
            "{}{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    fn stop_in_place(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // Only the process this test started, by its pid.
        let _ = Command::new("kill")
            .args(["-INT", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Child::kill sends SIGKILL to this child's pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port of the first `http://127.0.0.1:PORT` in `line`.
fn listening_port(line: &str) -> Option<u16> {
    let (_, rest) = line.split_once("http://127.0.0.1:")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop_in_place();
    }
}

/// Start `n` processes of `bin` at once (all spawned before any is waited for), then wait for
/// each to listen. `Err` lists the ones that did not come up, with their output; the processes
/// are stopped when the returned (or dropped) replicas are.
///
/// # Errors
/// One line per replica that did not come up.
pub fn start_together(
    bin: &str,
    n: usize,
    env: &[(&str, Option<&str>)],
    timeout: Duration,
) -> Result<Vec<Replica>, String> {
    let mut replicas: Vec<Replica> = (0..n).map(|_| Replica::spawn(bin, env)).collect();
    let failures: Vec<String> = replicas
        .iter_mut()
        .enumerate()
        .filter_map(|(i, r)| {
            r.wait_until_listening(timeout)
                .err()
                .map(|e| format!("replica {}: {e}", i + 1))
        })
        .collect();
    if failures.is_empty() {
        Ok(replicas)
    } else {
        Err(format!(
            "{} of {n} replicas came up:\n{}",
            n - failures.len(),
            failures.join("\n")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::{listening_port, with_database};

    #[test]
    fn the_port_comes_from_the_listening_line() {
        assert_eq!(
            listening_port("web-sqlx listening on http://127.0.0.1:41234 (PostgreSQL; KMS local)"),
            Some(41234)
        );
        assert_eq!(listening_port("listening somewhere"), None);
    }

    #[test]
    fn with_database_swaps_only_the_database() {
        assert_eq!(
            with_database("mysql://root@127.0.0.1:3306/test", "x_1"),
            "mysql://root@127.0.0.1:3306/x_1"
        );
        assert_eq!(
            with_database("mysql://u:p@h/test?ssl-mode=disabled", "x"),
            "mysql://u:p@h/x?ssl-mode=disabled"
        );
        assert_eq!(with_database("mysql://h:1", "x"), "mysql://h:1/x");
    }
}
