//! The migration engine: keyset batches over one column, one transaction per batch with its
//! checkpoint, compare-and-set on every column read or written, and the one rule that tells
//! plaintext from envelope values (docs/FORMAT.md section 2.2).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envelope_core::{Category, Error, KeyId, Keyring};
use sqlx::any::AnyRow;
use zeroize::Zeroizing;

use crate::config::Form;
use crate::db::{Context, Db, DbError, ErrorClass, Pk, Raw};
use crate::job::{Claim, Counts, Jobs, Range};
use crate::plan::{ColumnPlan, TablePlan};
use crate::retry::Backoff;
use crate::sql::{Dialect, Shape};

mod cas;
mod decide;

use cas::Cas;
use decide::Rules;

/// What a job does to each value.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    /// Plaintext becomes an envelope value (with its blind index).
    Encrypt,
    /// Envelope values become plaintext again.
    Decrypt,
    /// Values under these keys are sealed again under the current data key.
    Rotate(Arc<HashSet<KeyId>>),
    /// Read-only: classify and count.
    Verify,
    /// Blind indexes are recomputed from the decrypted values under the label's live index key
    /// (`rotate --index`); the encrypted column is compared, never changed.
    Reindex,
}

impl Op {
    /// The command's name.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::Rotate(_) => "rotate",
            Op::Verify => "verify",
            Op::Reindex => "reindex",
        }
    }
}

/// How a job runs.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    /// Rows per batch (the starting size with `chunk_time`).
    pub(crate) batch: usize,
    /// Adapt the batch size to this transaction time.
    pub(crate) chunk_time: Option<Duration>,
    /// At most this many rows per second, over all workers.
    pub(crate) max_rate: Option<f64>,
    /// Parallel workers (primary-key ranges) in this process.
    pub(crate) workers: usize,
    /// Take only ranges `r` with `r % n == i`.
    pub(crate) shard: Option<(u32, u32)>,
    /// How long a range stays leased without a checkpoint.
    pub(crate) lease: Duration,
    /// Examine at most this many rows per column.
    pub(crate) limit: Option<u64>,
    /// Count what would change; write nothing.
    pub(crate) dry_run: bool,
    /// Keep retrying a database or KMS that fails for this long before giving up (exit 3).
    pub(crate) patience: Duration,
    /// Integer key ranges of about this many keys.
    pub(crate) range_rows: i64,
    /// Test hook: sleep between a batch's read and its writes.
    pub(crate) pause_after_read: Option<Duration>,
    /// Benchmark baseline: the same job with the cryptography switched off (values are written
    /// back as they were read). Never for real data.
    pub(crate) no_crypto: bool,
}

/// Live counters of one column's job (shared by its workers and the progress display).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Rows examined.
    pub(crate) seen: AtomicI64,
    /// Rows updated (or, on a dry run, that would be).
    pub(crate) written: AtomicI64,
    /// Rows that lost a race with the application and were re-read.
    pub(crate) retried: AtomicI64,
    /// Rows whose value failed, left untouched.
    pub(crate) failed: AtomicI64,
    /// Rows still contended after every retry, left for the next run.
    pub(crate) contended: AtomicI64,
    /// Verify: plaintext values in the column.
    pub(crate) plaintext: AtomicI64,
    /// Verify: rows whose source has a value but whose column does not.
    pub(crate) missing: AtomicI64,
    /// Verify: NULLs.
    pub(crate) nulls: AtomicI64,
    /// Verify: rows whose envelope value differs from their source column's value.
    pub(crate) differs: AtomicI64,
    /// Rows the table holds (an estimate for the progress display).
    pub(crate) total: AtomicI64,
    /// Failures by error name.
    pub(crate) failures: Mutex<BTreeMap<String, i64>>,
    /// A few failing rows' keys, with their error names.
    pub(crate) samples: Mutex<Vec<(String, String)>>,
    /// Verify / status: values per key id.
    pub(crate) per_key: Mutex<BTreeMap<String, i64>>,
}

impl Stats {
    fn fail(&self, pk: &Pk, name: &str) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut f) = self.failures.lock() {
            *f.entry(name.to_owned()).or_default() += 1;
        }
        if let Ok(mut s) = self.samples.lock()
            && s.len() < 10
        {
            s.push((pk.to_checkpoint(), name.to_owned()));
        }
    }
}

