//! What the operator sees: progress bars on a terminal (rows done, rows/s, ETA per column),
//! plain log lines when not on one, JSON lines with `--json`, and a final summary either way.
//! Nothing here prints a value: only names, counts and key ids.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use envelope_core::{KeyKind, KeyRecord};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::engine::{ColumnJob, Op, Stats};
use crate::job::JobSummary;

/// How output is shaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Output {
    /// Human text: bars on a terminal, log lines otherwise.
    Human,
    /// One JSON object per line on stdout.
    Json,
}

impl Output {
    /// A one-line message.
    pub(crate) fn line(&self, human: &str, json: serde_json::Value) {
        match self {
            Output::Human => println!("{human}"),
            Output::Json => println!("{json}"),
        }
    }

    /// The final summary.
    pub(crate) fn summary(&self, summary: &Summary) {
        match self {
            Output::Json => println!(
                "{}",
                serde_json::to_string(&serde_json::json!({"event": "summary", "summary": summary}))
                    .unwrap_or_default()
            ),
            Output::Human => summary.print(),
        }
        let _ = std::io::stdout().flush();
    }

    /// `envelope status`.
    /// `envelope keys list`: every key row, and with `counts` the values under each key per
    /// column (`table.column`), including values under keys the table no longer holds.
    pub(crate) fn keys(
        &self,
        key_table: &str,
        keys: &[KeyRecord],
        counts: Option<&BTreeMap<String, BTreeMap<String, i64>>>,
    ) {
        if *self == Output::Json {
            for k in keys {
                let mut json = key_json(k);
                if let Some(counts) = counts {
                    json["values"] =
                        serde_json::json!(counts.get(&k.id.to_hex()).cloned().unwrap_or_default());
                }
                println!("{}", serde_json::json!({"event": "key", "key": json}));
            }
            if let Some(counts) = counts {
                for (key, columns) in counts
                    .iter()
                    .filter(|(id, _)| !keys.iter().any(|k| k.id.to_hex() == **id))
                {
                    println!(
                        "{}",
                        serde_json::json!({"event": "values_without_key", "key_id": key, "values": columns})
                    );
                }
            }
            return;
        }
        if keys.is_empty() {
            println!("no keys in {key_table}");
        } else {
            println!(
                "{:<32}  {:<5}  {:<16}  {:<8}  {:<24}  {:<20}  RETIRED",
                "ID", "KIND", "SCOPE", "PROVIDER", "CMK", "CREATED"
            );
        }
        for k in keys {
            println!(
                "{:<32}  {:<5}  {:<16}  {:<8}  {:<24}  {:<20}  {}",
                k.id,
                k.kind.as_str(),
                k.scope,
                k.provider,
                k.cmk_id,
                time(k.created_at),
                k.retired_at.map_or_else(|| "-".to_owned(), time)
            );
            if let Some(counts) = counts {
                match counts.get(&k.id.to_hex()) {
                    Some(columns) => {
                        for (column, n) in columns {
                            println!("    {column}: {n} values");
                        }
                    }
                    None if k.kind == KeyKind::Data => {
                        println!("    no values in the configured columns")
                    }
                    None => {}
                }
            }
        }
        if let Some(counts) = counts {
            for (key, columns) in counts
                .iter()
                .filter(|(id, _)| !keys.iter().any(|k| k.id.to_hex() == **id))
            {
                let what = if key == "not-an-envelope" {
                    "values that are not envelopes (plaintext?)".to_owned()
                } else {
                    format!(
                        "values under key {key}, which is not in the key table (shredded, or from another database): unreadable"
                    )
                };
                println!("{what}:");
                for (column, n) in columns {
                    println!("    {column}: {n}");
                }
            }
        }
    }

    /// `envelope status`.
    pub(crate) fn status(&self, columns: &[ColumnKeys], jobs: &[JobSummary]) {
        if *self == Output::Json {
            for c in columns {
                println!("{}", serde_json::json!({"event": "column", "column": c}));
            }
            for j in jobs {
                println!("{}", serde_json::json!({"event": "job", "job": j}));
            }
            return;
        }
        println!("values per key id:");
        for c in columns {
            println!("  {}.{} ({})", c.table, c.column, c.label);
            if c.per_key.is_empty() {
                println!("    (no values)");
            }
            for (k, n) in &c.per_key {
                println!("    {k:<34} {n}");
            }
        }
        if jobs.is_empty() {
            println!("jobs: none recorded");
        }
        for j in jobs {
            let state = if j.done == j.ranges {
                "finished"
            } else if j.running() {
                "running"
            } else if j.leased > 0 {
                "interrupted: its process is gone, and its leases expire within --lease (run the same command again to resume)"
            } else {
                "interrupted (run the same command again to resume)"
            };
            println!(
                "job {}: {state}; ranges {}/{} done; rows seen {}, written {}, retried {}, failed {}",
                j.job, j.done, j.ranges, j.seen, j.written, j.retried, j.failed
            );
        }
    }
}

