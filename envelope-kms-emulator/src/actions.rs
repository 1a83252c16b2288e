//! The KMS actions: CreateKey, DescribeKey, key states, GenerateDataKey, Encrypt, Decrypt,
//! ReEncrypt, GenerateRandom.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rand::{Rng as _, RngExt as _};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::api::{ApiError, api_error, context_bytes, int_param, opt_str, str_param, uuid_text};
use crate::auth::now_secs;
use crate::blob::{open_blob, seal_blob};
use crate::state::{CmkEntry, KeyState, StoredKey, cmk_cipher, find, persist, usable};
use crate::{Shared, lock};

fn new_key_id() -> String {
    // A version-4 UUID, as Tencent's KeyIds are.
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    uuid_text(b)
}

fn metadata(m: &StoredKey) -> Value {
    json!({
        "KeyId": m.key_id,
        "Alias": m.alias,
        "Description": m.description,
        "KeyState": m.key_state.as_str(),
        "KeyUsage": "ENCRYPT_DECRYPT",
        "CreateTime": m.create_time,
        "DeletionDate": m.deletion_date.unwrap_or(0),
        "Type": 1,
        "Origin": "TENCENT_KMS",
    })
}

pub(crate) fn create_key(shared: &Shared, params: &Value) -> Result<Value, ApiError> {
    let alias = str_param(params, "Alias")?.to_owned();
    let description = opt_str(params, "Description")?.unwrap_or("").to_owned();
    if let Some(usage) = opt_str(params, "KeyUsage")?
        && usage != "ENCRYPT_DECRYPT"
    {
        return Err(api_error(
            "UnsupportedOperation",
            "the emulator makes ENCRYPT_DECRYPT keys only",
        ));
    }
    let material: Zeroizing<[u8; 32]> = Zeroizing::new(rand::rng().random());
    let meta = StoredKey {
        key_id: new_key_id(),
        alias,
        description,
        key_state: KeyState::Enabled,
        create_time: now_secs(),
        deletion_date: None,
        material: STANDARD.encode(*material),
    };
    let response = metadata(&meta);
    let mut keys = lock(&shared.keys);
    if keys.values().any(|k| k.meta.alias == meta.alias) {
        return Err(api_error(
            "InvalidParameterValue.AliasAlreadyExists",
            "a key with this alias exists",
        ));
    }
    let cipher = cmk_cipher(&material[..])
        .ok_or_else(|| api_error("InternalError", "the key could not be initialized"))?;
    // Written first, kept in memory only once written: a key the state file does not hold
    // would vanish at the next restart with every blob under it.
    persist(
        shared,
        keys.values().map(|k| &k.meta).chain(std::iter::once(&meta)),
    )?;
    keys.insert(meta.key_id.clone(), CmkEntry { cipher, meta });
    Ok(response)
}

/// Change the key `key_id` with `change`, keeping the change only if the state file took it.
fn change_persisted(
    shared: &Shared,
    keys: &mut BTreeMap<String, CmkEntry>,
    key_id: &str,
    change: impl FnOnce(&mut StoredKey),
) -> Result<(), ApiError> {
    let entry = keys
        .get_mut(key_id)
        .ok_or_else(|| api_error("ResourceUnavailable.CmkNotFound", "no such key"))?;
    let (state, deletion) = (entry.meta.key_state, entry.meta.deletion_date);
    change(&mut entry.meta);
    let written = persist(shared, keys.values().map(|k| &k.meta));
    if written.is_err()
        && let Some(entry) = keys.get_mut(key_id)
    {
        entry.meta.key_state = state;
        entry.meta.deletion_date = deletion;
    }
    written
}

pub(crate) fn describe_key(shared: &Shared, params: &Value) -> Result<Value, ApiError> {
    let keys = lock(&shared.keys);
    let entry = find(&keys, str_param(params, "KeyId")?)?;
    Ok(json!({ "KeyMetadata": metadata(&entry.meta) }))
}

