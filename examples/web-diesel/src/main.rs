//! `cargo run -p web-diesel`: serves the patient register on 127.0.0.1:3001 (`PORT` overrides)
//! with SQLite in `web-diesel.db` and the local KMS (`envelope-master.key`), or with
//! `DATABASE_URL` (and the features `postgres` / `mysql`) and `ENVELOPE_KMS` (see the crate docs).
#![forbid(unsafe_code)]

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = match web_diesel::Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("web-diesel: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let port = config.port;
    let app = match web_diesel::App::start(config).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("web-diesel: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("web-diesel: cannot listen on 127.0.0.1:{port}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // PORT=0 takes a free port: say which.
    let port = listener.local_addr().map_or(port, |a| a.port());
    println!(
        "web-diesel listening on http://127.0.0.1:{port} ({}; KMS {})",
        app.database(),
        app.keyring().provider_name()
    );
    // Ctrl-C stops it cleanly, and the guard then retires this process's data keys.
    let _retire = app.keyring().retire_on_drop();
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    if let Err(e) = axum::serve(listener, app.router())
        .with_graceful_shutdown(stop)
        .await
    {
        eprintln!("web-diesel: {e}");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
