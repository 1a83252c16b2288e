//! `envelope.toml`: the database, the KMS, and each table's encrypted columns.
//!
//! Every top-level key can also come from the environment (`ENVELOPE_DATABASE_URL` or
//! `DATABASE_URL`, `ENVELOPE_KMS`, `ENVELOPE_ALSO_READ` (comma-separated), `ENVELOPE_KEY_TABLE`,
//! `ENVELOPE_JOB_TABLE`, `ENVELOPE_SCOPE`);
//! a command-line flag beats the environment, which beats the file. KMS credentials come only
//! from the environment: a config file that names one is refused.

use std::path::{Path, PathBuf};

pub(crate) use envelope_core::kms::KeyUri;
use envelope_core::{BlindIndexSpec, Label, Normalizer, Scope};
use serde::Deserialize;

pub(crate) use crate::field::ValueType;
use crate::sql::Dialect;

/// A configuration problem: exit code 2, before anything is written. Each message names the
/// file and the setting, and says how to fix it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    /// The file cannot be read.
    #[error(
        "cannot read the configuration {}: {source} (pass --config PATH, or set ENVELOPE_CONFIG)",
        path.display()
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML of the expected shape.
    #[error("{origin}: {source}")]
    Syntax {
        /// The file.
        origin: String,
        /// The parser's error.
        source: toml::de::Error,
    },
    /// A setting envelope-core refuses (a key URI, a name, a blind-index length).
    #[error("{at}: {source}")]
    Setting {
        /// The file and the setting.
        at: String,
        /// Core's error.
        source: envelope_core::Error,
    },
    /// A setting that does not fit the others, or is missing.
    #[error("{0}")]
    Invalid(String),
}

fn bad(message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(message.into())
}

/// A setting at `at` that envelope-core refuses.
fn setting(at: impl Into<String>) -> impl FnOnce(envelope_core::Error) -> ConfigError {
    let at = at.into();
    move |source| ConfigError::Setting { at, source }
}

/// The validated configuration. Its `Debug` hides the password of the database URL.
#[derive(Clone)]
pub(crate) struct Config {
    /// Where the data (and the key and job tables) live.
    pub(crate) database_url: String,
    /// The key URI new keys are made under (`local://PATH`, `tencent://REGION/CMK_ID`,
    /// `aws://REGION/KEY`, `vault://HOST[:PORT]/MOUNT/KEY`).
    pub(crate) kms: KeyUri,
    /// Other KMSs whose keys the CLI may unwrap (`also_read`): while keys move from one KMS
    /// to another, and for `keys rewrap` away from a KMS that `kms` no longer names.
    pub(crate) also_read: Vec<KeyUri>,
    /// The key table's name.
    pub(crate) key_table: String,
    /// The job (checkpoint) table's name.
    pub(crate) job_table: String,
    /// The key scope the CLI writes under (the keyring's default scope when unset).
    pub(crate) scope: Option<Scope>,
    /// The tables with encrypted columns.
    pub(crate) tables: Vec<TableConfig>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &redact_url(&self.database_url))
            .field("kms", &self.kms)
            .field("also_read", &self.also_read)
            .field("key_table", &self.key_table)
            .field("job_table", &self.job_table)
            .field("scope", &self.scope)
            .field("tables", &self.tables)
            .finish()
    }
}

/// A URL with its password replaced: the userinfo's (`user:PASSWORD@`, up to the last `@`, so
/// a password holding an unescaped `@` is hidden whole) and query parameters that carry one
/// (`?password=`, `&sslpassword=`).
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let mut out = match rest.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:<redacted>@{host}")
        }
        _ => format!("{scheme}://{rest}"),
    };
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.to_ascii_lowercase().contains("password") => {
                    format!("{k}=<redacted>")
                }
                _ => p.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// One table of the configuration.
#[derive(Clone, Debug)]
pub(crate) struct TableConfig {
    /// The table's name, optionally schema-qualified (`app.customers`).
    pub(crate) name: String,
    /// Its primary-key column (one column: integer, text or UUID).
    pub(crate) primary_key: String,
    /// The encrypted columns.
    pub(crate) columns: Vec<ColumnConfig>,
}

