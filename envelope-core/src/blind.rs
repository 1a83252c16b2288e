//! Blind indexes: the spec (label, normalizer, length), the normalizers, and the index keys
//! derived from a blind-index DEK. What an index reveals is on [`BlindIndexSpec`].

use std::borrow::Cow;
use std::fmt;

use hmac::Mac as _;

use crate::error::{Error, Result};
use crate::keys::{KeyId, KeyMaterial, Label};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

const DOMAIN: &[u8] = b"envelope-blind-index/v1\0";

/// How a value is normalized before it is indexed. Equal normalized values get equal indexes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Normalizer {
    /// The bytes as given.
    Exact,
    /// Leading and trailing Unicode whitespace removed.
    Trimmed,
    /// Trimmed, then lower-cased with Unicode's default lower-case mapping (`str::to_lowercase`).
    /// Suits e-mail addresses and user names. No Unicode normalization form is applied: send
    /// NFC text if your inputs mix forms.
    CaseFolded,
}

impl Normalizer {
    fn id(self) -> u8 {
        match self {
            Normalizer::Exact => 0,
            Normalizer::Trimmed => 1,
            Normalizer::CaseFolded => 2,
        }
    }

    /// Normalize text.
    pub fn apply<'a>(self, value: &'a str) -> Cow<'a, str> {
        match self {
            Normalizer::Exact => Cow::Borrowed(value),
            Normalizer::Trimmed => Cow::Borrowed(value.trim()),
            Normalizer::CaseFolded => {
                let t = value.trim();
                // Exactly "does the default lower-case mapping change anything": not
                // `char::is_uppercase`, which misses titlecase letters such as U+01C5 (ǅ -> ǆ).
                if t.chars().any(changes_when_lowercased) {
                    Cow::Owned(t.to_lowercase())
                } else {
                    Cow::Borrowed(t)
                }
            }
        }
    }
}

fn changes_when_lowercased(c: char) -> bool {
    let mut lower = c.to_lowercase();
    !(lower.len() == 1 && lower.next() == Some(c))
}

/// What a blind index is over: the column's label, the normalizer and the output length.
///
/// A blind index is a keyed HMAC-SHA256 of a normalized value, stored beside the encrypted
/// column, so `WHERE email_bidx = ?` finds rows by exact value without decrypting the table
/// ([`Keyring::blind_index`](crate::Keyring::blind_index)).
///
/// What a blind index reveals: which rows hold equal (normalized) values, and nothing else to
/// someone without the index key. Truncating the output (the default keeps 16 bytes) makes
/// unrelated values collide now and then, so always compare the decrypted value after a lookup
/// when a false match matters. Low-entropy columns (booleans, small enums) should not get one:
/// equality alone reveals their distribution.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlindIndexSpec {
    label: Label,
    normalizer: Normalizer,
    len: usize,
}

impl BlindIndexSpec {
    /// Default output length in bytes.
    pub const DEFAULT_LEN: usize = 16;

    /// An index over `label` with `normalizer`, 16 bytes long. The label names the index key, so
    /// use one label per indexed column (for example `customers.email`).
    pub fn new(label: Label, normalizer: Normalizer) -> Self {
        BlindIndexSpec {
            label,
            normalizer,
            len: Self::DEFAULT_LEN,
        }
    }

    /// Truncate the output to `len` bytes (4 to 32). Shorter means more false matches and less
    /// leakage; changing it changes every index value, so pick it once.
    ///
    /// # Errors
    /// [`Misuse::BlindIndex`](crate::Misuse::BlindIndex) outside 4..=32.
    pub fn with_len(mut self, len: usize) -> Result<Self> {
        if !(4..=32).contains(&len) {
            return Err(Error::Misuse(crate::error::Misuse::BlindIndex(
                "a blind index is 4 to 32 bytes long (BlindIndexSpec::with_len)",
            )));
        }
        self.len = len;
        Ok(self)
    }

    /// The label.
    pub fn label(&self) -> &Label {
        &self.label
    }

    /// The normalizer.
    pub fn normalizer(&self) -> Normalizer {
        self.normalizer
    }

    /// The output length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: an index has at least 4 bytes.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// An opened index key: the initialized HMAC state (wiped on drop by the `zeroize` features of
/// hmac and sha2).
pub(crate) struct IndexKey {
    id: KeyId,
    mac: HmacSha256,
}

impl IndexKey {
    pub(crate) fn new(id: KeyId, material: &KeyMaterial) -> Self {
        IndexKey {
            id,
            // HMAC accepts keys of any length; 32 bytes cannot fail.
            mac: <HmacSha256 as hmac::KeyInit>::new_from_slice(material.expose())
                .unwrap_or_else(|_| unreachable!("HMAC takes any key length")),
        }
    }

