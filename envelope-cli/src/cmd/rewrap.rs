//! `envelope keys rewrap --to URI`: every key row moved under a new master key, one KMS call
//! per key; no data row is read or written.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use envelope_core::kms::Connected;
use envelope_core::{EncryptionContext, KeyId, KeyRecord, KeyStore, KmsProvider, StoreError};
use tracing::Instrument as _;

use crate::config::{Config, KeyUri};
use crate::context::{self, all_keys, open_key_table};
use crate::error::Failure;
use crate::report::Output;
use crate::retry::retrying;

/// Where `keys rewrap` moves keys, and the providers that can unwrap them where they are now.
struct Rewrapper {
    destination: KeyUri,
    to: Connected,
    /// The configured `kms` and `also_read` KMSs, by URI.
    sources: Vec<(KeyUri, Arc<dyn KmsProvider>)>,
    /// The master keys `kms` and `also_read` name, by provider name: the only ones a row may
    /// be moved from (a provider that knows its own keys, the local one, decides for itself).
    trusted: Vec<(&'static str, String)>,
}

impl Rewrapper {
    async fn new(config: &Config, destination: KeyUri) -> Result<Self, Failure> {
        let to = context::provider(&destination).await?;
        let mut sources = Vec::new();
        let mut trusted = Vec::new();
        for uri in std::iter::once(&config.kms).chain(&config.also_read) {
            if let Some(cmk) = uri.cmk() {
                trusted.push((uri.provider_name(), cmk.to_owned()));
            }
            if sources.iter().any(|(u, _): &(KeyUri, _)| u.same_kms(uri)) {
                continue;
            }
            let kms = if uri.same_kms(&destination) {
                to.kms.clone()
            } else {
                context::provider(uri).await?.kms
            };
            sources.push((uri.clone(), kms));
        }
        Ok(Rewrapper {
            destination,
            to,
            sources,
            trusted,
        })
    }

    fn provider(&self) -> &str {
        self.to.kms.name()
    }

    fn done(&self, k: &KeyRecord) -> bool {
        k.provider == self.provider() && k.cmk_id == self.to.cmk
    }

    /// The key wrapped under the destination, from its row as it is now. Within one KMS the KMS
    /// rewraps it (ReEncrypt: the key never leaves Tencent or AWS); across KMSs the source
    /// unwraps it and the destination wraps it (the key passes through this process's memory
    /// only, as on every read).
    async fn rewrap(
        &self,
        record: &KeyRecord,
        context: &EncryptionContext,
    ) -> Result<Vec<u8>, envelope_core::Error> {
        let Some((uri, source)) = self
            .sources
            .iter()
            .find(|(_, kms)| kms.name() == record.provider)
        else {
            let configured: Vec<String> = self.sources.iter().map(|(u, _)| u.to_string()).collect();
            return Err(envelope_core::Error::Config(
                envelope_core::ConfigError::new(
                    "also_read",
                    format!(
                        "it is wrapped by the '{}' KMS, which neither kms nor also_read names ({}): add that KMS's key URI to also_read",
                        record.provider,
                        configured.join(", ")
                    ),
                ),
            ));
        };
        let to = &self.to;
        let unwrapper = if uri.same_kms(&self.destination) {
            &to.kms
        } else {
            source
        };
        // The row's master key must be one the configuration names (N1 of the 2026-12-05
        // review): a row edited to name another key the credentials can use, and to hold a key
        // wrapped under it, passes every KMS-side check, and rewrapping it would launder the
        // substituted key under the destination, where every keyring trusts it.
        if unwrapper.holds_cmk(&record.cmk_id).is_none()
            && !self
                .trusted
                .iter()
                .any(|(p, c)| *p == record.provider && *c == record.cmk_id)
        {
            return Err(envelope_core::Error::Config(
                envelope_core::ConfigError::new(
                    "also_read",
                    format!(
                        "it names {} master key '{}', which neither kms nor also_read names, so it is not moved: if keys under that master key are yours, add its key URI to also_read (the applications must trust it too); otherwise the key table was edited",
                        record.provider, record.cmk_id
                    ),
                ),
            ));
        }
        // The same `envelope.kms` spans as the keyring's calls: provider and action, no body.
        let span = |provider: &str, action: &'static str| tracing::debug_span!(target: "envelope::kms", "envelope.kms", provider, action, key_id = %record.id);
        if uri.same_kms(&self.destination) {
            let call =
                to.kms
                    .re_encrypt(&record.wrapped, &record.cmk_id, context, &to.cmk, context);
            return Ok(call.instrument(span(to.kms.name(), "re_encrypt")).await?);
        }
        let key = source
            .decrypt(&record.cmk_id, &record.wrapped, context)
            .instrument(span(source.name(), "decrypt"))
            .await?;
        Ok(to
            .kms
            .encrypt(&to.cmk, &key, context)
            .instrument(span(to.kms.name(), "encrypt"))
            .await?)
    }
}

/// `envelope keys rewrap --to URI`: every key row not yet under the destination master key is
/// rewrapped under it (one KMS call per key), compare-and-set on its old wrapped bytes. No data
/// row is read or written; a rerun after a crash finishes the rest.
///
/// # Errors
/// A [`Failure`]: [`Failure::Findings`] when some keys could not be rewrapped.
pub(crate) async fn rewrap(
    config: &Config,
    to: &str,
    patience: Duration,
    output: &Output,
    stop: Arc<AtomicBool>,
) -> Result<(), Failure> {
    let destination = KeyUri::parse(to).map_err(|e| Failure::Usage(format!("--to: {e}")))?;
    let rewrapper = Rewrapper::new(config, destination.clone()).await?;
    let cmk = rewrapper.to.cmk.clone();
    let (_, store) = open_key_table(config).await?;
    let keys = all_keys(&store).await?;
    let todo: Vec<&KeyRecord> = keys.iter().filter(|k| !rewrapper.done(k)).collect();
    let total = todo.len();
    output.line(
        &format!(
            "{total} of {} key(s) to rewrap under {destination} (CMK {cmk})",
            keys.len()
        ),
        serde_json::json!({"event": "rewrap_plan", "keys": keys.len(), "to_rewrap": total, "cmk_id": cmk}),
    );
    let (mut rewrapped, mut gone, mut failed) = (0usize, 0usize, Vec::new());
    let every = (total / 20).max(1);
    for (i, k) in todo.iter().enumerate() {
        if stop.load(Ordering::Relaxed) {
            return Err(Failure::Interrupted);
        }
        match rewrap_one(&rewrapper, &store, k, patience).await {
            Ok(true) => rewrapped += 1,
            Ok(false) => gone += 1,
            Err(RewrapError::Unavailable(m)) => {
                return Err(Failure::Unavailable(format!(
                    "{m} ({rewrapped} key(s) rewrapped so far; run the same command again to finish)"
                )));
            }
            Err(RewrapError::Key(m)) => {
                eprintln!("envelope: key {}: {m}", k.id);
                failed.push(k.id);
            }
        }
        let done = i + 1;
        // Every key in JSON; about every 5% in text.
        if *output == Output::Json || done % every == 0 || done == total {
            output.line(
                &format!("rewrapped {done}/{total}"),
                serde_json::json!({"event": "progress", "key_id": k.id.to_hex(), "done": done, "total": total}),
            );
        }
    }
    output.line(
        &format!(
            "{rewrapped} key(s) rewrapped, {} already under {cmk}, {gone} deleted meanwhile, {} failed. Applications read these keys only if they trust {destination} (KeyringBuilder::trust_cmk or also_read, the CLI's kms or also_read): they must have trusted it before this rewrap, and keep trusting the old master key while any key row names it. Point `kms` at {destination} once every application does.",
            keys.len() - total,
            failed.len()
        ),
        serde_json::json!({"event": "summary", "summary": {
            "rewrapped": rewrapped,
            "already": keys.len() - total,
            "deleted_meanwhile": gone,
            "failed": failed.iter().map(KeyId::to_hex).collect::<Vec<_>>(),
        }}),
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::Findings(format!(
            "{} key(s) could not be rewrapped (see above); they stay under their old master key",
            failed.len()
        )))
    }
}

