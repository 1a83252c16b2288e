//! The local KMS ([`crate::LocalKms`]).

use std::fmt;
use std::io::Write as _;
use std::path::Path;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::cipher::WrapCipher;
use crate::error::{Error, KmsError, KmsErrorKind, Result};
use crate::keys::KeyMaterial;
use crate::kms::{EncryptionContext, GeneratedDataKey, KmsProvider};

const MASTER_KEY_ENV: &str = LocalKms::MASTER_KEY_ENV;

const PROVIDER: &str = "local";
const AAD_DOMAIN: &[u8] = b"envelope-local-kms/v1\0";

struct MasterKey {
    cmk_id: String,
    cipher: WrapCipher,
}

/// The local KMS: master keys held by this process, read from a file or an environment variable.
///
/// This is the embedded default for development, tests and single-machine deployments. It wraps
/// data keys with AES-256-GCM under a 32-byte master key, bound to the encryption context, so the
/// key table alone is useless without the master key. It is **not** a substitute for a real KMS
/// when several machines or operators are involved: whoever can read the master key file can
/// unwrap every key. Keep the file out of backups of the database and out of version control.
///
/// A master key's CMK id is derived from the key itself (`local:` and 16 hex characters of a
/// SHA-256 fingerprint), so the key table records which master key each data key needs and a
/// wrong key file fails with a clear error instead of a decryption failure.
pub struct LocalKms {
    /// The first key is the primary one; the others can still unwrap (for rewrapping).
    keys: Vec<MasterKey>,
    /// Where the primary key came from, for error messages.
    origin: String,
}

impl LocalKms {
    /// The environment variable holding a base64 master key for [`LocalKms::from_env`].
    pub const MASTER_KEY_ENV: &'static str = "ENVELOPE_LOCAL_MASTER_KEY";

    /// A local KMS holding one master key.
    pub fn from_key(master: KeyMaterial) -> Self {
        Self::with_origin(master, "a key given in code".to_owned())
    }

    fn with_origin(master: KeyMaterial, origin: String) -> Self {
        LocalKms {
            keys: vec![MasterKey::new(&master)],
            origin,
        }
    }

    /// Also hold `master` (for example the old key while rewrapping under a new one).
    pub fn with_key(mut self, master: KeyMaterial) -> Self {
        let key = MasterKey::new(&master);
        if !self.keys.iter().any(|k| k.cmk_id == key.cmk_id) {
            self.keys.push(key);
        }
        self
    }

    /// Also hold every master key of `other` (for example a new key file, while
    /// `envelope keys rewrap` moves the key table under it). This KMS's primary key stays first.
    pub fn with_keys_of(mut self, other: LocalKms) -> Self {
        for key in other.keys {
            if !self.keys.iter().any(|k| k.cmk_id == key.cmk_id) {
                self.keys.push(key);
            }
        }
        self
    }

    /// **Development only.** Read the master key from `path`, or create the file with a fresh
    /// key (mode 0600) if it does not exist. Creation is atomic: concurrent starters all end up
    /// with the same key.
    ///
    /// A missing key file is exactly what a new container, another working directory or an
    /// unmounted volume looks like, so never use this where data matters: there, create the key
    /// once with `envelope keygen` (or [`LocalKms::create`]) and [`LocalKms::open`] it. The
    /// keyring still refuses to start when the key table holds keys that the new master key
    /// cannot read ([`Error::MasterKeyMissing`]).
    ///
    /// # Errors
    /// [`Error::Config`] naming the file when it cannot be read or written, is readable by group or others, or
    /// does not hold a base64 32-byte key.
    pub fn open_or_create_for_development(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        match read_key_file(path) {
            Ok(key) => return Ok(Self::with_origin(key, file_origin(path))),
            Err(KeyFileError::Missing) => {}
            Err(KeyFileError::Fatal(e)) => return Err(e),
        }
        create_key_file(path, true)?;
        tracing::warn!(
            target: "envelope::kms::local",
            path = %path.display(),
            "no master key file was found, so a NEW local master key was created (development mode); values sealed under any earlier master key cannot be read with it"
        );
        match read_key_file(path) {
            Ok(key) => Ok(Self::with_origin(
                key,
                format!(
                    "{}, created just now because it was missing",
                    file_origin(path)
                ),
            )),
            Err(KeyFileError::Missing) => Err(Error::io(
                path,
                "master key file vanished after it was created",
            )),
            Err(KeyFileError::Fatal(e)) => Err(e),
        }
    }

