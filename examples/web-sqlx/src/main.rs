//! `cargo run -p web-sqlx`: serves the customer API on 127.0.0.1:3000 (`PORT` overrides) with
//! SQLite in `web-sqlx.db` and the local KMS (`envelope-master.key`), or with `DATABASE_URL`
//! and `ENVELOPE_KMS=tencent` (see the crate docs).
#![forbid(unsafe_code)]

use std::process::ExitCode;

const USAGE: &str = "\
web-sqlx: envelope's showcase, a customer API with encrypted fields

usage: web-sqlx [--help]

Serves on 127.0.0.1:$PORT. Configuration comes from the environment, all optional:
  PORT                       port to listen on (3000; 0 takes a free one, printed at start)
  DATABASE_URL               sqlite://web-sqlx.db?mode=rwc; postgres://... and mysql://... work too
  ENVELOPE_KMS               local (default), tencent (with ENVELOPE_CMK and TENCENTCLOUD_*),
                             or a key URI: aws://REGION/KEY, vault://HOST:PORT/MOUNT/KEY
  ENVELOPE_MASTER_KEY_FILE   the local KMS's master key file (envelope-master.key; created for
                             SQLite, required otherwise: envelope keygen --out FILE)
  ENVELOPE_LOCAL_MASTER_KEY  the local master key itself, base64, instead of the file
  ENVELOPE_ALSO_READ         comma-separated key URIs whose keys must still be read (another
                             KMS, or another master key of ENVELOPE_KMS's: a rewrap's destination,
                             listed before the rewrap starts, or its source, after)

Routes: POST /customers, GET /customers?email=... or ?limit=50&after=ID, GET|PUT|DELETE
/customers/{id}, GET /metrics. Ctrl-C (or SIGTERM) stops it and retires its data keys.";

#[tokio::main]
async fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        None => {}
        Some("-h" | "--help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("web-sqlx: unexpected argument {other:?}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    let config = match web_sqlx::Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("web-sqlx: {e}");
            return ExitCode::FAILURE;
        }
    };
    let port = config.port;
    let app = match web_sqlx::App::start(config).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("web-sqlx: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("web-sqlx: cannot listen on 127.0.0.1:{port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // PORT=0 takes a free port: say which.
    let port = listener.local_addr().map_or(port, |a| a.port());
    println!(
        "web-sqlx listening on http://127.0.0.1:{port} ({}; KMS {})",
        app.database(),
        app.keyring().provider_name()
    );
    let served = axum::serve(listener, app.router())
        .with_graceful_shutdown(stop_signal())
        .await;
    // A clean stop retires this process's data keys: the next process makes its own, and the
    // key table does not collect keys that nobody writes under any more.
    match app.keyring().retire_active_keys().await {
        Ok(n) => println!("web-sqlx stopped; retired {n} data key(s)"),
        Err(e) => eprintln!("web-sqlx: stopped, but retiring the data keys failed: {e}"),
    }
    if let Err(e) = served {
        eprintln!("web-sqlx: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Ctrl-C, or SIGTERM on Unix (what `docker stop` and systemd send).
async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
