//! What a batch does to each row it read: the one rule that tells plaintext from envelope values,
//! and the decision per command.

use envelope_core::{Category, Error, Keyring, Misuse, format};
use zeroize::Zeroizing;

use super::{BatchError, ColumnJob, Decision, Op, Read, Settings, Stored, Update, VerifyCounts};
use crate::config::Form;
use crate::db::Raw;
use crate::sql::Dialect;
use crate::values;

/// What a batch does to each row it read, for one command: the keyring that opens and seals
/// values, and the run's settings.
pub(super) struct Rules<'a> {
    pub(super) keyring: &'a Keyring,
    pub(super) settings: &'a Settings,
    pub(super) dialect: Dialect,
}

impl Rules<'_> {
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
            Err(e) if e.category() == Category::Value => Ok(Stored::Failed(e.name())),
            Err(e) => Err(BatchError::Kms(e)),
        }
    }

    async fn seal(&self, job: &ColumnJob, plaintext: &[u8]) -> Result<Raw, BatchError> {
        if self.settings.dry_run {
            // Counted, never written: no key is made or used.
            return Ok(Raw::Null(job.target_shape()));
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
            // A value a text normalizer cannot read is not text: the row's plaintext is not of
            // the column's type.
            Err(Error::Misuse(Misuse::BlindIndex(_))) => Err(Ok("PlaintextType")),
            Err(e) if e.category() == Category::Value => Err(Ok(e.name())),
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
            Err(e) if e.category() == Category::Value => Ok(Some(e.name())),
            Err(e) => Err(BatchError::Kms(e)),
        }
    }

    pub(super) async fn decide(
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
                                .is_ok_and(|pt| cfg.ty.same_plaintext(&pt, &plaintext));
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
                    .map(|s| values::encode_source(cfg.ty, s));
                match source {
                    None | Some(Err(_)) => Decision::Fail(read.pk, "SourceType"),
                    Some(Ok(pt)) => {
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
                Some(_) => match values::decode_to_source(cfg.ty, self.dialect, &plaintext) {
                    Ok(value) => write(Raw::Null(job.target_shape()), Some(value), None, read),
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
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use envelope_core::{KeyMaterial, Label, LocalKms, MemoryKeyStore};

    use super::*;
    use crate::config::{ColumnConfig, ValueType};
    use crate::db::{Pk, PkKind};
    use crate::engine::Settings;
    use crate::plan::{ColumnNames, ColumnPlan, TablePlan};
    use crate::sql::Shape;

    const LABEL: &str = "customers.email";

    fn keyring() -> Keyring {
        let kms = LocalKms::from_key(KeyMaterial::generate().unwrap());
        Keyring::builder(kms, MemoryKeyStore::new())
            .build()
            .unwrap()
    }

    fn settings(dry_run: bool) -> Settings {
        Settings {
            batch: 100,
            chunk_time: None,
            max_rate: None,
            workers: 1,
            shard: None,
            lease: std::time::Duration::from_secs(15),
            limit: None,
            dry_run,
            patience: std::time::Duration::from_secs(1),
            range_rows: 1000,
            pause_after_read: None,
            no_crypto: false,
        }
    }

    /// An in-place `string` column in binary form, with no source and no blind index.
    fn job(op: Op) -> ColumnJob {
        let config = ColumnConfig {
            name: "email".into(),
            label: Label::new(LABEL).unwrap(),
            ty: ValueType::String,
            form: Form::Binary,
            source: None,
            blind_index: None,
        };
        let column = ColumnPlan {
            config,
            names: ColumnNames {
                target: "email".into(),
                source: None,
                index: None,
            },
            target: "\"email\"".into(),
            source: None,
            source_read: None,
            source_write: None,
            index: None,
        };
        let table = TablePlan {
            name: "customers".into(),
            table: "\"customers\"".into(),
            pk: "\"id\"".into(),
            pk_kind: PkKind::Int,
            columns: vec![column.clone()],
        };
        ColumnJob::new(table, column, op, None, None)
    }

    fn read(target: Raw) -> Read {
        Read {
            pk: Pk::Int(1),
            target,
            source: None,
            index: None,
        }
    }

    /// What `op` decides for a row holding `target`, with the verify counts it left.
    async fn decide(keyring: &Keyring, op: Op, target: Raw) -> (Decision, VerifyCounts) {
        let settings = settings(false);
        let rules = Rules {
            keyring,
            settings: &settings,
            dialect: Dialect::Sqlite,
        };
        let mut verify = VerifyCounts::default();
        let decision = rules
            .decide(&job(op), read(target), &mut verify)
            .await
            .unwrap_or_else(|_| panic!("the keyring failed"));
        (decision, verify)
    }

    #[tokio::test]
    async fn encrypt_seals_plaintext_and_leaves_sealed_values_and_nulls_alone() {
        let keyring = keyring();
        let (d, _) = decide(&keyring, Op::Encrypt, Raw::Bytes(b"a@example.com".to_vec())).await;
        let Decision::Write(update) = d else {
            panic!("plaintext was not written");
        };
        let sealed = update.target.bytes().unwrap().into_owned();
        let label = Label::new(LABEL).unwrap();
        assert_eq!(
            keyring.decrypt(&label, &sealed).await.unwrap(),
            b"a@example.com"
        );
        // Already sealed: nothing to do (no blind index to fill).
        let (d, _) = decide(&keyring, Op::Encrypt, Raw::Bytes(sealed)).await;
        assert!(matches!(d, Decision::Skip));
        let (d, _) = decide(&keyring, Op::Encrypt, Raw::Null(Shape::Bytes)).await;
        assert!(matches!(d, Decision::Skip));
    }

    #[tokio::test]
    async fn a_value_sealed_for_another_column_fails_its_row_by_name() {
        let keyring = keyring();
        let other = Label::new("customers.phone").unwrap();
        let foreign = keyring.encrypt(&other, b"+1 555 0100").await.unwrap();
        for op in [Op::Encrypt, Op::Decrypt, Op::Verify] {
            let (d, _) = decide(&keyring, op, Raw::Bytes(foreign.clone())).await;
            assert!(matches!(d, Decision::Fail(_, "Decrypt")), "{d:?}");
        }
    }

    #[tokio::test]
    async fn decrypt_opens_sealed_values_and_verify_counts_each_kind() {
        let keyring = keyring();
        let label = Label::new(LABEL).unwrap();
        let sealed = keyring.encrypt(&label, b"b@example.com").await.unwrap();
        let (d, _) = decide(&keyring, Op::Decrypt, Raw::Bytes(sealed.clone())).await;
        let Decision::Write(update) = d else {
            panic!("the sealed value was not decrypted");
        };
        assert_eq!(update.target, Raw::Bytes(b"b@example.com".to_vec()));
        let (d, v) = decide(&keyring, Op::Verify, Raw::Bytes(sealed)).await;
        assert!(matches!(d, Decision::Skip));
        assert_eq!(v.per_key.values().sum::<i64>(), 1);
        let (_, v) = decide(&keyring, Op::Verify, Raw::Bytes(b"plain".to_vec())).await;
        assert_eq!(v.plaintext, 1);
        let (_, v) = decide(&keyring, Op::Verify, Raw::Null(Shape::Bytes)).await;
        assert_eq!(v.nulls, 1);
    }

    #[tokio::test]
    async fn rotate_reseals_only_values_under_the_selected_keys() {
        let keyring = keyring();
        let label = Label::new(LABEL).unwrap();
        let sealed = keyring.encrypt(&label, b"c@example.com").await.unwrap();
        let key = format::peek_key_id(&sealed).unwrap();
        let chosen = Op::Rotate(Arc::new([key].into_iter().collect()));
        let (d, _) = decide(&keyring, chosen, Raw::Bytes(sealed.clone())).await;
        assert!(matches!(d, Decision::Write(_)));
        let (d, _) = decide(&keyring, Op::Rotate(Arc::default()), Raw::Bytes(sealed)).await;
        assert!(matches!(d, Decision::Skip));
    }
}