/// One column's values per key id, as `envelope status` shows them.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ColumnKeys {
    /// The table's configured name.
    pub(crate) table: String,
    /// The column's configured name.
    pub(crate) column: String,
    /// Its label.
    pub(crate) label: String,
    /// Values per key id (`not-an-envelope` for values that are not envelopes).
    pub(crate) per_key: BTreeMap<String, i64>,
}

/// A time as RFC 3339, to the second, in UTC.
fn time(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A key row as `--json` shows it: never the wrapped key.
pub(crate) fn key_json(k: &KeyRecord) -> serde_json::Value {
    serde_json::json!({
        "id": k.id.to_hex(),
        "kind": k.kind.as_str(),
        "scope": k.scope,
        "provider": k.provider,
        "cmk_id": k.cmk_id,
        "created_at": time(k.created_at),
        "retired_at": k.retired_at.map(time),
    })
}

/// The progress display, running on its own thread until [`Reporter::finish`].
pub(crate) struct Reporter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    bars: Vec<(Arc<Stats>, Option<ProgressBar>)>,
    output: Output,
    op: &'static str,
}

impl Reporter {
    /// Start showing progress of `columns`.
    pub(crate) fn start(output: &Output, op: &Op, columns: &[Arc<ColumnJob>]) -> Reporter {
        let terminal = *output == Output::Human && std::io::stderr().is_terminal();
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{prefix:>28} [{bar:30}] {pos}/{len} rows  ETA {eta}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bars: Vec<_> = columns
            .iter()
            .map(|c| {
                let bar = terminal.then(|| {
                    let b = multi.add(ProgressBar::new(
                        c.stats.total.load(Ordering::Relaxed).max(0) as u64,
                    ));
                    b.set_style(style.clone());
                    b.set_prefix(format!("{}.{}", c.table.name, c.column.config.name));
                    b
                });
                (c.stats.clone(), bar)
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let names: Vec<String> = columns.iter().map(|c| c.name.clone()).collect();
        let shared: Vec<_> = bars.iter().map(|(s, b)| (s.clone(), b.clone())).collect();
        let output_mode = *output;
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("envelope-progress".into())
            .spawn(move || {
                let started = Instant::now();
                let every = match (terminal, output_mode) {
                    (true, _) => Duration::from_millis(200),
                    (false, Output::Json) => Duration::from_secs(5),
                    (false, Output::Human) => Duration::from_secs(10),
                };
                let mut last = Instant::now();
                // When each column's job showed its first row, for its rows/s.
                let mut first_seen: Vec<Option<(Instant, i64)>> = vec![None; shared.len()];
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    if last.elapsed() < every {
                        continue;
                    }
                    last = Instant::now();
                    for (((stats, bar), name), first) in shared.iter().zip(&names).zip(&mut first_seen) {
                        let seen = stats.seen.load(Ordering::Relaxed);
                        if first.is_none() && seen > 0 {
                            *first = Some((Instant::now(), seen));
                        }
                        let column_rate = first.map_or(0.0, |(at, base)| {
                            (seen - base) as f64 / at.elapsed().as_secs_f64().max(1e-3)
                        });
                        let written = stats.written.load(Ordering::Relaxed);
                        let failed = stats.failed.load(Ordering::Relaxed);
                        match bar {
                            Some(b) if b.is_finished() => {}
                            Some(b) => {
                                b.set_position(seen.max(0) as u64);
                                b.set_message(format!(
                                    "{column_rate:.0} rows/s, written {written}, failed {failed}"
                                ));
                            }
                            None if seen > 0 && seen < stats.total.load(Ordering::Relaxed) => {
                                let rate = seen as f64 / started.elapsed().as_secs_f64().max(1e-3);
                                match output_mode {
                                    Output::Json => println!(
                                        "{}",
                                        serde_json::json!({
                                            "event": "progress", "job": name, "seen": seen,
                                            "total": stats.total.load(Ordering::Relaxed),
                                            "written": written, "failed": failed,
                                            "retried": stats.retried.load(Ordering::Relaxed),
                                            "rows_per_second": rate.round(),
                                        })
                                    ),
                                    Output::Human => eprintln!(
                                        "{name}: {seen}/{} rows, {written} written, {failed} failed, {:.0} rows/s",
                                        stats.total.load(Ordering::Relaxed),
                                        rate
                                    ),
                                }
                            }
                            None => {}
                        }
                    }
                }
            })
            .ok();
        Reporter {
            stop,
            thread,
            bars,
            output: *output,
            op: op.name(),
        }
    }

    /// A column's job ended (done, interrupted or failed).
    pub(crate) fn column_done(&self, job: &ColumnJob) {
        for (stats, bar) in &self.bars {
            if Arc::ptr_eq(stats, &job.stats) {
                if let Some(b) = bar {
                    b.set_position(stats.seen.load(Ordering::Relaxed).max(0) as u64);
                    b.finish();
                } else if self.output == Output::Human {
                    eprintln!(
                        "{}: {} finished its pass ({} rows seen)",
                        job.name,
                        self.op,
                        stats.seen.load(Ordering::Relaxed)
                    );
                }
            }
        }
    }

    /// Stop the display.
    pub(crate) fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One column's results.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ColumnSummary {
    /// The job name (`encrypt:customers.email`).
    pub(crate) job: String,
    /// The table.
    pub(crate) table: String,
    /// The column.
    pub(crate) column: String,
    /// Rows examined.
    pub(crate) seen: i64,
    /// Rows updated (a dry run: rows that would be).
    pub(crate) written: i64,
    /// Rows that lost a race with the application, re-read and retried.
    pub(crate) retried: i64,
    /// Rows still contended after every retry (left for the next run).
    pub(crate) contended: i64,
    /// Rows whose value failed, left untouched.
    pub(crate) failed: i64,
    /// Failures by error name.
    pub(crate) failures: BTreeMap<String, i64>,
    /// Keys of a few failing rows, with their error names.
    pub(crate) failing_rows: Vec<(String, String)>,
    /// Verify: plaintext values.
    pub(crate) plaintext: i64,
    /// Verify: rows whose source has a value and whose column has none yet.
    pub(crate) missing: i64,
    /// Verify: NULL values.
    pub(crate) nulls: i64,
    /// Verify: envelope values that differ from their source column's value.
    pub(crate) differs_from_source: i64,
    /// Verify: values per key id that open.
    pub(crate) per_key: BTreeMap<String, i64>,
}

/// The whole command's results.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Summary {
    /// The command.
    pub(crate) command: &'static str,
    /// Whether nothing was written.
    pub(crate) dry_run: bool,
    /// Per column.
    pub(crate) columns: Vec<ColumnSummary>,
}

