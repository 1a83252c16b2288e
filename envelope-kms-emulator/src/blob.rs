//! The CiphertextBlob format: how the emulator seals data keys under its master keys.

use std::collections::BTreeMap;

use aws_lc_rs::aead::{Aad, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rand::{Rng as _, RngExt as _};
use zeroize::Zeroizing;

use crate::api::{ApiError, api_error};
use crate::state::{CmkEntry, usable};
use crate::{BLOB_MARKER, BLOB_SEPARATOR};

/// `base64(key id, nonce, filler: 64 bytes) -k- base64(marker: 16 bytes) -k- base64(ciphertext || tag)`.
pub(crate) fn seal_blob(
    entry: &CmkEntry,
    context: &str,
    plaintext: &[u8],
) -> Result<String, ApiError> {
    let nonce: [u8; 12] = rand::rng().random();
    let mut head = [0u8; 64];
    let id = entry.meta.key_id.as_bytes();
    if id.len() > 36 {
        return Err(api_error("InternalError", "key id too long"));
    }
    head[..id.len()].copy_from_slice(id);
    head[36..48].copy_from_slice(&nonce);
    rand::rng().fill_bytes(&mut head[48..]);
    let mut body = plaintext.to_vec();
    let aad = blob_aad(&entry.meta.key_id, context);
    let tag = entry
        .cipher
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad),
            &mut body,
        )
        .map_err(|_| api_error("FailedOperation.EncryptionError", "encryption failed"))?;
    body.extend_from_slice(tag.as_ref());
    Ok(format!(
        "{}{BLOB_SEPARATOR}{}{BLOB_SEPARATOR}{}",
        STANDARD.encode(head),
        STANDARD.encode(BLOB_MARKER),
        STANDARD.encode(&body)
    ))
}

fn blob_aad(key_id: &str, context: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(key_id.len() + 1 + context.len());
    aad.extend_from_slice(key_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(context.as_bytes());
    aad
}

fn invalid_ciphertext() -> ApiError {
    api_error(
        "InvalidParameterValue.InvalidCiphertext",
        "the ciphertext is invalid, or the EncryptionContext does not match",
    )
}

/// Open a blob: returns the key id and the plaintext.
pub(crate) fn open_blob(
    keys: &BTreeMap<String, CmkEntry>,
    blob: &str,
    context: &str,
) -> Result<(String, Zeroizing<Vec<u8>>), ApiError> {
    let parts: Vec<&str> = blob.split(BLOB_SEPARATOR).collect();
    let [head, marker, body] = parts[..] else {
        return Err(invalid_ciphertext());
    };
    let head = STANDARD.decode(head).map_err(|_| invalid_ciphertext())?;
    let marker = STANDARD.decode(marker).map_err(|_| invalid_ciphertext())?;
    let body = STANDARD.decode(body).map_err(|_| invalid_ciphertext())?;
    if head.len() != 64 || marker != BLOB_MARKER || body.len() < 16 {
        return Err(invalid_ciphertext());
    }
    let id_end = head[..36].iter().position(|&b| b == 0).unwrap_or(36);
    let key_id = std::str::from_utf8(&head[..id_end]).map_err(|_| invalid_ciphertext())?;
    let entry = usable(keys, key_id)?;
    let nonce =
        Nonce::try_assume_unique_for_key(&head[36..48]).map_err(|_| invalid_ciphertext())?;
    let (ct, tag) = body.split_at(body.len() - 16);
    let mut plaintext = Zeroizing::new(vec![0u8; ct.len()]);
    entry
        .cipher
        .open_separate_gather(
            nonce,
            Aad::from(&blob_aad(key_id, context)),
            ct,
            tag,
            &mut plaintext[..],
        )
        .map_err(|_| invalid_ciphertext())?;
    Ok((entry.meta.key_id.clone(), plaintext))
}