/// Why a job stopped early.
#[derive(Debug)]
pub(crate) enum Stop {
    /// SIGINT / SIGTERM: the current batch was committed.
    Interrupted,
    /// The database or the KMS kept failing for longer than the patience.
    Unavailable(String),
    /// The database refused a value outside a row's compare-and-set (exit 1).
    Failed(String),
}

/// Everything the workers share.
pub(crate) struct Engine {
    /// The database.
    pub(crate) db: Db,
    /// The job table.
    pub(crate) jobs: Jobs,
    /// The keyring (its data keys are committed to the key table before use).
    pub(crate) keyring: Keyring,
    /// The settings.
    pub(crate) settings: Settings,
    /// Set by the signal handler.
    pub(crate) stop: Arc<AtomicBool>,
    /// This process's lease owner name.
    pub(crate) owner: String,
    rate: Mutex<Option<Instant>>,
}

/// One column's job.
pub(crate) struct ColumnJob {
    /// The table.
    pub(crate) table: TablePlan,
    /// The column.
    pub(crate) column: ColumnPlan,
    /// What to do.
    pub(crate) op: Op,
    /// The job's name in the job table.
    pub(crate) name: String,
    /// Parameters stored with the job (rotate: its key ids).
    pub(crate) params: Option<String>,
    /// The counters.
    pub(crate) stats: Arc<Stats>,
    remaining: Option<AtomicI64>,
}

impl ColumnJob {
    /// A job for `column` of `table`.
    pub(crate) fn new(
        table: TablePlan,
        column: ColumnPlan,
        op: Op,
        params: Option<String>,
        limit: Option<u64>,
    ) -> ColumnJob {
        let name = format!("{}:{}.{}", op.name(), table.name, column.config.name);
        ColumnJob {
            table,
            column,
            op,
            name,
            params,
            stats: Arc::new(Stats::default()),
            remaining: limit.map(|l| AtomicI64::new(l.min(i64::MAX as u64) as i64)),
        }
    }

    /// Whether the job reads the source column.
    fn reads_source(&self) -> bool {
        self.column.source_read.is_some()
            && matches!(self.op, Op::Encrypt | Op::Decrypt | Op::Verify)
    }

    /// Whether the job reads the blind-index column (and, when it writes, compares it).
    fn reads_index(&self) -> bool {
        self.column.index.is_some() && matches!(self.op, Op::Encrypt | Op::Reindex | Op::Verify)
    }

    /// The shape of the encrypted column's values.
    fn target_shape(&self) -> Shape {
        match self.column.config.form {
            Form::Binary => Shape::Bytes,
            Form::Text => Shape::Text,
        }
    }

    /// The shape of the source column's values.
    fn source_shape(&self) -> Shape {
        self.column.config.ty.source_shape()
    }
}

/// A row as read.
#[derive(Clone, Debug)]
struct Read {
    pk: Pk,
    target: Raw,
    source: Option<Raw>,
    index: Option<Raw>,
}

/// An update: the new values of the columns the job writes.
#[derive(Debug)]
struct Update {
    read: Read,
    target: Raw,
    source: Option<Raw>,
    index: Option<Raw>,
}

/// What a stored value is, by the one rule.
enum Stored {
    Null,
    Plain(Vec<u8>),
    Sealed {
        key: KeyId,
        plaintext: Zeroizing<Vec<u8>>,
    },
    Failed(&'static str),
}

/// An error that stops the batch (the database or the KMS), as opposed to one value failing.
enum BatchError {
    Db(DbError),
    Kms(Error),
}

impl From<DbError> for BatchError {
    fn from(e: DbError) -> Self {
        BatchError::Db(e)
    }
}

impl Engine {
    /// An engine over `db`.
    pub(crate) fn new(
        db: Db,
        jobs: Jobs,
        keyring: Keyring,
        settings: Settings,
        stop: Arc<AtomicBool>,
    ) -> Engine {
        let host = crate::job::this_host();
        let tag: u32 = rand::random();
        Engine {
            db,
            jobs,
            keyring,
            settings,
            stop,
            owner: format!("{host}:{}:{tag:08x}", std::process::id()),
            rate: Mutex::new(None),
        }
    }