    pub(crate) fn id(&self) -> KeyId {
        self.id
    }

    pub(crate) fn compute(&self, spec: &BlindIndexSpec, value: &[u8]) -> Result<Vec<u8>> {
        let normalized: Cow<'_, [u8]> = match spec.normalizer {
            Normalizer::Exact => Cow::Borrowed(value),
            n => {
                let text = std::str::from_utf8(value).map_err(|_| {
                    Error::Misuse(crate::error::Misuse::BlindIndex(
                        "a trimmed or case-folded blind index needs UTF-8 text; use Normalizer::Exact for bytes",
                    ))
                })?;
                match n.apply(text) {
                    Cow::Borrowed(s) => Cow::Borrowed(s.as_bytes()),
                    Cow::Owned(s) => Cow::Owned(s.into_bytes()),
                }
            }
        };
        let mut mac = self.mac.clone();
        mac.update(DOMAIN);
        mac.update(spec.label.as_str().as_bytes());
        mac.update(&[0, spec.normalizer.id()]);
        mac.update(&normalized);
        let out = mac.finalize().into_bytes();
        Ok(out[..spec.len].to_vec())
    }
}

impl fmt::Debug for IndexKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IndexKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> IndexKey {
        IndexKey::new(
            KeyId::from_bytes([b; 16]),
            &KeyMaterial::from_slice(&[b; 32]).unwrap(),
        )
    }

    #[test]
    fn normalizers_group_equal_values() {
        let k = key(1);
        let label = Label::new("customers.email").unwrap();
        let folded = BlindIndexSpec::new(label.clone(), Normalizer::CaseFolded);
        let a = k.compute(&folded, b"  Alice@Example.COM ").unwrap();
        let b = k.compute(&folded, b"alice@example.com").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 16);
        let exact = BlindIndexSpec::new(label.clone(), Normalizer::Exact);
        assert_ne!(
            k.compute(&exact, b"Alice").unwrap(),
            k.compute(&exact, b"alice").unwrap()
        );
        let trimmed = BlindIndexSpec::new(label, Normalizer::Trimmed);
        assert_eq!(
            k.compute(&trimmed, b" x ").unwrap(),
            k.compute(&trimmed, b"x").unwrap()
        );
        assert!(k.compute(&trimmed, &[0xff]).is_err());
    }

    /// FORMAT.md section 7.2's vectors, computed independently (Python's `hmac` and
    /// `str.lower`, which implements the same default lower-case mapping). U+01C5 is a titlecase
    /// letter: not upper case, yet lower-casing changes it.
    #[test]
    fn case_folding_matches_the_spec_vectors() {
        let k = key(7);
        let spec = BlindIndexSpec::new(
            Label::new("customers.email").unwrap(),
            Normalizer::CaseFolded,
        );
        for (value, normalized, expected) in [
            ("\u{01C5}", "\u{01C6}", "5af9e291bc993c8aa078a16df5d3c9b2"),
            (
                " \u{01C5}ungla@Example.COM ",
                "\u{01C6}ungla@example.com",
                "7fcd2d7f610bac0480b145c52637bb16",
            ),
            (
                "\u{01C6}ungla@example.com",
                "\u{01C6}ungla@example.com",
                "7fcd2d7f610bac0480b145c52637bb16",
            ),
        ] {
            assert_eq!(Normalizer::CaseFolded.apply(value), normalized, "{value:?}");
            let index = k.compute(&spec, value.as_bytes()).unwrap();
            assert_eq!(hex::encode(index), expected, "{value:?}");
        }
    }

    #[test]
    fn keys_labels_and_lengths_separate_indexes() {
        let spec = BlindIndexSpec::new(Label::new("a.b").unwrap(), Normalizer::Exact);
        let other = BlindIndexSpec::new(Label::new("a.c").unwrap(), Normalizer::Exact);
        assert_ne!(
            key(1).compute(&spec, b"v").unwrap(),
            key(2).compute(&spec, b"v").unwrap()
        );
        assert_ne!(
            key(1).compute(&spec, b"v").unwrap(),
            key(1).compute(&other, b"v").unwrap()
        );
        let short = spec.clone().with_len(8).unwrap();
        let full = key(1)
            .compute(&spec.clone().with_len(32).unwrap(), b"v")
            .unwrap();
        assert_eq!(key(1).compute(&short, b"v").unwrap(), full[..8].to_vec());
        assert!(spec.clone().with_len(3).is_err());
        assert!(spec.with_len(33).is_err());
    }
}
