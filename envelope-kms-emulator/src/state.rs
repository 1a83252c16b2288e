//! Key states and the state file that keeps keys across restarts.

use std::collections::BTreeMap;
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, LessSafeKey, UnboundKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rand::RngExt as _;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::api::{ApiError, api_error};
use crate::{Shared, StartError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum KeyState {
    Enabled,
    Disabled,
    PendingDelete,
}

impl KeyState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            KeyState::Enabled => "Enabled",
            KeyState::Disabled => "Disabled",
            KeyState::PendingDelete => "PendingDelete",
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct StoredKey {
    pub(crate) key_id: String,
    pub(crate) alias: String,
    pub(crate) description: String,
    pub(crate) key_state: KeyState,
    pub(crate) create_time: i64,
    pub(crate) deletion_date: Option<i64>,
    /// The master key, base64. The state file is the emulator's own; it is never a real KMS.
    pub(crate) material: String,
}

pub(crate) struct CmkEntry {
    pub(crate) meta: StoredKey,
    pub(crate) cipher: LessSafeKey,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StateFile {
    version: u32,
    keys: Vec<StoredKey>,
}

pub(crate) fn load_state(path: &Path) -> Result<BTreeMap<String, CmkEntry>, StartError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => Zeroizing::new(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => {
            return Err(StartError::ReadState {
                path: path.to_owned(),
                source,
            });
        }
    };
    let bad = |detail: String| StartError::BadState {
        path: path.to_owned(),
        detail,
    };
    // Only where and what kind: serde_json's own message can quote the file, key material
    // included.
    let state: StateFile = serde_json::from_str(&text).map_err(|e| {
        bad(format!(
            "{:?} error at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    let mut keys = BTreeMap::new();
    for meta in state.keys {
        let material = Zeroizing::new(
            STANDARD
                .decode(&meta.material)
                .map_err(|_| bad(format!("key {} has bad material", meta.key_id)))?,
        );
        let cipher = cmk_cipher(&material)
            .ok_or_else(|| bad(format!("key {} has bad material", meta.key_id)))?;
        keys.insert(meta.key_id.clone(), CmkEntry { meta, cipher });
    }
    Ok(keys)
}

/// Write `keys` (every key's metadata, in the order of the state file) atomically (temporary
/// file, then rename), readable by the owner only. Callers change the keys in memory only once
/// this succeeded, so memory never holds a key the file lost.
pub(crate) fn persist<'a>(
    shared: &Shared,
    keys: impl Iterator<Item = &'a StoredKey>,
) -> Result<(), ApiError> {
    let Some(path) = &shared.config.state_file else {
        return Ok(());
    };
    let state = StateFile {
        version: 1,
        keys: keys
            .map(|k| StoredKey {
                key_id: k.key_id.clone(),
                alias: k.alias.clone(),
                description: k.description.clone(),
                key_state: k.key_state,
                create_time: k.create_time,
                deletion_date: k.deletion_date,
                material: k.material.clone(),
            })
            .collect(),
    };
    let text = Zeroizing::new(
        serde_json::to_string_pretty(&state)
            .map_err(|_| api_error("InternalError", "cannot serialize the state"))?,
    );
    // A fresh name, created exclusively with mode 0600: the file is never readable by others,
    // not even for the moment between creating and writing it, and a stale or planted file (or
    // a symlink) at a fixed temporary name cannot lend it wider permissions or another target.
    let suffix: u64 = rand::rng().random();
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".{suffix:016x}.tmp"));
    let tmp = path.with_file_name(tmp_name);
    let write = || -> std::io::Result<()> {
        use std::io::Write as _;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        let written = f
            .write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    };
    write().map_err(|e| {
        api_error(
            "InternalError",
            format!("cannot write the state file {}: {e}", path.display()),
        )
    })
}

/// An AES-256-GCM key; `None` unless `material` is 32 bytes.
pub(crate) fn cmk_cipher(material: &[u8]) -> Option<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, material)
        .ok()
        .map(LessSafeKey::new)
}

/// The entry for a KeyId (or `alias/NAME`).
pub(crate) fn find<'a>(
    keys: &'a BTreeMap<String, CmkEntry>,
    id: &str,
) -> Result<&'a CmkEntry, ApiError> {
    let found = match id.strip_prefix("alias/") {
        Some(alias) => keys.values().find(|k| k.meta.alias == alias),
        None => keys.get(id),
    };
    found.ok_or_else(|| api_error("ResourceUnavailable.CmkNotFound", format!("no key {id}")))
}

pub(crate) fn usable<'a>(
    keys: &'a BTreeMap<String, CmkEntry>,
    id: &str,
) -> Result<&'a CmkEntry, ApiError> {
    let entry = find(keys, id)?;
    match entry.meta.key_state {
        KeyState::Enabled => Ok(entry),
        KeyState::Disabled => Err(api_error(
            "ResourceUnavailable.CmkDisabled",
            "the key is disabled",
        )),
        KeyState::PendingDelete => Err(api_error(
            "ResourceUnavailable.KeyPendingDelete",
            "the key is pending deletion",
        )),
    }
}
