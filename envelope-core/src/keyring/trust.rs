//! Which master keys a key may have been wrapped under: the ones the application configured,
//! never the one a key row names for itself.
//!
//! A key row carries its provider, its master key id (`cmk_id`) and its wrapped key side by
//! side, so whoever can write one can write the others. A row that names master key B and holds
//! a key wrapped under B passes every check the KMS can make (the KMS does unwrap it under B).
//! So before any KMS call the keyring checks the row's master key against this list: its own
//! CMK, the CMKs of its `also_read` providers, and the ones trusted explicitly (an alias's key,
//! keys not yet rewrapped from an older master key).

use std::fmt::Write as _;

use crate::error::{Error, KmsError, KmsErrorKind};
use crate::keys::KeyRecord;
use crate::kms::KmsProvider;

/// The master keys a keyring accepts unwraps under, per provider name ([`KmsProvider::name`]).
///
/// Ids are compared exactly as written: the key table records the CMK id exactly as the keyring
/// that made the key was given it (a Tencent KeyId or `alias/NAME`; an AWS key id, key ARN,
/// `alias/NAME` or alias ARN; a Vault `MOUNT/KEY`), so the same spelling must be trusted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct TrustedCmks(Vec<(String, String)>);

impl TrustedCmks {
    /// Trust master key `cmk` of the provider named `provider`.
    pub(super) fn add(&mut self, provider: &str, cmk: &str) {
        if !self.trusts(provider, cmk) {
            self.0.push((provider.to_owned(), cmk.to_owned()));
        }
    }

    /// Whether keys of `provider` wrapped under `cmk` are trusted.
    pub(super) fn trusts(&self, provider: &str, cmk: &str) -> bool {
        self.0.iter().any(|(p, c)| p == provider && c == cmk)
    }

    /// The trusted master keys of `provider`, sorted, for messages.
    fn of(&self, provider: &str) -> Vec<&str> {
        let mut cmks: Vec<&str> = self
            .0
            .iter()
            .filter(|(p, _)| p == provider)
            .map(|(_, c)| c.as_str())
            .collect();
        cmks.sort_unstable();
        cmks
    }