    /// Create a new master key file at `path` (mode 0600); fails if the file exists, so an
    /// existing key (perhaps the only copy) is never overwritten.
    ///
    /// # Errors
    /// [`Error::Config`] naming the file when it exists or cannot be written.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        create_key_file(path, false)?;
        Self::open(path)
    }

    /// Read the master key from an existing file; never creates one.
    ///
    /// # Errors
    /// As [`LocalKms::open_or_create_for_development`], plus a missing file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        match read_key_file(path) {
            Ok(key) => Ok(Self::with_origin(key, file_origin(path))),
            Err(KeyFileError::Missing) => Err(Error::io(
                path,
                "master key file does not exist: restore it if data was sealed under it, or create a new one with `envelope keygen --out <path>`",
            )),
            Err(KeyFileError::Fatal(e)) => Err(e),
        }
    }

    /// Read the master key from [`LocalKms::MASTER_KEY_ENV`] (standard base64 of 32 bytes). `Ok(None)` when
    /// the variable is not set.
    ///
    /// # Errors
    /// [`Error::Config`] when the variable is set but is not a base64 32-byte key.
    pub fn from_env() -> Result<Option<Self>> {
        let Some(value) = std::env::var_os(MASTER_KEY_ENV) else {
            return Ok(None);
        };
        let value = Zeroizing::new(
            value
                .into_string()
                .map_err(|_| Error::config(MASTER_KEY_ENV, "is not valid UTF-8"))?,
        );
        let key = decode_key(&value).ok_or_else(|| {
            Error::config(
                MASTER_KEY_ENV,
                "must be standard base64 of 32 random bytes (generate one with `head -c32 /dev/urandom | base64`)",
            )
        })?;
        Ok(Some(Self::with_origin(
            key,
            format!("the environment variable {MASTER_KEY_ENV}"),
        )))
    }

    /// The primary master key's CMK id: the one new data keys should be generated under.
    pub fn cmk_id(&self) -> &str {
        &self.keys[0].cmk_id
    }

    /// Every CMK id this KMS can unwrap.
    pub fn cmk_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.cmk_id.as_str())
    }

    fn key(&self, cmk: &str) -> std::result::Result<&MasterKey, KmsError> {
        self.keys.iter().find(|k| k.cmk_id == cmk).ok_or_else(|| {
            let held: Vec<&str> = self.cmk_ids().collect();
            KmsError::new(PROVIDER, KmsErrorKind::KeyNotFound).with_message(format!(
                "no master key {cmk} here (this process holds {}); is the master key file or {MASTER_KEY_ENV} the one these keys were made with?",
                held.join(", ")
            ))
        })
    }
}

impl MasterKey {
    fn new(master: &KeyMaterial) -> Self {
        let mut h = Sha256::new();
        h.update(b"envelope-local-kms key id/v1\0");
        h.update(master.expose());
        let digest = h.finalize();
        MasterKey {
            cmk_id: format!("local:{}", hex::encode(&digest[..8])),
            cipher: WrapCipher::new(master),
        }
    }

    fn aad(&self, context: &EncryptionContext) -> Vec<u8> {
        let ctx = context.canonical_json();
        let mut aad = Vec::with_capacity(AAD_DOMAIN.len() + self.cmk_id.len() + 1 + ctx.len());
        aad.extend_from_slice(AAD_DOMAIN);
        aad.extend_from_slice(self.cmk_id.as_bytes());
        aad.push(0);
        aad.extend_from_slice(ctx.as_bytes());
        aad
    }
}

