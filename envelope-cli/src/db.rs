//! The database side of the migration engine: one connection pool (sqlx's `Any` driver) and
//! the SQL each dialect needs, with the facts of `shared/design/MIGRATIONS.md`: NULL-safe
//! equality per database, byte-exact comparisons on MySQL (its default collations ignore case
//! and trailing spaces), and column-type checks before the first write.

use std::fmt;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow, AnyTypeInfoKind};
use sqlx::{AnyPool, Row, ValueRef};

use crate::config::{ColumnConfig, Form, TableConfig, ValueType};

/// A database failure: exit code 3 when it means the server cannot be reached.
#[derive(Debug)]
pub struct DbError {
    /// What the tool was doing.
    pub context: String,
    /// The driver's error.
    pub source: sqlx::Error,
}

impl DbError {
    /// Whether the database (rather than a statement) failed: connection refused, reset or
    /// timed out, pool exhausted, or the server ended the session (a restart, an administrator
    /// shutdown, a failover). Such a failure is retried for `--patience`.
    pub fn is_unreachable(&self) -> bool {
        classify(&self.source) == ErrorClass::Connection
    }

    /// The failure's class (see [`classify`]).
    pub fn class(&self) -> ErrorClass {
        classify(&self.source)
    }
}

/// What a database error means for the job: the one place the CLI sorts driver errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The server cannot be reached or ended the session: retried for `--patience`.
    Connection,
    /// A deadlock, a serialization failure, a lock wait or a busy SQLite file: the batch is
    /// simply run again.
    Transient,
    /// The statement was refused because of one row's value (too long for the column, out of
    /// range, not representable in the column's character set, a constraint): that row fails
    /// and is left as it was; the others go on.
    Value(&'static str),
    /// Anything else (a wrong schema, missing privileges): the job stops.
    Other,
}

/// Sort a driver error into its [`ErrorClass`]. PostgreSQL and SQLite are sorted by their
/// codes, MySQL/MariaDB by the server's error number (its SQLSTATE is often the generic
/// `HY000`).
pub fn classify(e: &sqlx::Error) -> ErrorClass {
    let db = match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => return ErrorClass::Connection,
        sqlx::Error::Database(db) => db,
        _ => return ErrorClass::Other,
    };
    if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return match my.number() {
            // Server shutdown, connection killed, server gone, lost during a query, too many
            // connections, aborted connection.
            1053 | 1927 | 2006 | 2013 | 1040 | 1152 | 1158 | 1159 | 1160 | 1161 => {
                ErrorClass::Connection
            }
            // Deadlock, lock wait timeout.
            1213 | 1205 => ErrorClass::Transient,
            1406 | 1265 => ErrorClass::Value("ValueTooLong"),
            1264 | 1690 => ErrorClass::Value("OutOfRange"),
            1366 | 1300 => ErrorClass::Value("NotInCharacterSet"),
            1292 | 1367 | 3140 => ErrorClass::Value("InvalidValue"),
            1048 | 1062 | 1451 | 1452 | 3819 | 4025 => ErrorClass::Value("Constraint"),
            _ if my.code().is_some_and(|c| c.starts_with("08")) => ErrorClass::Connection,
            _ if my.code().is_some_and(|c| c.starts_with("22")) => {
                ErrorClass::Value("InvalidValue")
            }
            _ => ErrorClass::Other,
        };
    }
    let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // SQLite: the extended result code, its primary code in the low byte.
        return match code.parse::<i64>().map(|n| n & 0xff) {
            Ok(5 | 6) => ErrorClass::Transient,
            Ok(18) => ErrorClass::Value("ValueTooLong"),
            Ok(19) => ErrorClass::Value("Constraint"),
            _ if db.message().contains("database is locked") => ErrorClass::Transient,
            _ => ErrorClass::Other,
        };
    }
    match code.as_str() {
        // admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections.
        "57P01" | "57P02" | "57P03" | "53300" => ErrorClass::Connection,
        c if c.starts_with("08") => ErrorClass::Connection,
        "40001" | "40P01" | "55P03" => ErrorClass::Transient,
        "22001" => ErrorClass::Value("ValueTooLong"),
        "22003" => ErrorClass::Value("OutOfRange"),
        "22021" | "22P05" => ErrorClass::Value("NotInCharacterSet"),
        "54000" => ErrorClass::Value("ValueTooLong"),
        c if c.starts_with("22") => ErrorClass::Value("InvalidValue"),
        c if c.starts_with("23") => ErrorClass::Value("Constraint"),
        _ => ErrorClass::Other,
    }
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.context, self.source)
    }
}

impl std::error::Error for DbError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Attach what the tool was doing to a driver error.
pub trait Context<T> {
    /// Wrap the error with `what`.
    fn context(self, what: impl FnOnce() -> String) -> Result<T, DbError>;
}

impl<T> Context<T> for Result<T, sqlx::Error> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, DbError> {
        self.map_err(|source| DbError {
            context: what(),
            source,
        })
    }
}

/// Which SQL dialect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    MySql,
    /// SQLite.
    Sqlite,
}