    /// Refuse `record` unless its master key is trusted, or `kms` (the provider its row names)
    /// answers for its own master keys ([`KmsProvider::holds_cmk`]: the local KMS holds only the
    /// key files it was given, so it cannot be made to unwrap under anyone else's key).
    ///
    /// Runs before the KMS call, so that the refusal depends on nothing the KMS says.
    pub(super) fn check(&self, kms: &dyn KmsProvider, record: &KeyRecord) -> Result<(), Error> {
        if kms.holds_cmk(&record.cmk_id).is_some() || self.trusts(&record.provider, &record.cmk_id)
        {
            return Ok(());
        }
        let trusted = self.of(&record.provider);
        let mut message = format!(
            "key {} names {} master key '{}', which this keyring does not trust (it trusts ",
            record.id, record.provider, record.cmk_id
        );
        if trusted.is_empty() {
            message.push_str("none of that provider's");
        } else {
            let _ = write!(message, "'{}'", trusted.join("', '"));
        }
        message.push_str(
            "); refused without asking the KMS. If keys under that master key are this application's (made through an alias, or not yet rewrapped from an older master key), trust it: KeyringBuilder::trust_cmk, or also_read for another KMS (the CLI: add its key URI to also_read); otherwise the key table was edited",
        );
        Err(Error::Kms(
            KmsError::new(record.provider.clone(), KmsErrorKind::InvalidCiphertext)
                .with_message(message),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::keys::{KeyId, KeyKind, KeyMaterial};
    use crate::kms::local::LocalKms;

    fn record(provider: &str, cmk: &str) -> KeyRecord {
        KeyRecord {
            id: KeyId::from_bytes([7; 16]),
            kind: KeyKind::Data,
            provider: provider.to_owned(),
            cmk_id: cmk.to_owned(),
            wrapped: b"not a key".to_vec(),
            kms_context: "{}".to_owned(),
            created_at: SystemTime::UNIX_EPOCH,
            retired_at: None,
            scope: "default".to_owned(),
        }
    }

    /// A provider that cannot tell which master keys it holds, like every cloud KMS.
    struct Cloud(&'static str);

    #[async_trait::async_trait]
    impl KmsProvider for Cloud {
        fn name(&self) -> &str {
            self.0
        }

        async fn generate_data_key(
            &self,
            _: &str,
            _: &crate::kms::EncryptionContext,
        ) -> Result<crate::kms::GeneratedDataKey, KmsError> {
            unreachable!("the trust check makes no KMS call")
        }

        async fn decrypt(
            &self,
            _: &str,
            _: &[u8],
            _: &crate::kms::EncryptionContext,
        ) -> Result<KeyMaterial, KmsError> {
            unreachable!("the trust check makes no KMS call")
        }

        async fn encrypt(
            &self,
            _: &str,
            _: &KeyMaterial,
            _: &crate::kms::EncryptionContext,
        ) -> Result<Vec<u8>, KmsError> {
            unreachable!("the trust check makes no KMS call")
        }
    }

    fn trusted() -> TrustedCmks {
        let mut t = TrustedCmks::default();
        t.add("tencent", "cmk-a");
        t.add("tencent", "alias/users");
        t.add("aws", "arn:aws:kms:eu-west-1:111122223333:key/k-1");
        t.add("tencent", "cmk-a");
        t
    }

    #[test]
    fn only_the_configured_master_keys_of_the_rows_provider_are_trusted() {
        let t = trusted();
        assert_eq!(t.0.len(), 3, "no duplicates");
        assert!(t.trusts("tencent", "cmk-a"));
        assert!(t.trusts("tencent", "alias/users"));
        // Another master key, another spelling, or another provider's key of the same id.
        assert!(!t.trusts("tencent", "cmk-b"));
        assert!(!t.trusts("tencent", "CMK-A"));
        assert!(!t.trusts("tencent", "cmk-a "));
        assert!(!t.trusts("aws", "cmk-a"));
        assert!(!t.trusts("vault", "cmk-a"));
        assert!(!t.trusts("aws", "k-1"));
    }

    #[test]
    fn an_untrusted_row_is_refused_naming_its_master_key_and_the_remedy() {
        let t = trusted();
        assert!(
            t.check(&Cloud("tencent"), &record("tencent", "cmk-a"))
                .is_ok()
        );
        let e = t
            .check(&Cloud("tencent"), &record("tencent", "cmk-b"))
            .unwrap_err();
        match &e {
            Error::Kms(k) => {
                assert_eq!(k.kind(), KmsErrorKind::InvalidCiphertext);
                assert_eq!(k.provider(), "tencent");
                assert!(!k.is_retryable());
            }
            other => panic!("expected a KMS error, got {other:?}"),
        }
        let msg = e.to_string();
        for needle in [
            "cmk-b",
            "'alias/users', 'cmk-a'",
            "trust_cmk",
            "also_read",
            &KeyId::from_bytes([7; 16]).to_hex(),
        ] {
            assert!(msg.contains(needle), "{needle}: {msg}");
        }
        // Nothing of the row's wrapped key, and no other provider's keys.
        assert!(
            !msg.contains("not a key") && !msg.contains("arn:aws"),
            "{msg}"
        );

        let e = t
            .check(&Cloud("vault"), &record("vault", "transit/x"))
            .unwrap_err();
        assert!(e.to_string().contains("none of that provider's"), "{e}");
    }

    #[test]
    fn a_provider_that_knows_its_master_keys_decides_for_itself() {
        let local = LocalKms::from_key(KeyMaterial::generate().unwrap());
        let none = TrustedCmks::default();
        // Held or not, the local KMS answers; one it does not hold fails in the KMS call, with
        // the same error as before this check existed.
        assert!(none.check(&local, &record("local", local.cmk_id())).is_ok());
        assert!(none.check(&local, &record("local", "other")).is_ok());
        assert!(
            none.check(&Cloud("local"), &record("local", "other"))
                .is_err()
        );
    }
}