    /// Run a column's job to the end (or to `--limit`, an interruption, or an outage).
    ///
    /// # Errors
    /// [`Stop`].
    pub(crate) async fn run(self: &Arc<Self>, job: Arc<ColumnJob>) -> Result<(), Stop> {
        if self.settings.dry_run || matches!(job.op, Op::Verify) {
            // Read-only: one pass over the whole key space, no leases, no checkpoints.
            let range = Range {
                no: 0,
                start: None,
                end: None,
                last: None,
            };
            return self.run_range(&job, range).await;
        }
        // Keys are made before any batch transaction opens: on SQLite a key-table insert from
        // the keyring's own connection would wait for the batch's write lock.
        self.retrying(|| self.prepare_keys(&job)).await?;
        self.retrying(|| async {
            self.jobs
                .prepare(
                    &job.name,
                    &job.table,
                    self.settings.range_rows,
                    job.params.as_deref(),
                )
                .await
                .map(drop)
                .map_err(BatchError::Db)
        })
        .await?;
        let mut workers = Vec::new();
        for _ in 0..self.settings.workers.max(1) {
            let engine = self.clone();
            let job = job.clone();
            workers.push(tokio::spawn(async move { engine.worker(job).await }));
        }
        let mut outcome = Ok(());
        for w in workers {
            let r = w
                .await
                .unwrap_or_else(|e| Err(Stop::Unavailable(format!("a worker failed: {e}"))));
            if outcome.is_ok() {
                outcome = r;
            }
        }
        outcome
    }