impl Dialect {
    /// The dialect of a database URL, by scheme.
    pub fn of_url(url: &str) -> Option<Dialect> {
        match url.split(':').next().unwrap_or("") {
            "postgres" | "postgresql" => Some(Dialect::Postgres),
            "mysql" | "mariadb" => Some(Dialect::MySql),
            "sqlite" => Some(Dialect::Sqlite),
            _ => None,
        }
    }

    /// A quoted identifier (`schema.name` quotes each part).
    pub fn quote(self, ident: &str) -> String {
        let q = if self == Dialect::MySql { '`' } else { '"' };
        ident
            .split('.')
            .map(|p| format!("{q}{p}{q}"))
            .collect::<Vec<_>>()
            .join(".")
    }

    /// The `n`th (1-based) bind parameter.
    pub fn param(self, n: usize) -> String {
        match self {
            Dialect::Postgres => format!("${n}"),
            _ => "?".to_owned(),
        }
    }

    /// `a` equals `b`, NULLs included, byte for byte.
    pub fn same(self, a: &str, b: &str) -> String {
        match self {
            Dialect::Postgres => format!("{a} IS NOT DISTINCT FROM {b}"),
            // `<=>` is NULL-safe; BINARY makes it exact (no case folding, no pad-space).
            Dialect::MySql => format!("BINARY {a} <=> BINARY {b}"),
            Dialect::Sqlite => format!("{a} IS {b}"),
        }
    }

    /// `a` equals `b` as [`Dialect::same`] does, for a value of `shape`. Text is compared as
    /// the bytes the application wrote, whatever the column's collation or character set:
    /// PostgreSQL in the `C` collation (a nondeterministic, case-insensitive collation would
    /// match a value changed in case only), MySQL/MariaDB in utf8mb4 (a latin1 or GBK column's
    /// stored bytes are not the UTF-8 bytes of the parameter), SQLite in `BINARY` (a `NOCASE`
    /// column).
    pub fn same_as(self, shape: Shape, a: &str, b: &str) -> String {
        if shape != Shape::Text {
            return self.same(a, b);
        }
        match self {
            Dialect::Postgres => format!("{a} COLLATE \"C\" IS NOT DISTINCT FROM {b}"),
            Dialect::MySql => format!("BINARY CONVERT({a} USING utf8mb4) <=> BINARY {b}"),
            Dialect::Sqlite => format!("{a} COLLATE BINARY IS {b}"),
        }
    }

    /// The SQL expression of a binary column's key id (bytes 2..18), as hex.
    pub fn key_id_hex(self, column: &str) -> String {
        match self {
            Dialect::Postgres => format!("encode(substring({column} from 3 for 16), 'hex')"),
            Dialect::MySql => format!("LOWER(HEX(SUBSTRING({column}, 3, 16)))"),
            Dialect::Sqlite => format!("lower(hex(substr({column}, 3, 16)))"),
        }
    }

    /// An aggregate as a 64-bit integer, 0 when it is NULL (PostgreSQL's `SUM(bigint)` is
    /// numeric and MySQL's is decimal, which the `Any` driver does not read).
    pub fn int(self, expr: &str) -> String {
        self.int_or_null(&format!("COALESCE({expr}, 0)"))
    }

    /// An expression as a 64-bit integer, NULL staying NULL.
    pub fn int_or_null(self, expr: &str) -> String {
        match self {
            Dialect::Postgres => format!("CAST({expr} AS BIGINT)"),
            Dialect::MySql => format!("CAST({expr} AS SIGNED)"),
            Dialect::Sqlite => expr.to_owned(),
        }
    }

    /// A string's length in bytes.
    pub fn octet_length(self, expr: &str) -> String {
        match self {
            Dialect::Postgres => format!("octet_length({expr})"),
            Dialect::MySql => format!("LENGTH({expr})"),
            Dialect::Sqlite => format!("length(CAST({expr} AS BLOB))"),
        }
    }

    /// The name the dialect gets in messages.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Postgres => "PostgreSQL",
            Dialect::MySql => "MySQL/MariaDB",
            Dialect::Sqlite => "SQLite",
        }
    }
}

/// A pool and its dialect.
#[derive(Clone, Debug)]
pub struct Db {
    /// The pool.
    pub pool: AnyPool,
    /// The dialect.
    pub dialect: Dialect,
}