enum RewrapError {
    /// The KMS or the key table stayed unavailable: stop, a rerun finishes.
    Unavailable(String),
    /// This key cannot be rewrapped (its context is corrupt, the KMS refuses it).
    Key(String),
}

/// Rewrap one key row; `Ok(false)` when the row was deleted meanwhile.
async fn rewrap_one(
    rewrapper: &Rewrapper,
    store: &Arc<dyn KeyStore>,
    record: &KeyRecord,
    patience: Duration,
) -> Result<bool, RewrapError> {
    let (provider, cmk) = (rewrapper.provider(), rewrapper.to.cmk.as_str());
    let classify = |e: envelope_core::Error| {
        if e.is_retryable() {
            RewrapError::Unavailable(e.to_string())
        } else {
            RewrapError::Key(e.to_string())
        }
    };
    let mut record = record.clone();
    for _ in 0..3 {
        let context = EncryptionContext::from_json(&record.kms_context)
            .map_err(|e| RewrapError::Key(format!("kms_context is not a JSON object: {e}")))?;
        let wrapped = retrying("rewrapping", patience, || {
            rewrapper.rewrap(&record, &context)
        })
        .await
        .map_err(classify)?;
        let stored = retrying("updating the key table", patience, || async {
            match store
                .rewrap(&record.id, &record.wrapped, provider, cmk, &wrapped)
                .await
            {
                Err(StoreError::Backend(e)) => {
                    Err(envelope_core::Error::Store(StoreError::Backend(e)))
                }
                other => Ok(other),
            }
        })
        .await
        .map_err(classify)?;
        match stored {
            Ok(()) => return Ok(true),
            Err(StoreError::NotFound(_)) => return Ok(false),
            Err(StoreError::Conflict(_)) => {
                // Another process rewrapped it meanwhile: done if it is under the destination,
                // else try again from what is stored now.
                match store.get(&record.id).await {
                    Ok(None) => return Ok(false),
                    Ok(Some(now)) if now.provider == provider && now.cmk_id == cmk => {
                        return Ok(true);
                    }
                    Ok(Some(now)) => record = now,
                    Err(e) => return Err(classify(envelope_core::Error::Store(e))),
                }
            }
            Err(e) => return Err(RewrapError::Key(e.to_string())),
        }
    }
    Err(RewrapError::Key(
        "rewrapped concurrently three times in a row; run again".into(),
    ))
}