/// One encrypted column.
#[derive(Clone, Debug)]
pub(crate) struct ColumnConfig {
    /// The column holding (or to hold) envelope values.
    pub(crate) name: String,
    /// The context label, as in `column!(.. = "customers.email")`.
    pub(crate) label: Label,
    /// The field type: how plaintext values are encoded (docs/FORMAT.md).
    pub(crate) ty: ValueType,
    /// Binary (BYTEA/BLOB) or text (`ev1:`) form.
    pub(crate) form: Form,
    /// Read plaintext from this column instead of `name` itself.
    pub(crate) source: Option<String>,
    /// The blind-index column filled from the plaintext.
    pub(crate) blind_index: Option<BlindIndexConfig>,
}

impl ColumnConfig {
    /// Whether the column is migrated in place (no source column).
    pub(crate) fn in_place(&self) -> bool {
        self.source.is_none()
    }
}

/// A blind-index column.
#[derive(Clone, Debug)]
pub(crate) struct BlindIndexConfig {
    /// The column that stores the index.
    pub(crate) column: String,
    /// The index's spec (label, normalizer, length).
    pub(crate) spec: BlindIndexSpec,
}

/// How envelope values are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Form {
    /// The binary form, in BYTEA / BLOB / VARBINARY columns.
    #[default]
    Binary,
    /// The text form (`ev1:` + base64), for columns that must stay text.
    Text,
}

// ----- the file -------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    database_url: Option<String>,
    kms: Option<String>,
    also_read: Option<Vec<String>>,
    key_table: Option<String>,
    job_table: Option<String>,
    scope: Option<String>,
    #[serde(default, rename = "table")]
    tables: Vec<RawTable>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    name: String,
    primary_key: String,
    #[serde(default, rename = "column")]
    columns: Vec<RawColumn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawColumn {
    name: String,
    label: String,
    #[serde(rename = "type")]
    ty: ValueType,
    #[serde(default)]
    form: Form,
    source: Option<String>,
    blind_index: Option<RawBlindIndex>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBlindIndex {
    column: String,
    #[serde(default = "default_normalizer")]
    normalizer: String,
    len: Option<usize>,
}

fn default_normalizer() -> String {
    "exact".to_owned()
}

/// Values that beat the file: flags, then the environment.
#[derive(Default)]
pub(crate) struct Overrides {
    /// `--database-url`.
    pub(crate) database_url: Option<String>,
    /// `--kms`.
    pub(crate) kms: Option<String>,
}

/// Where the configuration comes from: `--config`, else `ENVELOPE_CONFIG`, else `envelope.toml`
/// in the working directory.
pub(crate) fn config_path(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| std::env::var_os("ENVELOPE_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("envelope.toml"))
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Read and validate the configuration.
///
/// # Errors
/// A [`ConfigError`] that says which key is wrong and how to fix it.
pub(crate) fn load(path: &Path, overrides: Overrides) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, &path.display().to_string(), overrides)
}

/// Parse and validate configuration text; `origin` names it in messages.
///
/// # Errors
/// As [`load`].
pub(crate) fn parse(text: &str, origin: &str, overrides: Overrides) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|source| ConfigError::Syntax {
        origin: origin.to_owned(),
        source,
    })?;
    let database_url = overrides
        .database_url
        .or_else(|| env("ENVELOPE_DATABASE_URL"))
        .or_else(|| env("DATABASE_URL"))
        .or(raw.database_url)
        .ok_or_else(|| {
            bad(format!(
                "{origin}: no database_url (set it in the file, in DATABASE_URL, or pass --database-url)"
            ))
        })?;
    let kms = overrides
        .kms
        .or_else(|| env("ENVELOPE_KMS"))
        .or(raw.kms)
        .ok_or_else(|| {
            bad(format!(
                "{origin}: no kms key URI (for example kms = \"local://envelope-master.key\"; or set ENVELOPE_KMS)"
            ))
        })?;
    let key_uri =
        |what: &str, uri: &str| KeyUri::parse(uri).map_err(setting(format!("{origin}: {what}")));
    let kms = key_uri("kms", &kms)?;
    let also_read = env("ENVELOPE_ALSO_READ")
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .or(raw.also_read)
        .unwrap_or_default()
        .iter()
        .map(|u| key_uri("also_read", u))
        .collect::<Result<Vec<_>, _>>()?;
    let mut providers = vec![kms.provider_name()];
    for uri in &also_read {
        if providers.contains(&uri.provider_name()) && !uri.same_kms(&kms) {
            return Err(bad(format!(
                "{origin}: also_read names {uri}, but another '{}' KMS is already configured: a key records its provider by name only, so one KMS of each kind can be read at a time",
                uri.provider_name()
            )));
        }
        providers.push(uri.provider_name());
    }
    let key_table = env("ENVELOPE_KEY_TABLE")
        .or(raw.key_table)
        .unwrap_or_else(|| "envelope_keys".to_owned());
    let job_table = env("ENVELOPE_JOB_TABLE")
        .or(raw.job_table)
        .unwrap_or_else(|| "envelope_jobs".to_owned());
    // The key stores splice the key table's name unquoted, with their own rule (no schema).
    envelope_core::key_table::check_table_name(&key_table)
        .map_err(setting(format!("{origin}: key_table")))?;
    check_ident("job_table", &job_table)?;
    let scope = env("ENVELOPE_SCOPE")
        .or(raw.scope)
        .map(|s| Scope::new(s).map_err(setting(format!("{origin}: scope"))))
        .transpose()?;

    // Names are compared as the database resolves them: MySQL/MariaDB and SQLite match column
    // names case-insensitively (ASCII), so `Email` and `email` are one column there; PostgreSQL
    // gets them quoted, and quoted names are exact.
    let names = Names {
        fold: Dialect::of_url(&database_url).is_none_or(Dialect::names_fold_case),
    };
    let mut tables = Vec::new();
    let mut labels = std::collections::HashSet::new();
    for t in raw.tables {
        let where_ = format!("{origin}: table {:?}", t.name);
        check_ident(&where_, &t.name)?;
        check_ident(&format!("{where_}: primary_key"), &t.primary_key)?;
        if t.columns.is_empty() {
            return Err(bad(format!(
                "{where_} has no [[table.column]] entries: name at least one column to encrypt"
            )));
        }
        let mut columns = Vec::new();
        let mut written = std::collections::HashSet::new();
        for c in t.columns {
            let col = column(&where_, &t.primary_key, names, c)?;
            if !labels.insert(col.label.as_str().to_owned()) {
                return Err(bad(format!(
                    "{where_}: label {:?} is used twice: each column has its own label",
                    col.label.as_str()
                )));
            }
            for name in std::iter::once(&col.name)
                .chain(col.source.iter())
                .chain(col.blind_index.iter().map(|b| &b.column))
            {
                if !written.insert(names.key(name)) {
                    return Err(bad(format!(
                        "{where_}: column {name:?} appears in two roles (as a target, source or blind-index column){}",
                        names.note()
                    )));
                }
            }
            columns.push(col);
        }
        tables.push(TableConfig {
            name: t.name,
            primary_key: t.primary_key,
            columns,
        });
    }
    Ok(Config {
        database_url,
        kms,
        also_read,
        key_table,
        job_table,
        scope,
        tables,
    })
}