impl Db {
    /// Connect, with the sessions set to UTC (so timestamps read and write unshifted).
    ///
    /// # Errors
    /// A [`DbError`]; [`DbError::is_unreachable`] tells a server that does not answer.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let dialect = Dialect::of_url(url).ok_or_else(|| DbError {
            context: "database_url".into(),
            source: sqlx::Error::Configuration(
                "database_url must start with postgres://, mysql:// (or mariadb://) or sqlite:"
                    .into(),
            ),
        })?;
        let url = match dialect {
            // MariaDB speaks the MySQL protocol; sqlx knows the scheme `mysql`.
            Dialect::MySql if url.starts_with("mariadb:") => format!("mysql:{}", &url[8..]),
            _ => url.to_owned(),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    let setup: &[&str] = match dialect {
                        Dialect::Postgres => &["SET TIME ZONE 'UTC'", "SET DateStyle = 'ISO, YMD'"],
                        // Strict: a value too long for its column is an error, never silently
                        // cut (a sealed value cut short can never be opened).
                        Dialect::MySql => &[
                            "SET time_zone = '+00:00'",
                            envelope_sqlx::MYSQL_STRICT_SESSION,
                        ],
                        // A writer waits for another instead of failing at once.
                        Dialect::Sqlite => &["PRAGMA busy_timeout = 10000"],
                    };
                    for sql in setup {
                        sqlx::query(sqlx::AssertSqlSafe(*sql))
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .context(|| format!("connecting to the {} database", dialect.name()))?;
        Ok(Db { pool, dialect })
    }

    /// The dialect.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Describe a column: `None` when the table or the column does not exist.
    ///
    /// # Errors
    /// A [`DbError`].
    pub async fn column_info(
        &self,
        table: &str,
        column: &str,
    ) -> Result<Option<ColumnInfo>, DbError> {
        let (schema, name) = match table.split_once('.') {
            Some((s, n)) => (Some(s), n),
            None => (None, table),
        };
        let what = || format!("reading the type of {table}.{column}");
        // PostgreSQL and MySQL take the schema (NULL: the connection's own); SQLite has one.
        let (sql, schema_param) = match self.dialect {
            Dialect::Postgres => (
                "SELECT CAST(udt_name AS TEXT), CAST(data_type AS TEXT), \
                 CAST(character_maximum_length AS BIGINT), CAST(column_name AS TEXT), \
                 CAST(NULL AS TEXT) \
                 FROM information_schema.columns \
                 WHERE table_schema = COALESCE($1, current_schema()) \
                 AND table_name = $2 AND column_name = $3",
                true,
            ),
            Dialect::MySql => (
                "SELECT CAST(DATA_TYPE AS CHAR), CAST(COLUMN_TYPE AS CHAR), \
                 CAST(CHARACTER_MAXIMUM_LENGTH AS SIGNED), CAST(COLUMN_NAME AS CHAR), \
                 CAST(CHARACTER_SET_NAME AS CHAR) \
                 FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) \
                 AND TABLE_NAME = ? AND COLUMN_NAME = ?",
                true,
            ),
            Dialect::Sqlite => (
                // SQLite resolves column names without regard to (ASCII) case.
                "SELECT lower(type), type, NULL, name, NULL FROM pragma_table_info(?) \
                 WHERE name = ? COLLATE NOCASE",
                false,
            ),
        };
        let mut q = sqlx::query(sql);
        if schema_param {
            q = q.bind(schema.map(str::to_owned));
        }
        let row = q
            .bind(name)
            .bind(column)
            .fetch_optional(&self.pool)
            .await
            .context(what)?;
        let Some(row) = row else { return Ok(None) };
        let ty: String = row.try_get(0).context(what)?;
        let full: String = row.try_get(1).context(what)?;
        let max_len: Option<i64> = row.try_get(2).context(what)?;
        let canonical: String = row.try_get(3).context(what)?;
        let charset: Option<String> = row.try_get(4).context(what)?;
        Ok(Some(ColumnInfo {
            name: canonical,
            ty: ty.to_ascii_lowercase(),
            full: full.to_ascii_lowercase(),
            max_len,
            charset: charset.map(|c| c.to_ascii_lowercase()),
        }))
    }

    /// Whether a table exists (its name quoted, as the CLI's own statements write it).
    ///
    /// # Errors
    /// A [`DbError`].
    pub async fn table_exists(&self, table: &str) -> Result<bool, DbError> {
        self.exists(&self.dialect.quote(table), table).await
    }

    /// Whether the key table exists, named as the key stores name it: unquoted (the name is
    /// held to letters, digits and `_` by `envelope_core::key_table::check_table_name`), so
    /// that PostgreSQL folds a mixed-case name the same way for both.
    ///
    /// # Errors
    /// A [`DbError`].
    pub async fn key_table_exists(&self, table: &str) -> Result<bool, DbError> {
        self.exists(table, table).await
    }

    async fn exists(&self, sql_name: &str, table: &str) -> Result<bool, DbError> {
        let sql = format!("SELECT 1 FROM {sql_name} WHERE 1 = 0");
        match sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_optional(&self.pool)
            .await
        {
            Ok(_) => Ok(true),
            Err(sqlx::Error::Database(_)) => Ok(false),
            Err(e) => Err(e).context(|| format!("looking for table {table}")),
        }
    }
}

/// A column's SQL type as the catalog describes it.
#[derive(Clone, Debug)]
pub struct ColumnInfo {
    /// The column's name as the catalog spells it (the configured name may differ in case
    /// where the database ignores case).
    pub name: String,
    /// The base type name, lower case (`bytea`, `varchar`, `int4`, `blob`, ...).
    pub ty: String,
    /// The full type (`varchar(64)`, `character varying`), lower case.
    pub full: String,
    /// The declared maximum length in characters, when the type has one.
    pub max_len: Option<i64>,
    /// The character set of a MySQL/MariaDB text column.
    pub charset: Option<String>,
}

