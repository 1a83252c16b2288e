//! Key identifiers, key material, names, and the key-table row model.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use rand::TryRng;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::{Error, Result};

/// The 16-byte identifier of a data or index key: the key table's primary key, and the bytes
/// every value carries at offset 2 of its header.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; KeyId::LEN]);

impl KeyId {
    /// Length in bytes.
    pub const LEN: usize = 16;

    /// A fresh random id from the operating system's CSPRNG.
    ///
    /// # Errors
    /// Fails only if the operating system cannot supply randomness.
    pub fn random() -> Result<Self> {
        let mut id = [0u8; Self::LEN];
        os_random(&mut id)?;
        Ok(KeyId(id))
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; Self::LEN] {
        &self.0
    }

    /// Build an id from its bytes.
    pub const fn from_bytes(bytes: [u8; Self::LEN]) -> Self {
        KeyId(bytes)
    }

    /// Lower-case hex, 32 characters: the form used in logs, errors and KMS contexts.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let mut id = [0u8; Self::LEN];
        hex::decode_to_slice(s, &mut id).map_err(|_| {
            Error::Misuse(crate::error::Misuse::InvalidName {
                what: "key id",
                value: s.to_owned(),
                reason: "a key id is 32 hex characters",
            })
        })?;
        Ok(KeyId(id))
    }
}

impl TryFrom<&[u8]> for KeyId {
    type Error = Error;

    fn try_from(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; Self::LEN] = bytes.try_into().map_err(|_| {
            Error::Misuse(crate::error::Misuse::InvalidName {
                what: "key id",
                value: format!("<{} bytes>", bytes.len()),
                reason: "a key id is 16 bytes",
            })
        })?;
        Ok(KeyId(arr))
    }
}

/// A cheap hasher for maps keyed by [`KeyId`]. Key ids are 16 random bytes, so folding them is
/// as good as SipHash; and only the keyring's own keys are ever inserted (ids read from values
/// are only looked up), so crafted ids cannot flood a bucket.
#[derive(Default, Clone, Copy)]
pub(crate) struct KeyIdHasher(u64);

impl std::hash::Hasher for KeyIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(29) ^ u64::from_le_bytes(word);
        }
    }
}

pub(crate) type KeyIdHash = std::hash::BuildHasherDefault<KeyIdHasher>;

/// What a key in the key table is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// A data-encryption key (DEK) for AES-256-GCM values.
    Data,
    /// An HMAC-SHA256 key for blind indexes.
    Index,
}

impl KeyKind {
    /// The name stored in the key table's `kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Data => "data",
            KeyKind::Index => "index",
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "data" => Ok(KeyKind::Data),
            "index" => Ok(KeyKind::Index),
            _ => Err(Error::Misuse(crate::error::Misuse::InvalidName {
                what: "key kind",
                value: s.to_owned(),
                reason: "expected 'data' or 'index'",
            })),
        }
    }
}

/// 32 bytes of plaintext key material (a DEK or an index key), as a KMS returns it.
///
/// Zeroized on drop; no `Clone`, no `Debug` that shows the bytes, no `Serialize`. Access is
/// explicit through [`KeyMaterial::expose`], so every use is easy to find.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct KeyMaterial(Box<[u8; KeyMaterial::LEN]>);

impl KeyMaterial {
    /// Length in bytes (AES-256 and HMAC-SHA256 keys).
    pub const LEN: usize = 32;

    /// Fresh key material from the operating system's CSPRNG.
    ///
    /// # Errors
    /// Fails only if the operating system cannot supply randomness.
    pub fn generate() -> Result<Self> {
        let mut k = KeyMaterial(Box::new([0u8; Self::LEN]));
        os_random(&mut k.0[..])?;
        Ok(k)
    }

    /// Take key material from a slice, which must be exactly 32 bytes. The caller should wipe its
    /// own copy (see [`KeyMaterial::from_zeroizing`]).
    ///
    /// # Errors
    /// [`Misuse::KeyLength`](crate::Misuse::KeyLength) when the slice is not 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != Self::LEN {
            return Err(Error::Misuse(crate::error::Misuse::KeyLength {
                expected: Self::LEN,
                len: bytes.len(),
            }));
        }
        let mut k = KeyMaterial(Box::new([0u8; Self::LEN]));
        k.0.copy_from_slice(bytes);
        Ok(k)
    }

    /// Take key material from a buffer that is wiped when it drops.
    ///
    /// # Errors
    /// [`Misuse::KeyLength`](crate::Misuse::KeyLength) when the buffer is not 32 bytes.
    pub fn from_zeroizing(bytes: Zeroizing<Vec<u8>>) -> Result<Self> {
        Self::from_slice(&bytes)
    }

    /// The raw bytes. Every call site is a place where key material is handled.
    pub fn expose(&self) -> &[u8; Self::LEN] {
        &self.0
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyMaterial(<redacted>)")
    }
}

pub(crate) fn os_random(buf: &mut [u8]) -> Result<()> {
    rand::rngs::SysRng
        .try_fill_bytes(buf)
        .map_err(|e| Error::System(crate::error::SystemError::Random(e.to_string())))
}

