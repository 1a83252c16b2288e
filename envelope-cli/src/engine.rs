//! The migration engine: keyset batches over one column, one transaction per batch with its
//! checkpoint, compare-and-set on every column read or written, and the one rule that tells
//! plaintext from envelope values (docs/FORMAT.md section 2.2).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envelope_core::{Error, KeyId, Keyring, format};
use sqlx::AnyConnection;
use sqlx::any::{AnyArguments, AnyRow};
use zeroize::Zeroizing;

use crate::config::Form;
use crate::db::{
    ColumnPlan, Context, Db, DbError, Dialect, ErrorClass, Pk, Raw, Shape, TablePlan, classify,
};
use crate::job::{Claim, Counts, Jobs, Range};
use crate::values;

/// What a job does to each value.
#[derive(Clone, Debug)]
pub enum Op {
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
    pub fn name(&self) -> &'static str {
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
pub struct Settings {
    /// Rows per batch (the starting size with `chunk_time`).
    pub batch: usize,
    /// Adapt the batch size to this transaction time.
    pub chunk_time: Option<Duration>,
    /// At most this many rows per second, over all workers.
    pub max_rate: Option<f64>,
    /// Parallel workers (primary-key ranges) in this process.
    pub workers: usize,
    /// Take only ranges `r` with `r % n == i`.
    pub shard: Option<(u32, u32)>,
    /// How long a range stays leased without a checkpoint.
    pub lease: Duration,
    /// Examine at most this many rows per column.
    pub limit: Option<u64>,
    /// Count what would change; write nothing.
    pub dry_run: bool,
    /// Keep retrying a database or KMS that fails for this long before giving up (exit 3).
    pub patience: Duration,
    /// Integer key ranges of about this many keys.
    pub range_rows: i64,
    /// Test hook: sleep between a batch's read and its writes.
    pub pause_after_read: Option<Duration>,
    /// Benchmark baseline: the same job with the cryptography switched off (values are written
    /// back as they were read). Never for real data.
    pub no_crypto: bool,
}

/// Live counters of one column's job (shared by its workers and the progress display).
#[derive(Debug, Default)]
pub struct Stats {
    /// Rows examined.
    pub seen: AtomicI64,
    /// Rows updated (or, on a dry run, that would be).
    pub written: AtomicI64,
    /// Rows that lost a race with the application and were re-read.
    pub retried: AtomicI64,
    /// Rows whose value failed, left untouched.
    pub failed: AtomicI64,
    /// Rows still contended after every retry, left for the next run.
    pub contended: AtomicI64,
    /// Verify: plaintext values in the column.
    pub plaintext: AtomicI64,
    /// Verify: rows whose source has a value but whose column does not.
    pub missing: AtomicI64,
    /// Verify: NULLs.
    pub nulls: AtomicI64,
    /// Verify: rows whose envelope value differs from their source column's value.
    pub differs: AtomicI64,
    /// Rows the table holds (an estimate for the progress display).
    pub total: AtomicI64,
    /// Failures by error name.
    pub failures: Mutex<BTreeMap<String, i64>>,
    /// A few failing rows' keys, with their error names.
    pub samples: Mutex<Vec<(String, String)>>,
    /// Verify / status: values per key id.
    pub per_key: Mutex<BTreeMap<String, i64>>,
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
pub enum Stop {
    /// SIGINT / SIGTERM: the current batch was committed.
    Interrupted,
    /// The database or the KMS kept failing for longer than the patience.
    Unavailable(String),
    /// The database refused a value outside a row's compare-and-set (exit 1).
    Failed(String),
}

/// Everything the workers share.
pub struct Engine {
    /// The database.
    pub db: Db,
    /// The job table.
    pub jobs: Jobs,
    /// The keyring (its data keys are committed to the key table before use).
    pub keyring: Keyring,
    /// The settings.
    pub settings: Settings,
    /// Set by the signal handler.
    pub stop: Arc<AtomicBool>,
    /// This process's lease owner name.
    pub owner: String,
    rate: Mutex<Option<Instant>>,
}

/// One column's job.
pub struct ColumnJob {
    /// The table.
    pub table: TablePlan,
    /// The column.
    pub column: ColumnPlan,
    /// What to do.
    pub op: Op,
    /// The job's name in the job table.
    pub name: String,
    /// Parameters stored with the job (rotate: its key ids).
    pub params: Option<String>,
    /// The counters.
    pub stats: Arc<Stats>,
    remaining: Option<AtomicI64>,
}

impl ColumnJob {
    /// A job for `column` of `table`.
    pub fn new(
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

/// The name an error is reported by (stable: scripts match on it).
pub fn error_name(e: &Error) -> &'static str {
    match e {
        Error::Format(_) => "Format",
        Error::Decrypt { .. } => "Decrypt",
        Error::UnknownKey { .. } => "UnknownKey",
        Error::KeyKindMismatch { .. } => "KeyKindMismatch",
        Error::ScopeMismatch { .. } => "ScopeMismatch",
        Error::PlaintextType { .. } => "PlaintextType",
        Error::PlaintextEncode { .. } => "PlaintextEncode",
        Error::Misuse(envelope_core::Misuse::PlaintextTooLarge { .. }) => "PlaintextTooLarge",
        // A value a text normalizer cannot read (not UTF-8).
        Error::Misuse(envelope_core::Misuse::BlindIndex(_)) => "PlaintextType",
        Error::Kms(_) => "Kms",
        Error::Unavailable(envelope_core::Unavailable::Timeout { .. }) => "KmsTimeout",
        Error::Store(_) => "Store",
        _ => "Other",
    }
}

/// Errors that belong to the value (reported, never overwritten) rather than to the KMS or the
/// key table (retried, then exit 3).
fn is_value_error(e: &Error) -> bool {
    matches!(
        e,
        Error::Decrypt { .. }
            | Error::UnknownKey { .. }
            | Error::KeyKindMismatch { .. }
            | Error::ScopeMismatch { .. }
            | Error::Format(_)
            | Error::PlaintextType { .. }
            | Error::PlaintextEncode { .. }
            | Error::Misuse(
                envelope_core::Misuse::PlaintextTooLarge { .. }
                    | envelope_core::Misuse::BlindIndex(_)
            )
    )
}

impl Engine {
    /// An engine over `db`.
    pub fn new(
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
    pub async fn run(self: &Arc<Self>, job: Arc<ColumnJob>) -> Result<(), Stop> {
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
        let started = Instant::now();
        let mut delay = Duration::from_millis(200);
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
                Err(BatchError::Kms(e)) => format!("the KMS or the key table failed: {e}"),
            };
            if started.elapsed() >= self.settings.patience {
                return Err(Stop::Unavailable(message));
            }
            if self.stop.load(Ordering::Relaxed) {
                return Err(Stop::Interrupted);
            }
            eprintln!("envelope: {message}; retrying in {delay:?}");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
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

    fn select_list(&self, job: &ColumnJob) -> String {
        let d = self.db.dialect;
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

    fn parse_row(&self, job: &ColumnJob, row: &AnyRow) -> Result<Read, sqlx::Error> {
        let target_shape = match job.column.config.form {
            Form::Binary => Shape::Bytes,
            Form::Text => Shape::Text,
        };
        let mut i = 2;
        let source = if job.reads_source() {
            i += 1;
            Some(Raw::get(row, i - 1, source_shape(job))?)
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
            target: Raw::get(row, 1, target_shape)?,
            source,
            index,
        })
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
        let begin = match (d, read_only) {
            (_, true) => "BEGIN",
            (Dialect::Sqlite, false) => "BEGIN IMMEDIATE",
            _ => "BEGIN",
        };
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
            self.select_list(job),
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
            .map(|r| self.parse_row(job, r))
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
        let mut pending = reads;
        let mut contended = 0;
        for attempt in 0..4 {
            let mut updates = Vec::new();
            for read in pending.drain(..) {
                match self.decide(job, read, &mut verify).await? {
                    Decision::Skip => {}
                    Decision::Fail(pk, name) => failures.push((pk, name)),
                    Decision::Write(u) => updates.push(u),
                }
            }
            if read_only {
                counts.written += updates.len() as i64;
                break;
            }
            let Cas { missed, refused } = self
                .compare_and_set(&mut tx, job, &updates)
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
            pending = self.reread(&mut tx, job, &missed).await.context(what)?;
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

    /// Classify a stored value of the column by the one rule.
    async fn classify(&self, job: &ColumnJob, raw: &Raw) -> Result<Stored, BatchError> {
        let bytes = match raw.bytes() {
            None => return Ok(Stored::Null),
            Some(b) => b.into_owned(),
        };
        let blob = match job.column.config.form {
            Form::Binary => format::parse(&bytes).is_ok().then(|| bytes.clone()),
            Form::Text => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|s| format::from_text(s).ok())
                .filter(|b| format::parse(b).is_ok()),
        };
        let Some((blob, key)) = blob.and_then(|b| format::peek_key_id(&b).ok().map(|k| (b, k)))
        else {
            return Ok(Stored::Plain(bytes));
        };
        match self.keyring.decrypt(&job.column.config.label, &blob).await {
            Ok(pt) => Ok(Stored::Sealed {
                key,
                plaintext: Zeroizing::new(pt),
            }),
            Err(e) if is_value_error(&e) => Ok(Stored::Failed(error_name(&e))),
            Err(e) => Err(BatchError::Kms(e)),
        }
    }

    async fn seal(&self, job: &ColumnJob, plaintext: &[u8]) -> Result<Raw, BatchError> {
        if self.settings.dry_run {
            // Counted, never written: no key is made or used.
            return Ok(Raw::Null(target_shape(job)));
        }
        if self.settings.no_crypto {
            return Ok(match job.column.config.form {
                Form::Binary => Raw::Bytes(plaintext.to_vec()),
                Form::Text => Raw::Text(String::from_utf8_lossy(plaintext).into_owned()),
            });
        }
        let label = &job.column.config.label;
        let blob = self
            .keyring
            .encrypt(label, plaintext)
            .await
            .map_err(BatchError::Kms)?;
        Ok(match job.column.config.form {
            Form::Binary => Raw::Bytes(blob),
            Form::Text => Raw::Text(format::to_text(&blob)),
        })
    }

    /// The value's blind index (`None`: no index, or a dry run); `Err(Ok(name))` when the
    /// value cannot be indexed (text a normalizer cannot read), which fails that row.
    async fn index_of(
        &self,
        job: &ColumnJob,
        plaintext: &[u8],
    ) -> Result<Option<Raw>, Result<&'static str, BatchError>> {
        let Some(b) = &job.column.config.blind_index else {
            return Ok(None);
        };
        // A dry run of encrypt makes no key; reindex's key exists already.
        if (self.settings.dry_run && !matches!(job.op, Op::Reindex)) || self.settings.no_crypto {
            return Ok(None);
        }
        match self.keyring.blind_index(&b.spec, plaintext).await {
            Ok(digest) => Ok(Some(Raw::Bytes(digest))),
            // A value a text normalizer cannot read is the value's problem, not the KMS's.
            Err(e) if is_value_error(&e) => Err(Ok(error_name(&e))),
            Err(e) => Err(Err(BatchError::Kms(e))),
        }
    }

    /// Verify: what is wrong with a sealed row's blind index, if anything. It must hold the
    /// value's index under one of the label's keys (a rotation in progress has two).
    async fn index_problem(
        &self,
        job: &ColumnJob,
        read: &Read,
        plaintext: &[u8],
    ) -> Result<Option<&'static str>, BatchError> {
        let (Some(b), Some(stored)) = (&job.column.config.blind_index, &read.index) else {
            return Ok(None);
        };
        let Some(stored) = stored.bytes() else {
            return Ok(Some("IndexMissing"));
        };
        match self.keyring.blind_index_probes(&b.spec, plaintext).await {
            Ok(probes) if probes.iter().any(|p| p[..] == stored[..]) => Ok(None),
            Ok(_) => Ok(Some("IndexMismatch")),
            Err(e) if is_value_error(&e) => Ok(Some(error_name(&e))),
            Err(e) => Err(BatchError::Kms(e)),
        }
    }