/// How the primary key is compared and bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PkKind {
    /// An integer key (bound as i64).
    Int,
    /// A text key.
    Text,
    /// A PostgreSQL `uuid` key (read as text, compared through a cast).
    Uuid,
}

impl PkKind {
    /// The kind of a primary-key column.
    ///
    /// # Errors
    /// A message when the type is not an integer, text or UUID type.
    pub fn of(dialect: Dialect, info: &ColumnInfo) -> Result<PkKind, String> {
        let t = info.ty.as_str();
        let int = matches!(
            t,
            "int2"
                | "int4"
                | "int8"
                | "smallint"
                | "integer"
                | "bigint"
                | "int"
                | "mediumint"
                | "tinyint"
        );
        let text = matches!(
            t,
            "text" | "varchar" | "char" | "bpchar" | "character varying"
        );
        match dialect {
            Dialect::Postgres if t == "uuid" => Ok(PkKind::Uuid),
            Dialect::Sqlite if t.contains("int") => Ok(PkKind::Int),
            Dialect::Sqlite => Ok(PkKind::Text),
            _ if int => Ok(PkKind::Int),
            _ if text => Ok(PkKind::Text),
            _ => Err(format!(
                "its type {} is not an integer, text or UUID type",
                info.full
            )),
        }
    }

    /// The expression that reads the key (as i64 or text).
    pub fn read(self, dialect: Dialect, column: &str) -> String {
        match (self, dialect) {
            (PkKind::Uuid, _) => format!("CAST({column} AS TEXT)"),
            (PkKind::Int, Dialect::Postgres) => format!("CAST({column} AS BIGINT)"),
            _ => column.to_owned(),
        }
    }

    /// The expression a bound key value is compared as.
    pub fn bound(self, param: &str) -> String {
        match self {
            PkKind::Uuid => format!("CAST({param} AS uuid)"),
            _ => param.to_owned(),
        }
    }
}

/// A primary-key value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pk {
    /// An integer key.
    Int(i64),
    /// A text or UUID key.
    Text(String),
}

impl Pk {
    /// Read from a row.
    ///
    /// # Errors
    /// The driver's error.
    pub fn get(row: &AnyRow, i: usize, kind: PkKind) -> Result<Pk, sqlx::Error> {
        Ok(match kind {
            PkKind::Int => Pk::Int(row.try_get(i)?),
            _ => Pk::Text(row.try_get(i)?),
        })
    }

    /// The checkpoint form (text).
    pub fn to_checkpoint(&self) -> String {
        match self {
            Pk::Int(i) => i.to_string(),
            Pk::Text(s) => s.clone(),
        }
    }

    /// Back from the checkpoint form.
    pub fn from_checkpoint(kind: PkKind, s: &str) -> Option<Pk> {
        match kind {
            PkKind::Int => s.parse().ok().map(Pk::Int),
            _ => Some(Pk::Text(s.to_owned())),
        }
    }

    /// Bind onto a query.
    pub fn bind<'q>(
        &self,
        q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
        match self {
            Pk::Int(i) => q.bind(*i),
            Pk::Text(s) => q.bind(s.clone()),
        }
    }
}

/// A value as read from or written to a column, in the few shapes the engine handles.
#[derive(Clone, PartialEq, Eq)]
pub enum Raw {
    /// SQL NULL of a column of this shape.
    Null(Shape),
    /// An integer (integers and booleans).
    Int(i64),
    /// Text.
    Text(String),
    /// Bytes.
    Bytes(Vec<u8>),
}

/// The shape of a NULL, so that it binds with a type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Integer.
    Int,
    /// Text.
    Text,
    /// Bytes.
    Bytes,
}

// No plaintext in logs: only shapes and sizes.
impl fmt::Debug for Raw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Raw::Null(s) => write!(f, "Null({s:?})"),
            Raw::Int(_) => f.write_str("Int(<redacted>)"),
            Raw::Text(t) => write!(f, "Text(<{} bytes>)", t.len()),
            Raw::Bytes(b) => write!(f, "Bytes(<{} bytes>)", b.len()),
        }
    }
}

impl Raw {
    /// Read column `i` whatever its runtime type; `shape` is the NULL's shape.
    ///
    /// # Errors
    /// The driver's error, or a floating-point value (no field type reads one).
    pub fn get(row: &AnyRow, i: usize, shape: Shape) -> Result<Raw, sqlx::Error> {
        let kind = {
            let v = row.try_get_raw(i)?;
            if v.is_null() {
                return Ok(Raw::Null(shape));
            }
            v.type_info().kind()
        };
        Ok(match kind {
            AnyTypeInfoKind::Null => Raw::Null(shape),
            AnyTypeInfoKind::Bool => Raw::Int(i64::from(row.try_get::<bool, _>(i)?)),
            AnyTypeInfoKind::SmallInt | AnyTypeInfoKind::Integer | AnyTypeInfoKind::BigInt => {
                Raw::Int(row.try_get(i)?)
            }
            AnyTypeInfoKind::Text => Raw::Text(row.try_get(i)?),
            AnyTypeInfoKind::Blob => Raw::Bytes(row.try_get(i)?),
            AnyTypeInfoKind::Real | AnyTypeInfoKind::Double => {
                return Err(sqlx::Error::Decode(
                    "a floating-point value, which no field type holds".into(),
                ));
            }
        })
    }