/// How the configured database compares column names.
#[derive(Clone, Copy)]
struct Names {
    /// ASCII case-insensitive (MySQL/MariaDB, SQLite) rather than exact (PostgreSQL, quoted).
    fold: bool,
}

impl Names {
    fn key(self, name: &str) -> String {
        if self.fold {
            name.to_ascii_lowercase()
        } else {
            name.to_owned()
        }
    }

    fn same(self, a: &str, b: &str) -> bool {
        self.key(a) == self.key(b)
    }

    fn note(self) -> &'static str {
        if self.fold {
            "; this database compares column names without regard to case"
        } else {
            ""
        }
    }
}

fn column(where_: &str, pk: &str, names: Names, c: RawColumn) -> Result<ColumnConfig, ConfigError> {
    let where_ = format!("{where_}, column {:?}", c.name);
    check_ident(&where_, &c.name)?;
    let label = Label::new(c.label).map_err(setting(format!("{where_}: label")))?;
    if names.same(&c.name, pk) || c.source.as_deref().is_some_and(|s| names.same(s, pk)) {
        return Err(bad(format!(
            "{where_}: the primary key cannot be encrypted (keyset batches need it in the clear){}",
            names.note()
        )));
    }
    if let Some(source) = &c.source {
        check_ident(&format!("{where_}: source"), source)?;
        if names.same(source, &c.name) {
            return Err(bad(format!(
                "{where_}: source is the column itself; leave source out to migrate in place{}",
                names.note()
            )));
        }
    }
    if c.source.is_none() && c.form == Form::Text && !c.ty.is_textual() {
        return Err(bad(format!(
            "{where_}: an in-place text-form column can only hold string, date, timestamp, datetime or json values ({} plaintext is not text): add the envelope column beside it and name this one as `source`",
            c.ty.name()
        )));
    }
    let blind_index = c
        .blind_index
        .map(|b| {
            check_ident(&format!("{where_}: blind_index.column"), &b.column)?;
            if names.same(&b.column, &c.name)
                || c.source.as_deref().is_some_and(|s| names.same(&b.column, s))
                || names.same(&b.column, pk)
            {
                return Err(bad(format!(
                    "{where_}: blind_index.column must be a column of its own{}",
                    names.note()
                )));
            }
            let normalizer = match b.normalizer.as_str() {
                "exact" => Normalizer::Exact,
                "trimmed" => Normalizer::Trimmed,
                "case-folded" | "casefolded" => Normalizer::CaseFolded,
                other => {
                    return Err(bad(format!(
                        "{where_}: blind_index.normalizer {other:?} is not one of exact, trimmed, case-folded"
                    )));
                }
            };
            if normalizer != Normalizer::Exact && !c.ty.is_textual() {
                return Err(bad(format!(
                    "{where_}: the {} normalizer works on text; a {} column's index uses exact",
                    b.normalizer,
                    c.ty.name()
                )));
            }
            let mut spec = BlindIndexSpec::new(label.clone(), normalizer);
            if let Some(len) = b.len {
                spec = spec
                    .with_len(len)
                    .map_err(setting(format!("{where_}: blind_index.len")))?;
            }
            Ok(BlindIndexConfig {
                column: b.column,
                spec,
            })
        })
        .transpose()?;
    Ok(ColumnConfig {
        name: c.name,
        label,
        ty: c.ty,
        form: c.form,
        source: c.source,
        blind_index,
    })
}