/// One row of the key table: a wrapped key and what it is for.
///
/// The wrapped bytes are ciphertext under the KMS master key, not secret in themselves, but
/// `Debug` still shows only their length, and errors never include them.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The key's id (16 random bytes).
    pub id: KeyId,
    /// Data or index key.
    pub kind: KeyKind,
    /// The scope that chooses this key: a tenant or scope name for data keys, the context label
    /// for index keys.
    pub scope: String,
    /// The KMS provider's name (`local`, `tencent`, ...).
    pub provider: String,
    /// The master key (CMK) id the key is wrapped under, exactly as the keyring that made it (or
    /// `envelope keys rewrap --to`) was given it: a Tencent KeyId or `alias/NAME`, an AWS key
    /// id, key ARN or alias, a Vault `MOUNT/KEY`, a local key file's id. A keyring unwraps the
    /// key only if it trusts this master key (see [`crate::KeyringBuilder::trust_cmk`]): the
    /// row's own word for it is not enough.
    pub cmk_id: String,
    /// The wrapped key, opaque bytes as the provider returned them.
    pub wrapped: Vec<u8>,
    /// The canonical KMS encryption context (compact JSON, sorted keys) the key is bound to.
    pub kms_context: String,
    /// When the key was made.
    pub created_at: SystemTime,
    /// When the key stopped taking new writes; `None` while it may still be active.
    pub retired_at: Option<SystemTime>,
}

impl fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRecord")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("scope", &self.scope)
            .field("provider", &self.provider)
            .field("cmk_id", &self.cmk_id)
            .field("wrapped", &format_args!("<{} bytes>", self.wrapped.len()))
            .field("kms_context", &self.kms_context)
            .field("created_at", &self.created_at)
            .field("retired_at", &self.retired_at)
            .finish()
    }
}

/// What is wrong with a [`Label`] or [`Scope`] name, if anything: it must be 1 to 255 bytes
/// of visible ASCII. A `const fn`, so that `column!` and `blind_index!` check their labels
/// when the program compiles.
pub(crate) const fn name_problem(value: &str) -> Option<&'static str> {
    let bytes = value.as_bytes();
    if bytes.is_empty() {
        return Some("must not be empty");
    }
    if bytes.len() > 255 {
        return Some("must be at most 255 bytes");
    }
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] < 0x21 || bytes[i] > 0x7e {
            return Some("must be visible ASCII with no spaces (for example `users.ssn`)");
        }
        i += 1;
    }
    None
}

/// Checks shared by [`Label`] and [`Scope`]: 1 to 255 bytes of visible ASCII.
fn check_name(what: &'static str, value: &str) -> Result<()> {
    match name_problem(value) {
        Some(reason) => Err(Error::Misuse(crate::error::Misuse::InvalidName {
            what,
            value: value.to_owned(),
            reason,
        })),
        None => Ok(()),
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Cow<'static, str>);

        impl $name {
            /// Validate and wrap a name: 1 to 255 bytes of visible ASCII (no spaces).
            ///
            /// # Errors
            /// [`Misuse::InvalidName`](crate::Misuse::InvalidName) when the rules are broken.
            pub fn new(value: impl Into<Cow<'static, str>>) -> Result<Self> {
                let value = value.into();
                check_name($what, &value)?;
                Ok($name(value))
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                $name::new(s.to_owned())
            }
        }
    };
}

name_type!(
    /// A value's context label, usually `table.column` (`users.ssn`). It is bound into every
    /// value's authenticated data, so a value copied into another column fails to open.
    Label,
    "context label"
);

name_type!(
    /// A key scope: which active data key a write uses (a tenant, or `default`). Deleting a
    /// scope's keys from the key table shreds its data.
    Scope,
    "scope"
);

impl Scope {
    /// The scope used when none is named: `default`.
    pub fn default_scope() -> Scope {
        Scope(Cow::Borrowed("default"))
    }
}

impl Default for Scope {
    fn default() -> Self {
        Scope::default_scope()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_round_trips_through_hex() {
        let id = KeyId::random().unwrap();
        assert_eq!(id.to_hex().len(), 32);
        assert_eq!(id.to_hex().parse::<KeyId>().unwrap(), id);
        assert!("zz".parse::<KeyId>().is_err());
        assert_ne!(KeyId::random().unwrap(), id);
    }

    #[test]
    fn key_material_debug_is_redacted() {
        let k = KeyMaterial::from_slice(&[0xab; 32]).unwrap();
        let dbg = format!("{k:?}");
        assert_eq!(dbg, "KeyMaterial(<redacted>)");
        assert!(!dbg.contains("ab"));
        assert!(KeyMaterial::from_slice(&[1; 31]).is_err());
    }

    #[test]
    fn key_record_debug_hides_wrapped_bytes() {
        let rec = KeyRecord {
            id: KeyId::from_bytes([7; 16]),
            kind: KeyKind::Data,
            scope: "default".into(),
            provider: "local".into(),
            cmk_id: "local:00".into(),
            wrapped: vec![0xde, 0xad, 0xbe, 0xef],
            kms_context: "{}".into(),
            created_at: SystemTime::UNIX_EPOCH,
            retired_at: None,
        };
        let dbg = format!("{rec:?}");
        assert!(dbg.contains("<4 bytes>"), "{dbg}");
        assert!(!dbg.contains("222"), "{dbg}"); // 0xde = 222
        assert!(!dbg.to_lowercase().contains("deadbeef"), "{dbg}");
    }

    #[test]
    fn names_are_validated() {
        assert!(Label::new("users.ssn").is_ok());
        assert!(Label::new("").is_err());
        assert!(Label::new("has space").is_err());
        assert!(Label::new("ünï").is_err());
        assert!(Label::new("x".repeat(256)).is_err());
        assert!(Label::new("x".repeat(255)).is_ok());
        assert_eq!(Scope::default().as_str(), "default");
        assert_eq!("data".parse::<KeyKind>().unwrap(), KeyKind::Data);
        assert!("blob".parse::<KeyKind>().is_err());
    }
}