    /// Whether it is NULL.
    pub fn is_null(&self) -> bool {
        matches!(self, Raw::Null(_))
    }

    /// Bind onto a query.
    pub fn bind<'q>(
        &self,
        q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
        match self {
            Raw::Null(Shape::Int) => q.bind(None::<i64>),
            Raw::Null(Shape::Text) => q.bind(None::<String>),
            Raw::Null(Shape::Bytes) => q.bind(None::<Vec<u8>>),
            Raw::Int(i) => q.bind(*i),
            Raw::Text(s) => q.bind(s.clone()),
            Raw::Bytes(b) => q.bind(b.clone()),
        }
    }

    /// The value's bytes (text as UTF-8, an integer as its decimal digits).
    pub fn bytes(&self) -> Option<std::borrow::Cow<'_, [u8]>> {
        use std::borrow::Cow;
        match self {
            Raw::Null(_) => None,
            Raw::Int(i) => Some(Cow::Owned(i.to_string().into_bytes())),
            Raw::Text(s) => Some(Cow::Borrowed(s.as_bytes())),
            Raw::Bytes(b) => Some(Cow::Borrowed(b)),
        }
    }
}

/// A column's names as the catalog spells them.
#[derive(Clone, Debug)]
pub struct ColumnNames {
    /// The encrypted column.
    pub target: String,
    /// The source column.
    pub source: Option<String>,
    /// The blind-index column.
    pub index: Option<String>,
}

/// What the engine knows about one configured column after checking the schema.
#[derive(Clone, Debug)]
pub struct ColumnPlan {
    /// The configuration.
    pub config: ColumnConfig,
    /// The catalog's names of the columns it uses.
    pub names: ColumnNames,
    /// The quoted target column.
    pub target: String,
    /// The quoted source column.
    pub source: Option<String>,
    /// The expression reading the source (the quoted source column, cast to a canonical shape).
    pub source_read: Option<String>,
    /// The expression writing a source value back (`{}` is the bind parameter).
    pub source_write: Option<String>,
    /// The quoted blind-index column.
    pub index: Option<String>,
}

/// What the engine knows about one configured table after checking the schema.
#[derive(Clone, Debug)]
pub struct TablePlan {
    /// The table's configured name.
    pub name: String,
    /// The quoted table.
    pub table: String,
    /// The quoted primary-key column.
    pub pk: String,
    /// How keys are read and bound.
    pub pk_kind: PkKind,
    /// The columns.
    pub columns: Vec<ColumnPlan>,
}

/// Check the configured tables against the database, before any write: tables, columns,
/// primary keys, and that each column's SQL type can hold its form and its longest value.
///
/// # Errors
/// A list of every problem found (each says what to change), or a database error.
pub async fn plan(
    db: &Db,
    tables: &[TableConfig],
) -> Result<Result<Vec<TablePlan>, Vec<String>>, DbError> {
    let d = db.dialect;
    let mut problems = Vec::new();
    let mut plans = Vec::new();
    for t in tables {
        if !db.table_exists(&t.name).await? {
            problems.push(format!("table {} does not exist", t.name));
            continue;
        }
        let pk_info = db.column_info(&t.name, &t.primary_key).await?;
        let (pk_kind, pk_name) = match pk_info {
            None => {
                problems.push(format!(
                    "table {}: primary key column {} does not exist",
                    t.name, t.primary_key
                ));
                continue;
            }
            Some(info) => match PkKind::of(d, &info) {
                Ok(k) => (k, info.name),
                Err(why) => {
                    problems.push(format!(
                        "table {}: primary key {}: {why}",
                        t.name, t.primary_key
                    ));
                    continue;
                }
            },
        };
        let mut columns = Vec::new();
        for c in &t.columns {
            match plan_column(db, t, c).await? {
                Ok(p) => columns.push(p),
                Err(mut why) => problems.append(&mut why),
            }
        }
        // Each column has one role, by the names the catalog resolved: a blind index written
        // over its own encrypted column would replace every value by its digest.
        let mut roles: Vec<(&str, String)> = vec![(&pk_name, "the primary key".to_owned())];
        for c in &columns {
            let name = &c.config.name;
            roles.push((
                &c.names.target,
                format!("the encrypted column of entry {name:?}"),
            ));
            if let Some(s) = &c.names.source {
                roles.push((s, format!("the source of entry {name:?}")));
            }
            if let Some(i) = &c.names.index {
                roles.push((i, format!("the blind-index column of entry {name:?}")));
            }
        }
        for (i, (a, role_a)) in roles.iter().enumerate() {
            if let Some((_, role_b)) = roles[..i].iter().find(|(b, _)| a == b) {
                problems.push(format!(
                    "table {}: column {a} would be both {role_b} and {role_a} (the database resolves the configured names to the same column): give each role its own column",
                    t.name
                ));
            }
        }
        plans.push(TablePlan {
            name: t.name.clone(),
            table: d.quote(&t.name),
            pk: d.quote(&pk_name),
            pk_kind,
            columns,
        });
    }
    Ok(if problems.is_empty() {
        Ok(plans)
    } else {
        Err(problems)
    })
}