/// Identifiers are interpolated into SQL (quoted), so they are held to a plain shape:
/// letters, digits and `_`, not starting with a digit, with at most one `.` for a schema.
fn check_ident(what: &str, name: &str) -> Result<(), ConfigError> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && !p.starts_with(|c: char| c.is_ascii_digit())
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() <= 2 && parts.iter().all(|p| part_ok(p)) {
        Ok(())
    } else {
        Err(bad(format!(
            "{what}: {name:?} is not a plain SQL name (letters, digits and _, at most 63 characters, optionally schema.name)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
database_url = "sqlite://app.db"
kms = "local://master.key"

[[table]]
name = "customers"
primary_key = "id"

[[table.column]]
name = "email"
label = "customers.email"
type = "string"
form = "text"
blind_index = { column = "email_bidx", normalizer = "case-folded" }

[[table.column]]
name = "ssn_enc"
label = "customers.ssn"
type = "i64"
source = "ssn"
"#;

    fn parse_ok(text: &str) -> Config {
        parse(text, "test.toml", Overrides::default()).unwrap()
    }

    fn parse_err(text: &str) -> String {
        parse(text, "test.toml", Overrides::default())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_full_config_parses() {
        let c = parse_ok(GOOD);
        assert_eq!(c.key_table, "envelope_keys");
        assert_eq!(c.job_table, "envelope_jobs");
        assert_eq!(
            c.kms,
            KeyUri::Local {
                path: "master.key".into()
            }
        );
        assert!(c.also_read.is_empty());
        let t = &c.tables[0];
        assert_eq!(t.columns.len(), 2);
        assert_eq!(t.columns[0].form, Form::Text);
        assert!(t.columns[0].in_place());
        assert_eq!(
            t.columns[0].blind_index.as_ref().unwrap().spec.normalizer(),
            Normalizer::CaseFolded
        );
        assert_eq!(t.columns[1].source.as_deref(), Some("ssn"));
        assert_eq!(t.columns[1].form, Form::Binary);
    }

    #[test]
    fn key_uris_and_also_read() {
        let c = parse_ok(&GOOD.replace(
            "kms = \"local://master.key\"",
            "kms = \"aws://us-east-1/alias/app\"\nalso_read = [\"tencent://ap-guangzhou/k\", \"vault://v:8200/transit/k\"]",
        ));
        assert_eq!(c.kms.provider_name(), "aws");
        let names: Vec<_> = c.also_read.iter().map(KeyUri::provider_name).collect();
        assert_eq!(names, ["tencent", "vault"]);
        let e = parse_err(&GOOD.replace("local://master.key", "aws://x"));
        assert!(
            e.contains("kms") && e.contains("REGION/KEY_ID_OR_ARN"),
            "{e}"
        );
        let e = parse_err(&GOOD.replace(
            "kms = \"local://master.key\"",
            "kms = \"vault://a:1/transit/k\"\nalso_read = [\"vault://b:1/transit/k\"]",
        ));
        assert!(e.contains("one KMS of each kind"), "{e}");
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        assert!(parse_err(&GOOD.replace("\"i64\"", "\"int\"")).contains("type"));
        assert!(parse_err(&GOOD.replace("primary_key", "pk")).contains("pk"));
        assert!(
            parse_err(&GOOD.replace("name = \"customers\"", "name = \"x; drop\""))
                .contains("plain SQL name")
        );
        assert!(
            parse_err(&GOOD.replace("source = \"ssn\"", "source = \"id\"")).contains("primary key")
        );
        assert!(
            parse_err(&GOOD.replace("customers.ssn", "customers.email")).contains("used twice")
        );
        assert!(parse_err(&GOOD.replace("case-folded", "upper")).contains("normalizer"));
        let in_place_text_int = GOOD.replace("source = \"ssn\"", "form = \"text\"");
        assert!(parse_err(&in_place_text_int).contains("in-place text-form"));
        assert!(parse_err(&GOOD.replace("email_bidx", "ssn")).contains("two roles"));
        assert!(parse_err("kms = \"local://k\"\n").contains("database_url"));
        let schema_key_table = GOOD.replace("[[table]]", "key_table = \"app.keys\"\n\n[[table]]");
        assert!(parse_err(&schema_key_table).contains("key_table"));
        assert!(
            parse_err("database_url = \"sqlite://x\"\nsecret_key = \"s\"\n").contains("secret_key")
        );
    }

    #[test]
    fn case_variant_names_are_one_column_where_the_database_says_so() {
        // MySQL/MariaDB and SQLite resolve `Email` to `email`: one column in two roles.
        for url in ["mysql://root@h/db", "mariadb://h/db", "sqlite://app.db"] {
            let text = GOOD.replace("sqlite://app.db", url);
            let e = parse_err(&text.replace("email_bidx", "Email"));
            assert!(
                e.contains("two roles") || e.contains("of its own"),
                "{url}: {e}"
            );
            assert!(e.contains("without regard to case"), "{url}: {e}");
            let e = parse_err(&text.replace("source = \"ssn\"", "source = \"SSN_ENC\""));
            assert!(e.contains("source is the column itself"), "{url}: {e}");
            let e = parse_err(&text.replace("primary_key = \"id\"", "primary_key = \"EMAIL\""));
            assert!(e.contains("primary key cannot be encrypted"), "{url}: {e}");
            let e = parse_err(&text.replace(
                "source = \"ssn\"",
                "source = \"ssn\"\nblind_index = { column = \"SSN\" }",
            ));
            assert!(e.contains("of its own"), "{url}: {e}");
        }
        // PostgreSQL gets quoted names, which are exact: `Email` is another column there (the
        // plan then checks that it exists).
        let pg = GOOD.replace("sqlite://app.db", "postgres://h/db");
        parse_ok(&pg.replace("email_bidx", "Email"));
    }

    #[test]
    fn debug_hides_the_database_password() {
        let c = parse(
            GOOD,
            "t",
            Overrides {
                database_url: Some("postgres://app:hunter2@db/app".into()),
                kms: None,
            },
        )
        .unwrap();
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("hunter2") && dbg.contains("app:<redacted>@db/app"),
            "{dbg}"
        );
    }

    #[test]
    fn redaction_covers_every_place_a_password_goes() {
        assert_eq!(
            redact_url("postgres://u:p@ss@host/db"),
            "postgres://u:<redacted>@host/db"
        );
        assert_eq!(
            redact_url("postgres://host/db?user=u&password=secret&sslpassword=s2&x=1"),
            "postgres://host/db?user=u&password=<redacted>&sslpassword=<redacted>&x=1"
        );
        assert_eq!(redact_url("sqlite://app.db"), "sqlite://app.db");
        assert_eq!(redact_url("mysql://root@h/db"), "mysql://root@h/db");
    }

    #[test]
    fn flags_beat_the_file() {
        let c = parse(
            GOOD,
            "t",
            Overrides {
                database_url: Some("postgres://elsewhere/db".into()),
                kms: Some("tencent://ap-beijing/k1".into()),
            },
        )
        .unwrap();
        assert_eq!(c.database_url, "postgres://elsewhere/db");
        assert!(matches!(c.kms, KeyUri::Tencent { .. }));
    }
}
