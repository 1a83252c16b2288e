//! The database side of the migration engine: one connection pool (sqlx's `Any` driver), the
//! one place driver errors are sorted ([`classify`]), the catalog lookups, and primary keys and
//! values as the engine reads and binds them. The SQL that differs per database is `sql.rs`;
//! the schema checks before the first write are `plan.rs`.

use std::fmt;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow, AnyTypeInfoKind};
use sqlx::{AnyPool, Row, ValueRef};

use crate::sql::{Dialect, Shape};

/// A database failure: exit code 3 when it means the server cannot be reached.
#[derive(Debug)]
pub(crate) struct DbError {
    /// What the tool was doing.
    pub(crate) context: String,
    /// The driver's error.
    pub(crate) source: sqlx::Error,
}

impl DbError {
    /// Whether the database (rather than a statement) failed: connection refused, reset or
    /// timed out, pool exhausted, or the server ended the session (a restart, an administrator
    /// shutdown, a failover). Such a failure is retried for `--patience`.
    pub(crate) fn is_unreachable(&self) -> bool {
        classify(&self.source) == ErrorClass::Connection
    }

    /// The failure's class (see [`classify`]).
    pub(crate) fn class(&self) -> ErrorClass {
        classify(&self.source)
    }
}

/// What a database error means for the job: the one place the CLI sorts driver errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ErrorClass {
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
pub(crate) fn classify(e: &sqlx::Error) -> ErrorClass {
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
pub(crate) trait Context<T> {
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

/// A pool and its dialect.
#[derive(Clone, Debug)]
pub(crate) struct Db {
    /// The pool.
    pub(crate) pool: AnyPool,
    /// The dialect.
    pub(crate) dialect: Dialect,
}

impl Db {
    /// Connect, with the sessions set to UTC (so timestamps read and write unshifted).
    ///
    /// # Errors
    /// A [`DbError`]; [`DbError::is_unreachable`] tells a server that does not answer.
    pub(crate) async fn connect(url: &str, max_connections: u32) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let dialect = Dialect::of_url(url).ok_or_else(|| DbError {
            context: "database_url".into(),
            source: sqlx::Error::Configuration(
                "database_url must start with postgres://, mysql:// (or mariadb://) or sqlite:"
                    .into(),
            ),
        })?;
        let url = dialect.driver_url(url);
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    for sql in dialect.session_setup() {
                        sqlx::query(sqlx::AssertSqlSafe(sql))
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

    /// Describe a column: `None` when the table or the column does not exist.
    ///
    /// # Errors
    /// A [`DbError`].
    pub(crate) async fn column_info(
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
                 CAST(character_maximum_length AS BIGINT), CAST(column_name AS TEXT) \
                 FROM information_schema.columns \
                 WHERE table_schema = COALESCE($1, current_schema()) \
                 AND table_name = $2 AND column_name = $3",
                true,
            ),
            Dialect::MySql => (
                "SELECT CAST(DATA_TYPE AS CHAR), CAST(COLUMN_TYPE AS CHAR), \
                 CAST(CHARACTER_MAXIMUM_LENGTH AS SIGNED), CAST(COLUMN_NAME AS CHAR) \
                 FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) \
                 AND TABLE_NAME = ? AND COLUMN_NAME = ?",
                true,
            ),
            Dialect::Sqlite => (
                // SQLite resolves column names without regard to (ASCII) case.
                "SELECT lower(type), type, NULL, name FROM pragma_table_info(?) \
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
        Ok(Some(ColumnInfo {
            name: canonical,
            ty: ty.to_ascii_lowercase(),
            full: full.to_ascii_lowercase(),
            max_len,
        }))
    }

    /// Whether a table exists (its name quoted, as the CLI's own statements write it).
    ///
    /// # Errors
    /// A [`DbError`].
    pub(crate) async fn table_exists(&self, table: &str) -> Result<bool, DbError> {
        self.exists(&self.dialect.quote(table), table).await
    }

    /// Whether the key table exists, named as the key stores name it: unquoted (the name is
    /// held to letters, digits and `_` by `envelope_core::key_table::check_table_name`), so
    /// that PostgreSQL folds a mixed-case name the same way for both.
    ///
    /// # Errors
    /// A [`DbError`].
    pub(crate) async fn key_table_exists(&self, table: &str) -> Result<bool, DbError> {
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
pub(crate) struct ColumnInfo {
    /// The column's name as the catalog spells it (the configured name may differ in case
    /// where the database ignores case).
    pub(crate) name: String,
    /// The base type name, lower case (`bytea`, `varchar`, `int4`, `blob`, ...).
    pub(crate) ty: String,
    /// The full type (`varchar(64)`, `character varying`), lower case.
    pub(crate) full: String,
    /// The declared maximum length in characters, when the type has one.
    pub(crate) max_len: Option<i64>,
}

/// How the primary key is compared and bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PkKind {
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
    pub(crate) fn of(dialect: Dialect, info: &ColumnInfo) -> Result<PkKind, String> {
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
    pub(crate) fn read(self, dialect: Dialect, column: &str) -> String {
        match (self, dialect) {
            (PkKind::Uuid, _) => format!("CAST({column} AS TEXT)"),
            (PkKind::Int, Dialect::Postgres) => format!("CAST({column} AS BIGINT)"),
            _ => column.to_owned(),
        }
    }

    /// The expression a bound key value is compared as.
    pub(crate) fn bound(self, param: &str) -> String {
        match self {
            PkKind::Uuid => format!("CAST({param} AS uuid)"),
            _ => param.to_owned(),
        }
    }
}

/// A primary-key value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Pk {
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
    pub(crate) fn get(row: &AnyRow, i: usize, kind: PkKind) -> Result<Pk, sqlx::Error> {
        Ok(match kind {
            PkKind::Int => Pk::Int(row.try_get(i)?),
            _ => Pk::Text(row.try_get(i)?),
        })
    }

    /// The checkpoint form (text).
    pub(crate) fn to_checkpoint(&self) -> String {
        match self {
            Pk::Int(i) => i.to_string(),
            Pk::Text(s) => s.clone(),
        }
    }

    /// Back from the checkpoint form.
    pub(crate) fn from_checkpoint(kind: PkKind, s: &str) -> Option<Pk> {
        match kind {
            PkKind::Int => s.parse().ok().map(Pk::Int),
            _ => Some(Pk::Text(s.to_owned())),
        }
    }

    /// Bind onto a query.
    pub(crate) fn bind<'q>(
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
pub(crate) enum Raw {
    /// SQL NULL of a column of this shape.
    Null(Shape),
    /// An integer (integers and booleans).
    Int(i64),
    /// Text.
    Text(String),
    /// Bytes.
    Bytes(Vec<u8>),
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
    pub(crate) fn get(row: &AnyRow, i: usize, shape: Shape) -> Result<Raw, sqlx::Error> {
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
    pub(crate) fn is_null(&self) -> bool {
        matches!(self, Raw::Null(_))
    }

    /// Bind onto a query.
    pub(crate) fn bind<'q>(
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
    pub(crate) fn bytes(&self) -> Option<std::borrow::Cow<'_, [u8]>> {
        use std::borrow::Cow;
        match self {
            Raw::Null(_) => None,
            Raw::Int(i) => Some(Cow::Owned(i.to_string().into_bytes())),
            Raw::Text(s) => Some(Cow::Borrowed(s.as_bytes())),
            Raw::Bytes(b) => Some(Cow::Borrowed(b)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