    async fn worker(self: Arc<Self>, job: Arc<ColumnJob>) -> Result<(), Stop> {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(Stop::Interrupted);
            }
            if job
                .remaining
                .as_ref()
                .is_some_and(|r| r.load(Ordering::Relaxed) <= 0)
            {
                return Ok(());
            }
            let claim = self
                .retrying(|| async {
                    self.jobs
                        .claim(
                            &job.name,
                            &self.owner,
                            self.settings.lease,
                            self.settings.shard,
                            job.table.pk_kind,
                        )
                        .await
                        .map_err(BatchError::Db)
                })
                .await?;
            match claim {
                Claim::Finished => return Ok(()),
                Claim::Wait(d) => tokio::time::sleep(d).await,
                Claim::Range(range) => {
                    let no = range.no;
                    let r = self.run_range(&job, range).await;
                    if r.is_err()
                        || job
                            .remaining
                            .as_ref()
                            .is_some_and(|r| r.load(Ordering::Relaxed) <= 0)
                    {
                        // Hand the range back so a rerun takes it at once.
                        let _ = self.jobs.release(&job.name, no, &self.owner).await;
                    }
                    r?;
                }
            }
        }
    }

    /// Make sure the keys a batch needs exist in the key table: the scope's active data key,
    /// and the column's blind-index key.
    async fn prepare_keys(&self, job: &ColumnJob) -> Result<(), BatchError> {
        if !matches!(job.op, Op::Encrypt | Op::Rotate(_) | Op::Reindex) {
            return Ok(());
        }
        if !matches!(job.op, Op::Reindex) {
            self.keyring.warm().await.map_err(BatchError::Kms)?;
        }
        if let (Op::Encrypt | Op::Reindex, Some(b)) = (&job.op, &job.column.config.blind_index) {
            self.keyring
                .blind_index(&b.spec, b"")
                .await
                .map_err(BatchError::Kms)?;
        }
        Ok(())
    }

    /// Retry `f` on database and KMS failures, backing off, for up to the patience.
    async fn retrying<T, F, Fut>(&self, mut f: F) -> Result<T, Stop>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, BatchError>>,
    {
        let mut backoff = Backoff::new(self.settings.patience);
        loop {
            let message = match f().await {
                Ok(v) => return Ok(v),
                Err(BatchError::Db(e)) => match e.class() {
                    ErrorClass::Connection | ErrorClass::Transient => e.to_string(),
                    // A value the database refused outside a compare-and-set (which fails
                    // that row): named by its class, never by the server's message, which
                    // can quote the value.
                    ErrorClass::Value(name) => {
                        return Err(Stop::Failed(format!(
                            "{}: the database refused a value ({name})",
                            e.context
                        )));
                    }
                    ErrorClass::Other => return Err(Stop::Unavailable(e.to_string())),
                },
                // The KMS or the key table: what may come back is retried; a setting, a master
                // key or the program that must change first is not.
                Err(BatchError::Kms(e)) if e.category() == Category::Service => {
                    format!("the KMS or the key table failed: {e}")
                }
                Err(BatchError::Kms(e)) => {
                    return Err(Stop::Unavailable(format!(
                        "the KMS or the key table failed: {}",
                        e.report()
                    )));
                }
            };
            if backoff.spent() {
                return Err(Stop::Unavailable(message));
            }
            if self.stop.load(Ordering::Relaxed) {
                return Err(Stop::Interrupted);
            }
            backoff.wait(&message).await;
        }
    }

    async fn throttle(&self, rows: usize) {
        let Some(rate) = self.settings.max_rate else {
            return;
        };
        let start = {
            let Ok(mut next) = self.rate.lock() else {
                return;
            };
            let now = Instant::now();
            let start = next.map_or(now, |n| n.max(now));
            *next = Some(start + Duration::from_secs_f64(rows as f64 / rate));
            start
        };
        tokio::time::sleep_until(start.into()).await;
    }

    async fn run_range(&self, job: &ColumnJob, mut range: Range) -> Result<(), Stop> {
        let mut batch = self.settings.batch.max(1);
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(Stop::Interrupted);
            }
            let mut n = batch;
            if let Some(rem) = &job.remaining {
                let left = rem.load(Ordering::Relaxed);
                if left <= 0 {
                    return Ok(());
                }
                n = n.min(left as usize);
            }
            self.throttle(n).await;
            let started = Instant::now();
            let outcome = self.retrying(|| self.batch(job, &range, n)).await?;
            if let Some(rem) = &job.remaining {
                rem.fetch_sub(outcome.rows as i64, Ordering::Relaxed);
            }
            if let Some(target) = self.settings.chunk_time {
                let took = started.elapsed().as_secs_f64().max(1e-4);
                let ideal = n as f64 * target.as_secs_f64() / took;
                // Move halfway (geometrically) toward the size that meets the target.
                batch = ((n as f64 * ideal).sqrt() as usize).clamp(10, 50_000);
            }
            match outcome.last {
                Some(last) if !outcome.done => range.last = Some(last),
                _ => return Ok(()),
            }
        }
    }

    /// One batch: read, decide, compare-and-set, checkpoint, commit.
    async fn batch(
        &self,
        job: &ColumnJob,
        range: &Range,
        n: usize,
    ) -> Result<BatchOutcome, BatchError> {
        let d = self.db.dialect;
        let what = || format!("{} batch on {}", job.op.name(), job.name);
        let read_only = self.settings.dry_run || matches!(job.op, Op::Verify);
        if !read_only {
            // A data key that reached its age or use limit is replaced now, outside the
            // transaction (see `prepare_keys`).
            self.prepare_keys(job).await?;
        }
        let mut conn = self.db.pool.acquire().await.context(what)?;
        let begin = if read_only { "BEGIN" } else { d.begin_write() };
        let mut tx = sqlx::Connection::begin_with(&mut *conn, begin)
            .await
            .context(what)?;

        let mut filter = Vec::new();
        let mut p = 0;
        let mut next = || {
            p += 1;
            d.param(p)
        };
        if range.resume_after().is_some() {
            filter.push(format!(
                "{} > {}",
                job.table.pk,
                job.table.pk_kind.bound(&next())
            ));
        }
        if range.end.is_some() {
            filter.push(format!(
                "{} <= {}",
                job.table.pk,
                job.table.pk_kind.bound(&next())
            ));
        }
        let sql = format!(
            "SELECT {} FROM {}{}{} ORDER BY {} LIMIT {n}",
            select_list(d, job),
            job.table.table,
            if filter.is_empty() { "" } else { " WHERE " },
            filter.join(" AND "),
            job.table.pk
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        if let Some(after) = range.resume_after() {
            q = after.bind(q);
        }
        if let Some(end) = &range.end {
            q = end.bind(q);
        }
        let rows = q.fetch_all(&mut *tx).await.context(what)?;
        let reads = rows
            .iter()
            .map(|r| parse_row(job, r))
            .collect::<Result<Vec<_>, _>>()
            .context(what)?;
        drop(rows);
        let done = reads.len() < n;
        let last = reads.last().map(|r| r.pk.clone());
        if let Some(pause) = self.settings.pause_after_read {
            tokio::time::sleep(pause).await;
        }

        let mut counts = Counts {
            seen: reads.len() as i64,
            ..Counts::default()
        };
        let mut failures: Vec<(Pk, &'static str)> = Vec::new();
        let mut verify = VerifyCounts::default();
        let rules = Rules {
            keyring: &self.keyring,
            settings: &self.settings,
            dialect: d,
        };
        let mut pending = reads;
        let mut contended = 0;
        for attempt in 0..4 {
            let mut updates = Vec::new();
            for read in pending.drain(..) {
                match rules.decide(job, read, &mut verify).await? {
                    Decision::Skip => {}
                    Decision::Fail(pk, name) => failures.push((pk, name)),
                    Decision::Write(u) => updates.push(u),
                }
            }
            if read_only {
                counts.written += updates.len() as i64;
                break;
            }
            let Cas { missed, refused } = cas::compare_and_set(d, &mut tx, job, &updates)
                .await
                .context(what)?;
            counts.written += (updates.len() - missed.len() - refused.len()) as i64;
            failures.extend(refused);
            if missed.is_empty() {
                break;
            }
            if attempt == 3 {
                contended = missed.len() as i64;
                break;
            }
            counts.retried += missed.len() as i64;
            pending = cas::reread(d, &mut tx, job, &missed).await.context(what)?;
        }
        counts.failed = failures.len() as i64;

        if !read_only {
            let ok = self
                .jobs
                .checkpoint(
                    &mut tx,
                    &job.name,
                    range.no,
                    &self.owner,
                    last.as_ref(),
                    counts,
                    self.settings.lease,
                    done,
                )
                .await?;
            if !ok {
                // Another worker took the range over (this batch outlived the lease): nothing of
                // it may land, and the range is theirs now.
                tx.rollback().await.context(what)?;
                eprintln!(
                    "envelope: range {} of {} was taken over by another worker (a batch outlived --lease); moving on",
                    range.no, job.name
                );
                return Ok(BatchOutcome {
                    rows: 0,
                    last: None,
                    done: true,
                });
            }
        }
        tx.commit().await.context(what)?;

        // Only committed work is counted.
        let s = &job.stats;
        s.seen.fetch_add(counts.seen, Ordering::Relaxed);
        s.written.fetch_add(counts.written, Ordering::Relaxed);
        s.retried.fetch_add(counts.retried, Ordering::Relaxed);
        s.contended.fetch_add(contended, Ordering::Relaxed);
        for (pk, name) in &failures {
            s.fail(pk, name);
        }
        verify.add_to(s);
        Ok(BatchOutcome {
            rows: counts.seen as usize,
            last,
            done,
        })
    }
}
/// The columns a batch reads, in the order `parse_row` takes them.
fn select_list(d: Dialect, job: &ColumnJob) -> String {
    let mut cols = vec![
        job.table.pk_kind.read(d, &job.table.pk),
        job.column.target.clone(),
    ];
    if job.reads_source() {
        cols.extend(job.column.source_read.clone());
    }
    if job.reads_index() {
        cols.extend(job.column.index.clone());
    }
    cols.join(", ")
}

/// A row as `select_list` reads it.
fn parse_row(job: &ColumnJob, row: &AnyRow) -> Result<Read, sqlx::Error> {
    let mut i = 2;
    let source = if job.reads_source() {
        i += 1;
        Some(Raw::get(row, i - 1, job.source_shape())?)
    } else {
        None
    };
    let index = if job.reads_index() {
        Some(Raw::get(row, i, Shape::Bytes)?)
    } else {
        None
    };
    Ok(Read {
        pk: Pk::get(row, 0, job.table.pk_kind)?,
        target: Raw::get(row, 1, job.target_shape())?,
        source,
        index,
    })
}

#[derive(Debug)]
enum Decision {
    Skip,
    Fail(Pk, &'static str),
    Write(Update),
}

struct BatchOutcome {
    rows: usize,
    last: Option<Pk>,
    done: bool,
}

#[derive(Default)]
struct VerifyCounts {
    plaintext: i64,
    missing: i64,
    nulls: i64,
    differs: i64,
    per_key: HashMap<String, i64>,
}

impl VerifyCounts {
    fn add_to(self, s: &Stats) {
        s.plaintext.fetch_add(self.plaintext, Ordering::Relaxed);
        s.missing.fetch_add(self.missing, Ordering::Relaxed);
        s.differs.fetch_add(self.differs, Ordering::Relaxed);
        s.nulls.fetch_add(self.nulls, Ordering::Relaxed);
        if let Ok(mut k) = s.per_key.lock() {
            for (id, n) in self.per_key {
                *k.entry(id).or_default() += n;
            }
        }
    }
}