async fn plan_column(
    db: &Db,
    t: &TableConfig,
    c: &ColumnConfig,
) -> Result<Result<ColumnPlan, Vec<String>>, DbError> {
    let d = db.dialect;
    let at = |col: &str| format!("{}.{col}", t.name);
    let mut problems = Vec::new();
    let target_info = db.column_info(&t.name, &c.name).await?;
    let source_info = match &c.source {
        Some(s) => match db.column_info(&t.name, s).await? {
            Some(i) => Some(i),
            None => {
                problems.push(format!(
                    "{}: the source column does not exist (check `source`)",
                    at(s)
                ));
                None
            }
        },
        None => None,
    };
    let Some(target_info) = target_info else {
        problems.push(format!(
            "{}: the column does not exist{}",
            at(&c.name),
            if c.source.is_some() {
                " (add it before encrypting, see docs/MIGRATING.md)"
            } else {
                ""
            }
        ));
        return Ok(Err(problems));
    };
    if let Err(why) = form_fits(d, c.form, &target_info) {
        problems.push(format!("{}: {why}", at(&c.name)));
    }
    let mut index_name = None;
    if let Some(b) = &c.blind_index {
        match db.column_info(&t.name, &b.column).await? {
            None => problems.push(format!(
                "{}: the blind-index column does not exist",
                at(&b.column)
            )),
            Some(info) => {
                index_name = Some(info.name.clone());
                if let Err(why) = form_fits(d, Form::Binary, &info) {
                    problems.push(format!("{} (blind index): {why}", at(&b.column)));
                } else if let Some(n) = info.max_len.filter(|n| (*n as usize) < b.spec.len()) {
                    problems.push(format!(
                        "{} (blind index): holds {n} bytes, the index has {}",
                        at(&b.column),
                        b.spec.len()
                    ));
                }
            }
        }
    }
    let (source_read, source_write) = match (&c.source, &source_info) {
        (Some(s), Some(info)) => match source_sql(d, c.ty, &d.quote(&info.name), info) {
            Ok((r, w)) => (Some(r), Some(w)),
            Err(why) => {
                problems.push(format!("{}: {why}", at(s)));
                (None, None)
            }
        },
        _ => (None, None),
    };
    if !problems.is_empty() {
        return Ok(Err(problems));
    }
    // The longest value must fit once sealed.
    if let Some(capacity) = capacity(d, c.form, &target_info) {
        let longest_expr = match &source_read {
            Some(read) => d.octet_length(read),
            None => d.octet_length(&d.quote(&target_info.name)),
        };
        let sql = format!(
            "SELECT CAST(MAX({longest_expr}) AS {}) FROM {}",
            if d == Dialect::MySql {
                "SIGNED"
            } else {
                "BIGINT"
            },
            d.quote(&t.name)
        );
        let longest: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&db.pool)
            .await
            .context(|| format!("measuring the longest value of {}", at(&c.name)))?;
        let plaintext = fixed_len(c.ty).or(longest.map(|l| l.max(0) as usize));
        if let Some(len) = plaintext {
            let sealed = envelope_core::format::sealed_len(len);
            let need = match c.form {
                Form::Binary => sealed,
                Form::Text => 4 + sealed.div_ceil(3) * 4,
            };
            if need as u64 > capacity {
                problems.push(format!(
                    "{}: the longest value needs {need} {} once sealed, but {} holds {capacity}: widen the column first",
                    at(&c.name),
                    if c.form == Form::Text { "characters" } else { "bytes" },
                    target_info.full
                ));
                return Ok(Err(problems));
            }
        }
    }
    let names = ColumnNames {
        source: source_info.map(|i| i.name),
        index: index_name,
        target: target_info.name,
    };
    Ok(Ok(ColumnPlan {
        config: c.clone(),
        target: d.quote(&names.target),
        source: names.source.as_deref().map(|s| d.quote(s)),
        source_read,
        source_write,
        index: names.index.as_deref().map(|i| d.quote(i)),
        names,
    }))
}

/// The plaintext length of fixed-size types (the largest, for timestamps).
fn fixed_len(ty: ValueType) -> Option<usize> {
    match ty {
        ValueType::I16 => Some(2),
        ValueType::I32 => Some(4),
        ValueType::I64 | ValueType::U64 => Some(8),
        ValueType::U16 => Some(2),
        ValueType::U32 => Some(4),
        ValueType::Bool => Some(1),
        ValueType::Uuid => Some(16),
        ValueType::Date => Some(10),
        ValueType::Timestamp => Some(30),
        ValueType::Datetime => Some(29),
        _ => None,
    }
}

