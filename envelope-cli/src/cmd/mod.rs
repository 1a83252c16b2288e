//! One module per command (sqlx-cli's layout), and the dispatch from the parsed command line.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::cli::{Cli, Command, Global, KeysCommand, RunArgs};
use crate::config::{self, Config, Overrides};
use crate::engine::{Op, Settings};
use crate::error::Failure;
use crate::report::Output;

mod init;
mod keys;
mod local;
mod migrate;
mod rewrap;
mod rotate_index;
mod status;

/// Run the command `cli` names.
pub(crate) fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::KmsEmulator(args) => local::kms_emulator(args),
        Command::Keygen { out } => local::keygen(&out),
        Command::Inspect { value } => local::inspect(&value),
        Command::Init => on_database(cli.global, |config, output, _| async move {
            init::init(&config, &output).await
        }),
        Command::Status => on_database(cli.global, |config, output, _| async move {
            status::status(&config, &output).await
        }),
        Command::Encrypt { run } => on_database(cli.global, |config, output, stop| async move {
            migrate::migrate(&config, Op::Encrypt, None, run.options(output), stop).await
        }),
        Command::Verify { run } => on_database(cli.global, |config, output, stop| async move {
            migrate::migrate(&config, Op::Verify, None, run.options(output), stop).await
        }),
        Command::Decrypt { run, yes } => {
            on_database(cli.global, |config, output, stop| async move {
                if !yes && !run.dry_run {
                    return Err(Failure::Usage(
                    "decrypt writes plaintext back into the database: pass --yes to confirm (or --dry-run to count)".into(),
                ));
                }
                migrate::migrate(&config, Op::Decrypt, None, run.options(output), stop).await
            })
        }
        Command::Rotate {
            run,
            index: Some(index),
            key_refresh,
            ..
        } => on_database(cli.global, |config, output, stop| async move {
            rotate_index::rotate_index(&config, &index, key_refresh, run.options(output), stop)
                .await
        }),
        Command::Rotate {
            run,
            keys,
            older_than,
            retired,
            index: None,
            ..
        } => on_database(cli.global, |config, output, stop| async move {
            let selection = migrate::RotateSelection {
                keys,
                older_than,
                retired,
            };
            let op = Op::Rotate(Arc::default());
            migrate::migrate(&config, op, Some(selection), run.options(output), stop).await
        }),
        Command::Keys { command } => on_database(cli.global, |config, output, stop| async move {
            match command {
                KeysCommand::List { scope, count } => {
                    keys::list(&config, scope.as_deref(), count, &output).await
                }
                KeysCommand::Rewrap { to, patience } => {
                    rewrap::rewrap(&config, &to, patience, &output, stop).await
                }
                KeysCommand::Retire {
                    keys,
                    scope,
                    label,
                    older_than,
                } => {
                    let selection = keys::Selection {
                        keys,
                        scope,
                        label,
                        older_than,
                    };
                    keys::retire(&config, &selection, &output).await
                }
                KeysCommand::Shred {
                    keys,
                    scope,
                    label,
                    yes,
                    force,
                    key_refresh,
                } => {
                    let selection = keys::Selection {
                        keys,
                        scope,
                        label,
                        older_than: None,
                    };
                    let safety = keys::ShredSafety {
                        yes,
                        force,
                        key_refresh,
                    };
                    keys::shred(&config, &selection, safety, &output).await
                }
            }
        }),
    }
}

/// Run a command that works on the configured database: load the configuration, start the
/// runtime and the signal handler, and hand `command` the configuration, the output and the
/// stop flag.
fn on_database<F, Fut>(global: Global, command: F) -> Result<(), Failure>
where
    F: FnOnce(Config, Output, Arc<AtomicBool>) -> Fut,
    Fut: Future<Output = Result<(), Failure>>,
{
    let path = config::config_path(global.config.as_deref());
    let config = config::load(
        &path,
        Overrides {
            database_url: global.database_url,
            kms: global.kms,
        },
    )?;
    let output = if global.json {
        Output::Json
    } else {
        Output::Human
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::Unavailable(format!("starting the runtime: {e}")))?;
    runtime.block_on(async move {
        let stop = Arc::new(AtomicBool::new(false));
        spawn_signal_handler(stop.clone(), output);
        command(config, output, stop).await
    })
}

impl RunArgs {
    /// The options of a migration command.
    fn options(self, output: Output) -> migrate::RunOptions {
        #[cfg(feature = "bench-baseline")]
        let no_crypto = self.debug_no_crypto;
        #[cfg(not(feature = "bench-baseline"))]
        let no_crypto = false;
        migrate::RunOptions {
            table: self.table,
            column: self.column,
            settings: Settings {
                batch: self.batch_size as usize,
                chunk_time: self.chunk_time,
                max_rate: self.max_rate.filter(|r| *r > 0.0),
                workers: self.workers as usize,
                shard: self.shard,
                lease: self.lease,
                limit: self.limit,
                dry_run: self.dry_run,
                patience: self.patience,
                range_rows: self.range_size.max(1),
                pause_after_read: self.debug_pause_after_read,
                no_crypto,
            },
            output,
        }
    }
}

/// SIGINT / SIGTERM: finish the current batch, checkpoint, exit 130. A second signal exits at
/// once (the uncommitted batch rolls back; the checkpoint still holds).
fn spawn_signal_handler(stop: Arc<AtomicBool>, output: Output) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                if stop.swap(true, Ordering::SeqCst) {
                    std::process::exit(130);
                }
                if output == Output::Human {
                    eprintln!(
                        "envelope: stopping after the current batch (signal again to stop at once)"
                    );
                }
            }
        }
        #[cfg(not(unix))]
        {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.store(true, Ordering::SeqCst);
            }
        }
    });
}