impl Summary {
    /// Collect the counters.
    pub(crate) fn of(op: &Op, columns: &[Arc<ColumnJob>], dry_run: bool) -> Summary {
        let get = |a: &std::sync::atomic::AtomicI64| a.load(Ordering::Relaxed);
        Summary {
            command: op.name(),
            dry_run,
            columns: columns
                .iter()
                .map(|c| {
                    let s = &c.stats;
                    ColumnSummary {
                        job: c.name.clone(),
                        table: c.table.name.clone(),
                        column: c.column.config.name.clone(),
                        seen: get(&s.seen),
                        written: get(&s.written),
                        retried: get(&s.retried),
                        contended: get(&s.contended),
                        failed: get(&s.failed),
                        failures: s.failures.lock().map(|f| f.clone()).unwrap_or_default(),
                        failing_rows: s.samples.lock().map(|f| f.clone()).unwrap_or_default(),
                        plaintext: get(&s.plaintext),
                        missing: get(&s.missing),
                        nulls: get(&s.nulls),
                        differs_from_source: get(&s.differs),
                        per_key: s.per_key.lock().map(|f| f.clone()).unwrap_or_default(),
                    }
                })
                .collect(),
        }
    }

    /// What makes the command exit 1, if anything.
    pub(crate) fn problem(&self, op: &Op) -> Option<String> {
        let failed: i64 = self.columns.iter().map(|c| c.failed).sum();
        let plaintext: i64 = self.columns.iter().map(|c| c.plaintext + c.missing).sum();
        let contended: i64 = self.columns.iter().map(|c| c.contended).sum();
        let mut parts = Vec::new();
        if failed > 0 {
            parts.push(format!(
                "{failed} value(s) failed (do not open, or are not valid for their type) and were left untouched: see the failures by name above"
            ));
        }
        if matches!(op, Op::Verify) && plaintext > 0 {
            parts.push(format!(
                "{plaintext} value(s) are not encrypted yet (run `envelope encrypt`)"
            ));
        }
        if contended > 0 {
            parts.push(format!(
                "{contended} row(s) kept changing under the tool and were left as they are: run the command again"
            ));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    fn print(&self) {
        let verb = if self.dry_run {
            "would write"
        } else {
            "written"
        };
        println!(
            "{} summary{}:",
            self.command,
            if self.dry_run {
                " (dry run: nothing was written)"
            } else {
                ""
            }
        );
        for c in &self.columns {
            if self.command == "verify" {
                println!(
                    "  {}.{}: {} rows; {} open, {} plaintext, {} not yet encrypted, {} NULL, {} failed",
                    c.table,
                    c.column,
                    c.seen,
                    c.per_key.values().sum::<i64>(),
                    c.plaintext,
                    c.missing,
                    c.nulls,
                    c.failed
                );
                for (k, n) in &c.per_key {
                    println!("      key {k}: {n}");
                }
                if c.differs_from_source > 0 {
                    println!(
                        "      {} value(s) differ from their source column (does every writer update both columns?)",
                        c.differs_from_source
                    );
                }
            } else {
                println!(
                    "  {}.{}: {} rows seen, {} {verb}, {} retried after concurrent writes, {} failed",
                    c.table, c.column, c.seen, c.written, c.retried, c.failed
                );
            }
            for (name, n) in &c.failures {
                println!("      failed with {name}: {n}");
            }
            for (pk, name) in &c.failing_rows {
                println!("      e.g. key {pk}: {name}");
            }
            if c.contended > 0 {
                println!(
                    "      {} rows still contended (left for the next run)",
                    c.contended
                );
            }
        }
    }
}