/// Whether a column type can hold the form at all.
fn form_fits(d: Dialect, form: Form, info: &ColumnInfo) -> Result<(), String> {
    let t = info.ty.as_str();
    match (d, form) {
        (Dialect::Sqlite, _) => Ok(()),
        (Dialect::Postgres, Form::Binary) if t == "bytea" => Ok(()),
        (Dialect::Postgres, Form::Text) if matches!(t, "text" | "varchar") => Ok(()),
        (Dialect::Postgres, Form::Text) if t == "bpchar" => Err(format!(
            "{} pads values with spaces and cannot hold the text form: use text or varchar",
            info.full
        )),
        (Dialect::MySql, Form::Binary)
            if matches!(
                t,
                "varbinary" | "blob" | "tinyblob" | "mediumblob" | "longblob"
            ) =>
        {
            Ok(())
        }
        (Dialect::MySql, Form::Text)
            if matches!(
                t,
                "varchar" | "text" | "tinytext" | "mediumtext" | "longtext"
            ) =>
        {
            Ok(())
        }
        (_, Form::Binary) => Err(format!(
            "{} cannot hold binary envelope values: use {} (or form = \"text\" with a text column)",
            info.full,
            if d == Dialect::Postgres {
                "bytea"
            } else {
                "VARBINARY(n) or a BLOB type"
            }
        )),
        (_, Form::Text) => Err(format!(
            "{} cannot hold text-form envelope values: use {} (or the binary form)",
            info.full,
            if d == Dialect::Postgres {
                "text or varchar(n)"
            } else {
                "VARCHAR(n) or a TEXT type"
            }
        )),
    }
}

/// How many bytes (binary) or characters (text) a column holds; `None` for unbounded.
fn capacity(d: Dialect, form: Form, info: &ColumnInfo) -> Option<u64> {
    if let Some(n) = info.max_len {
        return Some(n.max(0) as u64);
    }
    match (d, form, info.ty.as_str()) {
        (Dialect::MySql, _, "tinyblob" | "tinytext") => Some(255),
        (Dialect::MySql, _, "blob" | "text") => Some(65_535),
        (Dialect::MySql, _, "mediumblob" | "mediumtext") => Some(16_777_215),
        _ => None,
    }
}