pub(crate) fn set_state(
    shared: &Shared,
    params: &Value,
    state: KeyState,
) -> Result<Value, ApiError> {
    let id = str_param(params, "KeyId")?;
    let mut keys = lock(&shared.keys);
    let entry = find(&keys, id)?;
    if entry.meta.key_state == KeyState::PendingDelete {
        return Err(api_error(
            "ResourceUnavailable.KeyPendingDelete",
            "the key is pending deletion; cancel the deletion first",
        ));
    }
    let key_id = entry.meta.key_id.clone();
    change_persisted(shared, &mut keys, &key_id, |m| m.key_state = state)?;
    Ok(json!({}))
}

pub(crate) fn schedule_deletion(shared: &Shared, params: &Value) -> Result<Value, ApiError> {
    let id = str_param(params, "KeyId")?;
    let days = int_param(params, "PendingWindowInDays")?
        .ok_or_else(|| api_error("MissingParameter", "PendingWindowInDays is missing"))?;
    if !(7..=30).contains(&days) {
        return Err(api_error(
            "InvalidParameterValue",
            "PendingWindowInDays must be 7 to 30",
        ));
    }
    let mut keys = lock(&shared.keys);
    let key_id = find(&keys, id)?.meta.key_id.clone();
    let date = now_secs() + days * 86_400;
    change_persisted(shared, &mut keys, &key_id, |m| {
        m.key_state = KeyState::PendingDelete;
        m.deletion_date = Some(date);
    })?;
    Ok(json!({"KeyId": key_id, "DeletionDate": date}))
}

pub(crate) fn generate_data_key(shared: &Shared, params: &Value) -> Result<Value, ApiError> {
    let id = str_param(params, "KeyId")?;
    let len = match (
        int_param(params, "NumberOfBytes")?,
        opt_str(params, "KeySpec")?,
    ) {
        (Some(n), _) if (1..=1024).contains(&n) => usize::try_from(n).unwrap_or(32),
        (Some(_), _) => {
            return Err(api_error(
                "InvalidParameterValue",
                "NumberOfBytes must be 1 to 1024",
            ));
        }
        (None, Some("AES_256")) => 32,
        (None, Some("AES_128")) => 16,
        (None, Some(_)) => {
            return Err(api_error(
                "InvalidParameterValue",
                "KeySpec must be AES_128 or AES_256",
            ));
        }
        (None, None) => {
            return Err(api_error(
                "InvalidParameter",
                "one of KeySpec and NumberOfBytes is required",
            ));
        }
    };
    let context = context_bytes(params, "EncryptionContext")?;
    let keys = lock(&shared.keys);
    let entry = usable(&keys, id)?;
    let mut key = Zeroizing::new(vec![0u8; len]);
    rand::rng().fill_bytes(&mut key);
    let blob = seal_blob(entry, &context, &key)?;
    Ok(json!({
        "KeyId": entry.meta.key_id,
        "Plaintext": STANDARD.encode(&*key),
        "CiphertextBlob": blob,
    }))
}

pub(crate) fn decrypt(shared: &Shared, params: &Value) -> Result<Value, ApiError> {
    let blob = str_param(params, "CiphertextBlob")?;
    let context = context_bytes(params, "EncryptionContext")?;
    let keys = lock(&shared.keys);
    let (key_id, plaintext) = open_blob(&keys, blob, &context)?;
    Ok(json!({"KeyId": key_id, "Plaintext": STANDARD.encode(&*plaintext)}))
}

pub(crate) fn encrypt(shared: &Shared, params: &Value) -> Result<Value, ApiError> {
    let id = str_param(params, "KeyId")?;
    let plaintext = Zeroizing::new(STANDARD.decode(str_param(params, "Plaintext")?).map_err(
        |_| {
            api_error(
                "InvalidParameterValue.InvalidPlaintext",
                "Plaintext is not base64",
            )
        },
    )?);
    if plaintext.len() > 4096 {
        return Err(api_error(
            "InvalidParameterValue.InvalidPlaintext",
            "Plaintext is larger than 4 KB",
        ));
    }
    let context = context_bytes(params, "EncryptionContext")?;
    let keys = lock(&shared.keys);
    let entry = usable(&keys, id)?;
    Ok(
        json!({"KeyId": entry.meta.key_id, "CiphertextBlob": seal_blob(entry, &context, &plaintext)?}),
    )
}

