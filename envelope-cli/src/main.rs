//! `envelope`: the operator's command. Migrations over live tables (`init`, `encrypt`,
//! `decrypt`, `rotate`, `verify`, `status`, driven by `envelope.toml`), the key table's
//! lifecycle (`keys`), plus `keygen` (a local master key file), `inspect` (a stored value's
//! header) and `kms-emulator` (a local Tencent-compatible KMS). docs/MIGRATING.md is the
//! operator's playbook; docs/ARCHITECTURE.md maps these modules.
//!
//! The binary is the interface: no module here is public.
#![forbid(unsafe_code)]

mod cli;
mod cmd;
mod config;
mod context;
mod db;
mod engine;
mod error;
mod field;
mod job;
mod plan;
mod report;
mod retry;
mod sql;
mod values;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    match cmd::run(cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("envelope: {failure}");
            ExitCode::from(failure.code())
        }
    }
}
