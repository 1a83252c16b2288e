//! AES-256-GCM sealing and opening of v1 values. The only module that touches `aes_gcm`.

use std::fmt;

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use rand::Rng as _;
use zeroize::Zeroize;

use crate::error::{Error, Result};
use crate::format::{self, Envelope, NONCE_LEN};
use crate::keys::{KeyId, KeyMaterial, Label};

/// An opened data key: the initialized cipher (key schedule already expanded) and its id.
///
/// The cipher wipes its key schedule on drop (aes-gcm's `zeroize` feature); the raw key bytes
/// are never kept.
pub(crate) struct DataCipher {
    id: KeyId,
    aead: Aes256Gcm,
}

impl DataCipher {
    pub(crate) fn new(id: KeyId, material: &KeyMaterial) -> Self {
        DataCipher {
            id,
            aead: Aes256Gcm::new(material.expose().into()),
        }
    }

    pub(crate) fn id(&self) -> KeyId {
        self.id
    }

    /// Seal with a fresh nonce from the thread-local CSPRNG (ChaCha, seeded and periodically
    /// reseeded from the OS): unpredictable and, at our per-key volumes, unique.
    pub(crate) fn seal(&self, label: &Label, plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        self.seal_with_nonce(label, &nonce, plaintext)
    }

    /// Seal with a caller-chosen nonce. Only the test vectors use a fixed nonce.
    pub(crate) fn seal_with_nonce(
        &self,
        label: &Label,
        nonce: &[u8; NONCE_LEN],
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        if plaintext.len() > format::MAX_PLAINTEXT_LEN {
            return Err(Error::PlaintextTooLarge {
                len: plaintext.len(),
                max: format::MAX_PLAINTEXT_LEN,
            });
        }
        // One allocation of the exact final size: no reallocation copies plaintext around.
        let mut out = Vec::with_capacity(format::sealed_len(plaintext.len()));
        format::write_header(&mut out, &self.id, nonce);
        format::write_length(&mut out, plaintext.len());
        let body = out.len();
        out.extend_from_slice(plaintext);
        let (header, buffer) = out.split_at_mut(body);
        let tag = format::with_aad(header, label, |aad| {
            self.aead
                .encrypt_inout_detached(&Nonce::from(*nonce), aad, buffer.into())
        })
        // Only possible past GCM's 2^36-byte limit, far above MAX_PLAINTEXT_LEN.
        .map_err(|_| Error::PlaintextTooLarge {
            len: plaintext.len(),
            max: format::MAX_PLAINTEXT_LEN,
        })?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Open a parsed value. The caller has checked that the value's key id is this key's.
    pub(crate) fn open(&self, envelope: &Envelope<'_>, label: &Label) -> Result<Vec<u8>> {
        debug_assert_eq!(envelope.key_id(), self.id);
        let mut buf = envelope.ciphertext().to_vec();
        let nonce = Nonce::try_from(envelope.nonce()).map_err(|_| Error::Decrypt)?;
        let tag = Tag::from(*envelope.tag());
        let result = format::with_aad(envelope.header(), label, |aad| {
            self.aead
                .decrypt_inout_detached(&nonce, aad, (&mut buf[..]).into(), &tag)
        });
        match result {
            Ok(()) => Ok(buf),
            Err(_) => {
                buf.zeroize();
                Err(Error::Decrypt)
            }
        }
    }
}

/// A key-wrapping cipher for the local KMS: AES-256-GCM over a 32-byte key.
///
/// Wrapped form: `0x01 || nonce (12) || ciphertext (32) || tag (16)`, 61 bytes.
pub(crate) struct WrapCipher(Aes256Gcm);

impl WrapCipher {
    pub(crate) const WRAPPED_LEN: usize = 1 + NONCE_LEN + KeyMaterial::LEN + 16;

    pub(crate) fn new(master: &KeyMaterial) -> Self {
        WrapCipher(Aes256Gcm::new(master.expose().into()))
    }

    /// `None` only if GCM refuses the input, which 32 bytes never trigger.
    pub(crate) fn wrap(&self, aad: &[u8], key: &KeyMaterial) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let mut out = Vec::with_capacity(Self::WRAPPED_LEN);
        out.push(1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(key.expose());
        let tag = self.0.encrypt_inout_detached(
            &Nonce::from(nonce),
            aad,
            (&mut out[1 + NONCE_LEN..]).into(),
        );
        match tag {
            Ok(tag) => {
                out.extend_from_slice(&tag);
                Some(out)
            }
            Err(_) => {
                // Never leave plaintext key bytes behind.
                out.zeroize();
                None
            }
        }
    }

    /// `None` when the bytes are not a wrapped key of this cipher under this AAD.
    pub(crate) fn unwrap(&self, aad: &[u8], wrapped: &[u8]) -> Option<KeyMaterial> {
        if wrapped.len() != Self::WRAPPED_LEN || wrapped[0] != 1 {
            return None;
        }
        let nonce = Nonce::try_from(&wrapped[1..1 + NONCE_LEN]).ok()?;
        let tag = Tag::try_from(&wrapped[1 + NONCE_LEN + KeyMaterial::LEN..]).ok()?;
        let mut key = zeroize::Zeroizing::new([0u8; KeyMaterial::LEN]);
        key.copy_from_slice(&wrapped[1 + NONCE_LEN..1 + NONCE_LEN + KeyMaterial::LEN]);
        self.0
            .decrypt_inout_detached(&nonce, aad, (&mut key[..]).into(), &tag)
            .ok()?;
        KeyMaterial::from_slice(&key[..]).ok()
    }
}

impl fmt::Debug for DataCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataCipher")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher(byte: u8) -> DataCipher {
        DataCipher::new(
            KeyId::from_bytes([byte; 16]),
            &KeyMaterial::from_slice(&[byte; 32]).unwrap(),
        )
    }

    #[test]
    fn seal_open_round_trip() {
        let c = cipher(1);
        let label = Label::new("users.ssn").unwrap();
        for pt in [&b""[..], b"x", &[7u8; 4096][..]] {
            let blob = c.seal(&label, pt).unwrap();
            assert_eq!(blob.len(), format::sealed_len(pt.len()));
            let env = format::parse(&blob).unwrap();
            assert_eq!(c.open(&env, &label).unwrap(), pt);
        }
    }

    #[test]
    fn nonces_differ() {
        let c = cipher(1);
        let label = Label::new("t.c").unwrap();
        let a = c.seal(&label, b"same").unwrap();
        let b = c.seal(&label, b"same").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn wrong_label_or_key_fails_opaquely() {
        let c = cipher(1);
        let blob = c
            .seal(&Label::new("users.ssn").unwrap(), b"secret")
            .unwrap();
        let env = format::parse(&blob).unwrap();
        assert!(matches!(
            c.open(&env, &Label::new("users.email").unwrap()),
            Err(Error::Decrypt)
        ));
        let other = DataCipher::new(c.id(), &KeyMaterial::from_slice(&[2; 32]).unwrap());
        assert!(matches!(
            other.open(&env, &Label::new("users.ssn").unwrap()),
            Err(Error::Decrypt)
        ));
    }

    #[test]
    fn debug_shows_only_the_id() {
        let dbg = format!("{:?}", cipher(3));
        assert!(dbg.contains("DataCipher"));
        assert!(!dbg.contains("aead"));
    }
}