impl fmt::Debug for LocalKms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalKms")
            .field("cmk_ids", &self.cmk_ids().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn file_origin(path: &Path) -> String {
    let shown = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    format!("the key file {}", shown.display())
}

#[async_trait]
impl KmsProvider for LocalKms {
    fn name(&self) -> &str {
        PROVIDER
    }

    fn default_cmk(&self) -> Option<&str> {
        Some(self.cmk_id())
    }

    fn holds_cmk(&self, cmk: &str) -> Option<bool> {
        Some(self.keys.iter().any(|k| k.cmk_id == cmk))
    }

    fn master_key_origin(&self) -> Option<String> {
        Some(self.origin.clone())
    }

    async fn generate_data_key(
        &self,
        cmk: &str,
        context: &EncryptionContext,
    ) -> std::result::Result<GeneratedDataKey, KmsError> {
        let master = self.key(cmk)?;
        let plaintext = KeyMaterial::generate().map_err(|e| {
            KmsError::new(PROVIDER, KmsErrorKind::Unavailable).with_message(e.to_string())
        })?;
        let wrapped = master
            .cipher
            .wrap(&master.aad(context), &plaintext)
            .map_err(|e| {
                KmsError::new(PROVIDER, KmsErrorKind::Other).with_message(e.to_string())
            })?;
        Ok(GeneratedDataKey { plaintext, wrapped })
    }

    async fn decrypt(
        &self,
        cmk: &str,
        wrapped: &[u8],
        context: &EncryptionContext,
    ) -> std::result::Result<KeyMaterial, KmsError> {
        let master = self.key(cmk)?;
        master
            .cipher
            .unwrap(&master.aad(context), wrapped)
            .ok_or_else(|| KmsError::new(PROVIDER, KmsErrorKind::InvalidCiphertext))
    }

    async fn encrypt(
        &self,
        cmk: &str,
        plaintext: &KeyMaterial,
        context: &EncryptionContext,
    ) -> std::result::Result<Vec<u8>, KmsError> {
        let master = self.key(cmk)?;
        master
            .cipher
            .wrap(&master.aad(context), plaintext)
            .map_err(|e| KmsError::new(PROVIDER, KmsErrorKind::Other).with_message(e.to_string()))
    }
}

fn decode_key(text: &str) -> Option<KeyMaterial> {
    let bytes = Zeroizing::new(STANDARD.decode(text.trim()).ok()?);
    KeyMaterial::from_slice(&bytes).ok()
}

enum KeyFileError {
    Missing,
    Fatal(Error),
}

fn read_key_file(path: &Path) -> std::result::Result<KeyMaterial, KeyFileError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => Zeroizing::new(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(KeyFileError::Missing),
        Err(e) => {
            return Err(KeyFileError::Fatal(Error::io(
                path,
                format!("cannot read master key file: {e}"),
            )));
        }
    };
    check_permissions(path).map_err(KeyFileError::Fatal)?;
    decode_key(&text).ok_or_else(|| {
        KeyFileError::Fatal(Error::io(
            path,
            "master key file does not hold standard base64 of 32 bytes; restore it from your backup (without it, data under its keys cannot be read)",
        ))
    })
}