pub(crate) fn re_encrypt(shared: &Shared, params: &Value) -> Result<Value, ApiError> {
    let blob = str_param(params, "CiphertextBlob")?;
    let source_context = context_bytes(params, "SourceEncryptionContext")?;
    let destination_context = context_bytes(params, "DestinationEncryptionContext")?;
    let keys = lock(&shared.keys);
    let (source_id, plaintext) = open_blob(&keys, blob, &source_context)?;
    let destination = match opt_str(params, "DestinationKeyId")? {
        None | Some("") => source_id.clone(),
        Some(d) => find(&keys, d)?.meta.key_id.clone(),
    };
    if destination == source_id && destination_context == source_context {
        // Nothing to change: the real service returns the blob as it is.
        return Ok(json!({
            "CiphertextBlob": blob, "KeyId": destination, "SourceKeyId": source_id, "ReEncrypted": false
        }));
    }
    let entry = usable(&keys, &destination)?;
    Ok(json!({
        "CiphertextBlob": seal_blob(entry, &destination_context, &plaintext)?,
        "KeyId": destination,
        "SourceKeyId": source_id,
        "ReEncrypted": true,
    }))
}

pub(crate) fn generate_random(params: &Value) -> Result<Value, ApiError> {
    let n = int_param(params, "NumberOfBytes")?
        .ok_or_else(|| api_error("MissingParameter", "NumberOfBytes is missing"))?;
    if !(1..=1024).contains(&n) {
        return Err(api_error(
            "InvalidParameterValue",
            "NumberOfBytes must be 1 to 1024",
        ));
    }
    let mut bytes = vec![0u8; usize::try_from(n).unwrap_or(0)];
    rand::rng().fill_bytes(&mut bytes);
    Ok(json!({"Plaintext": STANDARD.encode(bytes)}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EmulatorConfig;

    /// An emulator whose state file cannot be written: its directory does not exist.
    fn unwritable() -> (tempfile::TempDir, Shared) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = EmulatorConfig::local("AKIDtest", "test-secret-key");
        config.state_file = Some(dir.path().join("missing").join("state.json"));
        let shared = Shared::new(config).unwrap();
        (dir, shared)
    }

    #[test]
    fn create_key_keeps_no_key_whose_state_was_not_written() {
        let (_dir, shared) = unwritable();
        let failed = create_key(&shared, &json!({"Alias": "lost"})).unwrap_err();
        assert_eq!(failed.code, "InternalError");
        assert!(lock(&shared.keys).is_empty(), "a key the file never held");
        let described = describe_key(&shared, &json!({"KeyId": "alias/lost"})).unwrap_err();
        assert_eq!(described.code, "ResourceUnavailable.CmkNotFound");
    }

    #[test]
    fn a_key_state_change_the_file_refused_is_undone() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("state");
        std::fs::create_dir(&sub).unwrap();
        let mut config = EmulatorConfig::local("AKIDtest", "test-secret-key");
        config.state_file = Some(sub.join("state.json"));
        let shared = Shared::new(config).unwrap();
        let created = create_key(&shared, &json!({"Alias": "kept"})).unwrap();
        let id = created["KeyId"].as_str().unwrap().to_owned();
        std::fs::remove_dir_all(&sub).unwrap();
        assert!(set_state(&shared, &json!({"KeyId": id}), KeyState::Disabled).is_err());
        assert!(
            schedule_deletion(&shared, &json!({"KeyId": id, "PendingWindowInDays": 7})).is_err()
        );
        let keys = lock(&shared.keys);
        assert_eq!(keys[&id].meta.key_state, KeyState::Enabled);
        assert_eq!(keys[&id].meta.deletion_date, None);
    }
}