/// The read and write expressions of a source column of SQL type `info` holding `ty` values:
/// the read gives a canonical shape ([`Raw::Int`] for integers and booleans, text for text-like
/// types, bytes for bytes); the write (`{}` is the parameter) turns that shape back into the
/// column's type.
fn source_sql(
    d: Dialect,
    ty: ValueType,
    col: &str,
    info: &ColumnInfo,
) -> Result<(String, String), String> {
    let t = info.ty.as_str();
    let refuse = || {
        Err(format!(
            "a {} column cannot be the source of {} values",
            info.full,
            ty.name()
        ))
    };
    let pg_int = matches!(t, "int2" | "int4" | "int8");
    let my_int = matches!(t, "tinyint" | "smallint" | "mediumint" | "int" | "bigint");
    let pg_text = matches!(t, "text" | "varchar" | "bpchar" | "citext");
    let my_text = matches!(
        t,
        "char" | "varchar" | "text" | "tinytext" | "mediumtext" | "longtext"
    );
    let plain = || (col.to_owned(), "{}".to_owned());
    let pg_cast_back = |read: String| (read, format!("CAST({{}} AS {t})"));
    Ok(match (d, ty) {
        (
            Dialect::Sqlite,
            ValueType::Timestamp
            | ValueType::Datetime
            | ValueType::Date
            | ValueType::Json
            | ValueType::Uuid
            | ValueType::String
            | ValueType::U64,
        ) => (format!("CAST({col} AS TEXT)"), "{}".to_owned()),
        (Dialect::Sqlite, _) => plain(),

        (Dialect::Postgres, ValueType::Bytes) if t == "bytea" => plain(),
        (Dialect::Postgres, ValueType::String) if pg_text => {
            (format!("CAST({col} AS TEXT)"), "{}".into())
        }
        (
            Dialect::Postgres,
            ValueType::I16 | ValueType::I32 | ValueType::I64 | ValueType::U16 | ValueType::U32,
        ) if pg_int => (format!("CAST({col} AS BIGINT)"), "{}".into()),
        // PostgreSQL has no unsigned types: u64 values live in bigint (up to 2^63 - 1) or numeric.
        (Dialect::Postgres, ValueType::U64) if pg_int || t == "numeric" => {
            pg_cast_back(format!("CAST({col} AS TEXT)"))
        }
        (Dialect::Postgres, ValueType::Bool) if t == "bool" => (
            format!("CAST({col} AS INTEGER)"),
            "CAST(CAST({} AS INTEGER) AS boolean)".into(),
        ),
        (Dialect::Postgres, ValueType::Uuid) if t == "uuid" || pg_text => {
            pg_cast_back(format!("CAST({col} AS TEXT)"))
        }
        // ISO output (the session's DateStyle): a BC date reads as `0044-03-15 BC`, which the
        // date parser refuses, rather than as the wrong year.
        (Dialect::Postgres, ValueType::Date) if t == "date" => {
            pg_cast_back(format!("CAST({col} AS TEXT)"))
        }
        (Dialect::Postgres, ValueType::Timestamp) if t == "timestamptz" => pg_cast_back(format!(
            "to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"AD')"
        )),
        (Dialect::Postgres, ValueType::Timestamp) if t == "timestamp" => pg_cast_back(format!(
            "to_char({col}, 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"AD')"
        )),
        (Dialect::Postgres, ValueType::Datetime) if t == "timestamp" => {
            pg_cast_back(format!("to_char({col}, 'YYYY-MM-DD\"T\"HH24:MI:SS.USAD')"))
        }
        (Dialect::Postgres, ValueType::Json) if matches!(t, "json" | "jsonb") || pg_text => {
            pg_cast_back(format!("CAST({col} AS TEXT)"))
        }

        (Dialect::MySql, ValueType::Bytes)
            if matches!(
                t,
                "varbinary" | "binary" | "blob" | "tinyblob" | "mediumblob" | "longblob"
            ) =>
        {
            plain()
        }
        (Dialect::MySql, ValueType::String) if my_text => {
            (format!("CAST({col} AS CHAR)"), "{}".into())
        }
        (
            Dialect::MySql,
            ValueType::I16
            | ValueType::I32
            | ValueType::I64
            | ValueType::Bool
            | ValueType::U16
            | ValueType::U32,
        ) if my_int => (format!("CAST({col} AS SIGNED)"), "{}".into()),
        // As text: BIGINT UNSIGNED goes beyond i64.
        (Dialect::MySql, ValueType::U64) if my_int => (format!("CAST({col} AS CHAR)"), "{}".into()),
        (Dialect::MySql, ValueType::Uuid) if my_text || t == "uuid" => {
            (format!("CAST({col} AS CHAR)"), "{}".into())
        }
        (Dialect::MySql, ValueType::Date) if t == "date" => {
            (format!("DATE_FORMAT({col}, '%Y-%m-%d')"), "{}".into())
        }
        (Dialect::MySql, ValueType::Timestamp) if matches!(t, "datetime" | "timestamp") => (
            format!("DATE_FORMAT({col}, '%Y-%m-%dT%H:%i:%s.%fZ')"),
            "{}".into(),
        ),
        (Dialect::MySql, ValueType::Datetime) if matches!(t, "datetime" | "timestamp") => (
            format!("DATE_FORMAT({col}, '%Y-%m-%dT%H:%i:%s.%f')"),
            "{}".into(),
        ),
        (Dialect::MySql, ValueType::Json) if t == "json" || my_text => {
            (format!("CAST({col} AS CHAR)"), "{}".into())
        }
        _ => return refuse(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialect_sql() {
        assert_eq!(
            Dialect::Postgres.quote("app.customers"),
            "\"app\".\"customers\""
        );
        assert_eq!(Dialect::MySql.quote("customers"), "`customers`");
        assert_eq!(Dialect::Postgres.param(3), "$3");
        assert_eq!(Dialect::Sqlite.param(3), "?");
        assert_eq!(Dialect::MySql.same("a", "?"), "BINARY a <=> BINARY ?");
        assert_eq!(Dialect::of_url("mariadb://root@h/db"), Some(Dialect::MySql));
        assert_eq!(Dialect::of_url("sqlite::memory:"), Some(Dialect::Sqlite));
        assert_eq!(Dialect::of_url("oracle://x"), None);
    }

    #[test]
    fn raw_debug_never_shows_a_value() {
        let dbg = format!(
            "{:?} {:?} {:?}",
            Raw::Text("secret-text".into()),
            Raw::Bytes(b"secret".to_vec()),
            Raw::Int(123456789)
        );
        assert!(
            !dbg.contains("secret") && !dbg.contains("123456789"),
            "{dbg}"
        );
    }

    #[test]
    fn column_types_that_cannot_hold_a_form_are_refused() {
        let info = |ty: &str| ColumnInfo {
            name: "c".into(),
            ty: ty.into(),
            full: ty.into(),
            max_len: None,
            charset: None,
        };
        assert!(form_fits(Dialect::Postgres, Form::Binary, &info("text")).is_err());
        assert!(form_fits(Dialect::Postgres, Form::Text, &info("bytea")).is_err());
        assert!(
            form_fits(Dialect::Postgres, Form::Text, &info("bpchar"))
                .unwrap_err()
                .contains("pads")
        );
        assert!(form_fits(Dialect::MySql, Form::Binary, &info("varchar")).is_err());
        assert!(form_fits(Dialect::MySql, Form::Binary, &info("blob")).is_ok());
        assert_eq!(
            capacity(Dialect::MySql, Form::Binary, &info("blob")),
            Some(65_535)
        );
        assert!(source_sql(Dialect::Postgres, ValueType::I64, "c", &info("text")).is_err());
        assert!(source_sql(Dialect::MySql, ValueType::Date, "c", &info("date")).is_ok());
    }
}