#[cfg(unix)]
fn check_permissions(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::file_io(path, "cannot stat master key file", e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::io(
            path,
            format!(
                "master key file has mode {mode:o} and is readable by group or others; run `chmod 600` on it"
            ),
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_permissions(_path: &Path) -> Result<()> {
    Ok(())
}

/// Write a fresh key to a private temporary file beside `path`, then hard-link it into place:
/// the link fails if another process won the race, and nobody ever sees a half-written file.
fn create_key_file(path: &Path, allow_existing: bool) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let key = KeyMaterial::generate()?;
    let encoded = Zeroizing::new(STANDARD.encode(key.expose()));
    let mut suffix = [0u8; 8];
    crate::keys::os_random(&mut suffix)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "master.key".into());
    let tmp = dir.join(format!(".{file_name}.{}.tmp", hex::encode(suffix)));

    let result = (|| {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            opts.mode(0o600);
        }
        let mut file = opts
            .open(&tmp)
            .map_err(|e| Error::file_io(&tmp, "cannot create master key file", e))?;
        file.write_all(encoded.as_bytes())
            .and_then(|()| file.write_all(b"\n"))
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::file_io(&tmp, "cannot write master key file", e))?;
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => {
                tracing::info!(target: "envelope::kms::local", path = %path.display(), "created a new local master key file");
                Ok(())
            }
            // Another process created it first; use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && allow_existing => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(Error::io(
                path,
                "a master key file already exists here; refusing to overwrite it (it may be the only key to your data)",
            )),
            Err(e) => Err(Error::file_io(path, "cannot create master key file", e)),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    if result.is_ok() {
        // Make the new directory entry durable; failure here only weakens crash safety.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> EncryptionContext {
        EncryptionContext::new().with("envelope.key_id", "00")
    }

    #[tokio::test]
    async fn wraps_and_unwraps_bound_to_context() {
        let kms = LocalKms::from_key(KeyMaterial::generate().unwrap());
        let cmk = kms.cmk_id().to_owned();
        let g = kms.generate_data_key(&cmk, &ctx()).await.unwrap();
        let back = kms.decrypt(&cmk, &g.wrapped, &ctx()).await.unwrap();
        assert_eq!(back.expose(), g.plaintext.expose());
        let other = EncryptionContext::new().with("envelope.key_id", "01");
        let err = kms.decrypt(&cmk, &g.wrapped, &other).await.unwrap_err();
        assert_eq!(err.kind(), KmsErrorKind::InvalidCiphertext);
        let err = kms
            .decrypt("local:nope", &g.wrapped, &ctx())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), KmsErrorKind::KeyNotFound);
        assert!(err.to_string().contains(&cmk), "{err}");
    }

    #[tokio::test]
    async fn re_encrypt_moves_between_master_keys() {
        let old = KeyMaterial::generate().unwrap();
        let new = KeyMaterial::generate().unwrap();
        let kms = LocalKms::from_key(old).with_key(new);
        let ids: Vec<String> = kms.cmk_ids().map(str::to_owned).collect();
        let g = kms.generate_data_key(&ids[0], &ctx()).await.unwrap();
        let moved = kms
            .re_encrypt(&g.wrapped, &ids[0], &ctx(), &ids[1], &ctx())
            .await
            .unwrap();
        let back = kms.decrypt(&ids[1], &moved, &ctx()).await.unwrap();
        assert_eq!(back.expose(), g.plaintext.expose());
        assert!(kms.decrypt(&ids[0], &moved, &ctx()).await.is_err());
    }

    #[test]
    fn key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let a = LocalKms::open_or_create_for_development(&path).unwrap();
        let b = LocalKms::open_or_create_for_development(&path).unwrap();
        assert_eq!(a.cmk_id(), b.cmk_id());
        assert!(a.cmk_id().starts_with("local:"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let err = LocalKms::open(&path).unwrap_err();
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        // Only the key file is left behind, no temporary files.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn create_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let a = LocalKms::create(&path).unwrap();
        let err = LocalKms::create(&path).unwrap_err();
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        assert_eq!(LocalKms::open(&path).unwrap().cmk_id(), a.cmk_id());
    }

    #[test]
    fn bad_key_files_fail_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        assert!(
            LocalKms::open(&path)
                .unwrap_err()
                .to_string()
                .contains("does not exist")
        );
        std::fs::write(&path, "not base64!").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let err = LocalKms::open(&path).unwrap_err();
        assert!(err.to_string().contains("base64 of 32 bytes"), "{err}");
    }

    #[test]
    fn concurrent_creators_agree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let ids: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        LocalKms::open_or_create_for_development(&path)
                            .unwrap()
                            .cmk_id()
                            .to_owned()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    }

    #[test]
    fn debug_shows_ids_not_keys() {
        let kms = LocalKms::from_key(KeyMaterial::from_slice(&[0x42; 32]).unwrap());
        let dbg = format!("{kms:?}");
        assert!(dbg.contains("local:"), "{dbg}");
        assert!(!dbg.contains("QkJC"), "{dbg}"); // base64 of 0x42 bytes
    }
}
