//! `cargo run -p web-sqlx`: serves the customer API on 127.0.0.1:3000 (`PORT` overrides) with
//! SQLite in `web-sqlx.db` and the local KMS (`envelope-master.key`), or with `DATABASE_URL`
//! and `ENVELOPE_KMS=tencent` (see the crate docs).
#![forbid(unsafe_code)]

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = match web_sqlx::Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("web-sqlx: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let port = config.port;
    let app = match web_sqlx::App::start(config).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("web-sqlx: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("web-sqlx: cannot listen on 127.0.0.1:{port}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!(
        "web-sqlx listening on http://127.0.0.1:{port} ({}; KMS {})",
        app.database(),
        app.keyring().provider_name()
    );
    if let Err(e) = axum::serve(listener, app.router()).await {
        eprintln!("web-sqlx: {e}");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