    async fn decide(
        &self,
        job: &ColumnJob,
        read: Read,
        verify: &mut VerifyCounts,
    ) -> Result<Decision, BatchError> {
        let cfg = &job.column.config;
        let stored = self.classify(job, &read.target).await?;
        let source_null = read.source.as_ref().is_none_or(Raw::is_null);
        // The row's index, or its failure.
        macro_rules! index {
            ($pt:expr) => {
                match self.index_of(job, $pt).await {
                    Ok(index) => index,
                    Err(Ok(name)) => return Ok(Decision::Fail(read.pk, name)),
                    Err(Err(e)) => return Err(e),
                }
            };
        }
        let write = |target: Raw, source: Option<Raw>, index: Option<Raw>, read: Read| {
            Decision::Write(Update {
                read,
                target,
                source,
                index,
            })
        };
        Ok(match (&job.op, stored) {
            (_, Stored::Failed(name)) => Decision::Fail(read.pk, name),

            (Op::Verify, Stored::Null) => {
                if cfg.source.is_some() && !source_null {
                    verify.missing += 1;
                } else {
                    verify.nulls += 1;
                }
                Decision::Skip
            }
            (Op::Verify, Stored::Plain(_)) => {
                verify.plaintext += 1;
                Decision::Skip
            }
            (Op::Verify, Stored::Sealed { key, plaintext }) => {
                match values::check_plaintext(cfg.ty, &plaintext) {
                    Ok(()) => {
                        *verify.per_key.entry(key.to_hex()).or_default() += 1;
                        // A lookup through the blind index would miss this row.
                        if let Some(problem) = self.index_problem(job, &read, &plaintext).await? {
                            return Ok(Decision::Fail(read.pk, problem));
                        }
                        // While the source column exists, say where it no longer agrees (an
                        // application that writes only one of the two columns).
                        if let Some(source) = &read.source {
                            let same = values::encode_source(cfg.ty, source)
                                .is_ok_and(|pt| normalized_eq(cfg.ty, &pt, &plaintext));
                            if !same {
                                verify.differs += 1;
                            }
                        }
                        Decision::Skip
                    }
                    Err(_) => Decision::Fail(read.pk, "PlaintextType"),
                }
            }

            // In place: plaintext is sealed where it is.
            (Op::Encrypt, Stored::Plain(pt)) if cfg.in_place() => {
                if values::check_plaintext(cfg.ty, &pt).is_err() {
                    return Ok(Decision::Fail(read.pk, "PlaintextType"));
                }
                let target = self.seal(job, &pt).await?;
                let index = index!(&pt);
                write(target, None, index, read)
            }
            // From a source: the column must be empty or an envelope.
            (Op::Encrypt, Stored::Plain(_)) => Decision::Fail(read.pk, "TargetNotEnvelope"),
            (Op::Encrypt, Stored::Null) if source_null => Decision::Skip,
            (Op::Encrypt, Stored::Null) => {
                let source = read
                    .source
                    .as_ref()
                    .map_or(Err(String::new()), |s| values::encode_source(cfg.ty, s));
                match source {
                    Err(_) => Decision::Fail(read.pk, "SourceType"),
                    Ok(pt) => {
                        let target = self.seal(job, &pt).await?;
                        let index = index!(&pt);
                        write(target, None, index, read)
                    }
                }
            }
            // Already sealed: fill a missing blind index.
            (Op::Encrypt, Stored::Sealed { plaintext, .. }) => {
                match (&read.index, &cfg.blind_index) {
                    (Some(idx), Some(_)) if idx.is_null() => match index!(&plaintext) {
                        Some(index) => write(read.target.clone(), None, Some(index), read),
                        None => Decision::Skip,
                    },
                    _ => Decision::Skip,
                }
            }

            (Op::Decrypt, Stored::Sealed { plaintext, .. }) => match &cfg.source {
                None => {
                    let target = match cfg.form {
                        Form::Binary => Raw::Bytes(plaintext.to_vec()),
                        Form::Text => match String::from_utf8(plaintext.to_vec()) {
                            Ok(s) => Raw::Text(s),
                            Err(_) => return Ok(Decision::Fail(read.pk, "PlaintextType")),
                        },
                    };
                    write(target, None, None, read)
                }
                Some(_) => match values::decode_to_source(cfg.ty, self.db.dialect, &plaintext) {
                    Ok(value) => write(Raw::Null(target_shape(job)), Some(value), None, read),
                    Err(_) => Decision::Fail(read.pk, "PlaintextType"),
                },
            },
            (Op::Decrypt, Stored::Plain(_)) if cfg.source.is_some() => {
                Decision::Fail(read.pk, "TargetNotEnvelope")
            }
            (Op::Decrypt, _) => Decision::Skip,

            (Op::Rotate(keys), Stored::Sealed { key, plaintext }) if keys.contains(&key) => {
                let target = self.seal(job, &plaintext).await?;
                write(target, None, None, read)
            }
            (Op::Rotate(_), _) => Decision::Skip,

            // The index under the live key, wherever it differs (made under an older key, or
            // missing); the value itself is written back as it was read.
            (Op::Reindex, Stored::Sealed { plaintext, .. }) => match index!(&plaintext) {
                Some(index) if read.index.as_ref() != Some(&index) => {
                    write(read.target.clone(), None, Some(index), read)
                }
                _ => Decision::Skip,
            },
            (Op::Reindex, _) => Decision::Skip,
        })
    }

    /// Write `updates` where each row still holds what was read. Returns the rows that did not
    /// match (an application wrote them in between) and the rows whose new value the database
    /// refused (too long for the column, not in its character set, out of range), each with
    /// its reason: those are left as they were, and the rest of the batch is written.
    async fn compare_and_set(
        &self,
        conn: &mut AnyConnection,
        job: &ColumnJob,
        updates: &[Update],
    ) -> Result<Cas, sqlx::Error> {
        let mut out = Cas::default();
        if updates.is_empty() {
            return Ok(out);
        }
        match self.db.dialect {
            // Per row: no network round trip on SQLite, and its planner may scan the table
            // for each row of a joined VALUES list; MariaDB has no UPDATE ... RETURNING. A
            // failed statement undoes only itself on both.
            Dialect::MySql | Dialect::Sqlite => {
                let sql = self.cas_single_sql(job);
                for u in updates {
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.clone()));
                    q = bind_new(q, job, u);
                    q = u.read.pk.bind(q);
                    q = bind_old(q, job, &u.read);
                    match q.execute(&mut *conn).await {
                        Ok(r) if r.rows_affected() == 1 => {}
                        Ok(_) => out.missed.push(u.read.pk.clone()),
                        Err(e) => match classify(&e) {
                            ErrorClass::Value(name) => out.refused.push((u.read.pk.clone(), name)),
                            _ => return Err(e),
                        },
                    }
                }
                Ok(out)
            }
            Dialect::Postgres => {
                // Keep well below PostgreSQL's 65,535 parameters.
                for chunk in updates.chunks(1000) {
                    // A refused value aborts the statement and, on PostgreSQL, the transaction:
                    // the savepoint keeps the batch's other work, and the chunk is then written
                    // row by row to find the rows at fault.
                    savepoint(conn, "SAVEPOINT envelope_cas").await?;
                    match self.cas_chunk(conn, job, chunk).await {
                        Ok(missed) => {
                            out.missed.extend(missed);
                            savepoint(conn, "RELEASE SAVEPOINT envelope_cas").await?;
                        }
                        Err(e) if matches!(classify(&e), ErrorClass::Value(_)) => {
                            savepoint(conn, "ROLLBACK TO SAVEPOINT envelope_cas").await?;
                            for u in chunk {
                                savepoint(conn, "SAVEPOINT envelope_row").await?;
                                match self.cas_chunk(conn, job, std::slice::from_ref(u)).await {
                                    Ok(missed) => {
                                        out.missed.extend(missed);
                                        savepoint(conn, "RELEASE SAVEPOINT envelope_row").await?;
                                    }
                                    Err(e) => match classify(&e) {
                                        ErrorClass::Value(name) => {
                                            savepoint(conn, "ROLLBACK TO SAVEPOINT envelope_row")
                                                .await?;
                                            out.refused.push((u.read.pk.clone(), name));
                                        }
                                        _ => return Err(e),
                                    },
                                }
                            }
                            savepoint(conn, "RELEASE SAVEPOINT envelope_cas").await?;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(out)
            }
        }
    }

    /// One `UPDATE ... FROM (VALUES ...) RETURNING` over `chunk` (PostgreSQL); returns the rows
    /// that did not match.
    async fn cas_chunk(
        &self,
        conn: &mut AnyConnection,
        job: &ColumnJob,
        chunk: &[Update],
    ) -> Result<Vec<Pk>, sqlx::Error> {
        let sql = self.cas_batch_sql(job, chunk.len());
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for u in chunk {
            q = u.read.pk.bind(q);
            q = bind_old(q, job, &u.read);
            q = bind_new(q, job, u);
        }
        let rows = q.fetch_all(&mut *conn).await?;
        let mut matched = HashSet::with_capacity(rows.len());
        for row in &rows {
            matched.insert(Pk::get(row, 0, job.table.pk_kind)?);
        }
        Ok(chunk
            .iter()
            .map(|u| &u.read.pk)
            .filter(|pk| !matched.contains(*pk))
            .cloned()
            .collect())
    }

    /// The columns compared (old values, with their shapes) and written (new values), in bind
    /// order.
    fn cas_columns(&self, job: &ColumnJob) -> (Vec<Compared>, Vec<Written>) {
        let c = &job.column;
        let mut old = vec![(c.target.clone(), target_shape(job))];
        if job.reads_source() {
            old.extend(c.source_read.clone().map(|s| (s, source_shape(job))));
        }
        if job.reads_index() {
            old.extend(c.index.clone().map(|i| (i, Shape::Bytes)));
        }
        // (column, expression of the new value with `{}` for the parameter)
        let mut new = vec![(c.target.clone(), "{}".to_owned())];
        if let (Op::Decrypt, Some(source)) = (&job.op, &c.source) {
            new.push((
                source.clone(),
                c.source_write.clone().unwrap_or_else(|| "{}".into()),
            ));
        }
        if job.reads_index() {
            new.extend(c.index.clone().map(|i| (i, "{}".to_owned())));
        }
        (old, new)
    }

    fn cas_batch_sql(&self, job: &ColumnJob, rows: usize) -> String {
        let d = self.db.dialect;
        let (old, new) = self.cas_columns(job);
        let width = 1 + old.len() + new.len();
        let mut names = vec!["envelope_k".to_owned()];
        names.extend((0..old.len()).map(|i| format!("envelope_o{i}")));
        names.extend((0..new.len()).map(|i| format!("envelope_n{i}")));
        let mut p = 0;
        let values = (0..rows)
            .map(|_| {
                let row = (0..width)
                    .map(|_| {
                        p += 1;
                        d.param(p)
                    })
                    .collect::<Vec<_>>();
                format!("({})", row.join(", "))
            })
            .collect::<Vec<_>>()
            .join(", ");
        let set = new
            .iter()
            .enumerate()
            .map(|(i, (col, expr))| {
                format!("{col} = {}", expr.replace("{}", &format!("envelope_n{i}")))
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut cond = vec![format!(
            "{} = {}",
            job.table.pk,
            job.table.pk_kind.bound("envelope_k")
        )];
        cond.extend(
            old.iter()
                .enumerate()
                .map(|(i, (col, shape))| d.same_as(*shape, col, &format!("envelope_o{i}"))),
        );
        format!(
            "WITH envelope_x({}) AS (VALUES {values}) UPDATE {} SET {set} FROM envelope_x WHERE {} RETURNING {}",
            names.join(", "),
            job.table.table,
            cond.join(" AND "),
            job.table.pk_kind.read(d, &job.table.pk)
        )
    }

    fn cas_single_sql(&self, job: &ColumnJob) -> String {
        let d = self.db.dialect;
        let (old, new) = self.cas_columns(job);
        let set = new
            .iter()
            .map(|(col, expr)| format!("{col} = {}", expr.replace("{}", "?")))
            .collect::<Vec<_>>()
            .join(", ");
        let mut cond = vec![format!("{} = ?", job.table.pk)];
        cond.extend(old.iter().map(|(col, shape)| d.same_as(*shape, col, "?")));
        format!(
            "UPDATE {} SET {set} WHERE {}",
            job.table.table,
            cond.join(" AND ")
        )
    }

    /// Read rows again, locked (PostgreSQL, MySQL) so the retry's update matches.
    async fn reread(
        &self,
        conn: &mut AnyConnection,
        job: &ColumnJob,
        pks: &[Pk],
    ) -> Result<Vec<Read>, sqlx::Error> {
        let d = self.db.dialect;
        let mut out = Vec::new();
        for chunk in pks.chunks(500) {
            let params = (1..=chunk.len())
                .map(|i| job.table.pk_kind.bound(&d.param(i)))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "SELECT {} FROM {} WHERE {} IN ({params}) ORDER BY {}{}",
                self.select_list(job),
                job.table.table,
                job.table.pk,
                job.table.pk,
                if d == Dialect::Sqlite {
                    ""
                } else {
                    " FOR UPDATE"
                }
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for pk in chunk {
                q = pk.bind(q);
            }
            for row in q.fetch_all(&mut *conn).await? {
                out.push(self.parse_row(job, &row)?);
            }
        }
        Ok(out)
    }
}

/// Whether two plaintexts of type `ty` hold the same value (JSON compared as values: a JSONB
/// source renders its own key order and spacing).
fn normalized_eq(ty: crate::config::ValueType, a: &[u8], b: &[u8]) -> bool {
    if ty == crate::config::ValueType::Json {
        let parse = |x: &[u8]| serde_json::from_slice::<serde_json::Value>(x).ok();
        return a == b || (parse(a).is_some() && parse(a) == parse(b));
    }
    a == b
}

fn target_shape(job: &ColumnJob) -> Shape {
    match job.column.config.form {
        Form::Binary => Shape::Bytes,
        Form::Text => Shape::Text,
    }
}

fn source_shape(job: &ColumnJob) -> Shape {
    use crate::config::ValueType as T;
    match job.column.config.ty {
        T::I16 | T::I32 | T::I64 | T::U16 | T::U32 | T::Bool => Shape::Int,
        T::Bytes => Shape::Bytes,
        _ => Shape::Text,
    }
}

type Q<'q> = sqlx::query::Query<'q, sqlx::Any, AnyArguments>;

fn bind_old<'q>(mut q: Q<'q>, job: &ColumnJob, read: &Read) -> Q<'q> {
    q = read.target.bind(q);
    if job.reads_source() {
        q = read
            .source
            .as_ref()
            .map_or(Raw::Null(source_shape(job)), Clone::clone)
            .bind(q);
    }
    if job.reads_index() {
        q = read
            .index
            .as_ref()
            .map_or(Raw::Null(Shape::Bytes), Clone::clone)
            .bind(q);
    }
    q
}

fn bind_new<'q>(mut q: Q<'q>, job: &ColumnJob, u: &Update) -> Q<'q> {
    q = u.target.bind(q);
    if matches!(job.op, Op::Decrypt) && job.column.config.source.is_some() {
        q = u
            .source
            .as_ref()
            .map_or(Raw::Null(source_shape(job)), Clone::clone)
            .bind(q);
    }
    if job.reads_index() {
        // No index computed (NULL plaintext, or text an index normalizer cannot read): keep.
        q = u
            .index
            .as_ref()
            .or(u.read.index.as_ref())
            .map_or(Raw::Null(Shape::Bytes), Clone::clone)
            .bind(q);
    }
    q
}

/// A column a compare-and-set compares: its expression and the shape of its value.
type Compared = (String, Shape);
/// A column a compare-and-set writes: the column and the expression of its new value, `{}`
/// standing for the parameter.
type Written = (String, String);

/// What a compare-and-set left unwritten.
#[derive(Default)]
struct Cas {
    /// Rows that no longer held what was read.
    missed: Vec<Pk>,
    /// Rows whose new value the database refused, with the reason.
    refused: Vec<(Pk, &'static str)>,
}

async fn savepoint(conn: &mut AnyConnection, sql: &'static str) -> Result<(), sqlx::Error> {
    sqlx::query(sql).execute(&mut *conn).await.map(drop)
}

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
