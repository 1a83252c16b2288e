//! The keyring's unit tests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use super::*;
use crate::error::{KmsError, StoreError};
use crate::keys::{KeyKind, KeyMaterial};
use crate::kms::EncryptionContext;
use crate::kms::local::LocalKms;
use crate::store::{KeyFilter, MemoryKeyStore};

fn label() -> Label {
    Label::new("users.ssn").unwrap()
}

fn keyring_with(policy: Policy, clock: Clock) -> (Keyring, Arc<MemoryKeyStore>) {
    let kms = LocalKms::from_key(KeyMaterial::generate().unwrap());
    let cmk = kms.cmk_id().to_owned();
    let store = Arc::new(MemoryKeyStore::new());
    let k = Keyring::builder(kms, store.clone())
        .cmk(cmk)
        .policy(policy)
        .clock(clock)
        .build()
        .unwrap();
    (k, store)
}

#[test]
fn rotates_by_use_count() {
    let policy = Policy {
        dek_max_uses: 10,
        ..Policy::default()
    };
    let (k, store) = keyring_with(policy, Clock::default());
    let mut per_key = HashMap::new();
    for _ in 0..35 {
        let blob = k.blocking().encrypt(&label(), b"v").unwrap();
        *per_key
            .entry(format::peek_key_id(&blob).unwrap())
            .or_insert(0) += 1;
    }
    // Each key serves exactly its quota: 10, 10, 10, 5.
    let mut counts: Vec<i32> = per_key.values().copied().collect();
    counts.sort_unstable();
    assert_eq!(counts, vec![5, 10, 10, 10]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let rows = rt.block_on(store.list(&KeyFilter::all())).unwrap();
    // Every key made is in the table (the last one may be a prepared successor).
    assert_eq!(rows.len() as u64, k.metrics().kms_generate_data_key);
    assert_eq!(k.metrics().rotations, 4);
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn rotates_by_age_and_prepares_the_successor_ahead() {
    let clock = Clock::default();
    let policy = Policy {
        dek_max_age: Duration::from_secs(100),
        ..Policy::default()
    };
    let (k, store) = keyring_with(policy, clock.clone());
    let first = format::peek_key_id(&k.blocking().encrypt(&label(), b"a").unwrap()).unwrap();
    clock.advance(Duration::from_secs(50));
    k.tick();
    assert_eq!(k.metrics().kms_generate_data_key, 1);
    // Past 80 %: the tick prepares the successor in the background; writes stay on the
    // current key until its hard limit.
    clock.advance(Duration::from_secs(35));
    k.tick();
    wait_until("the successor", || k.metrics().kms_generate_data_key == 2);
    let same = format::peek_key_id(&k.blocking().encrypt(&label(), b"a").unwrap()).unwrap();
    assert_eq!(first, same);
    // Past 100 %: the successor takes over with no KMS call, and the old key is retired.
    clock.advance(Duration::from_secs(20));
    k.tick();
    let next = format::peek_key_id(&k.blocking().encrypt(&label(), b"a").unwrap()).unwrap();
    assert_ne!(first, next);
    assert_eq!(k.metrics().kms_generate_data_key, 2);
    assert_eq!(k.metrics().rotations, 2);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    wait_until("the old key's retirement", || {
        rt.block_on(store.get(&first))
            .unwrap()
            .unwrap()
            .retired_at
            .is_some()
    });
    // Old values stay readable.
    let blob = k.blocking().encrypt(&label(), b"x").unwrap();
    assert_eq!(rt.block_on(k.decrypt(&label(), &blob)).unwrap(), b"x");
}

#[test]
fn policy_is_validated() {
    for p in [
        Policy {
            dek_max_uses: 0,
            ..Policy::default()
        },
        Policy {
            dek_max_uses: MAX_USES_CEILING + 1,
            ..Policy::default()
        },
        Policy {
            refresh_at_percent: 100,
            ..Policy::default()
        },
        Policy {
            cache_capacity: 0,
            ..Policy::default()
        },
        // Values that would overflow a deadline (`now + limit`) are refused, not a panic.
        Policy {
            kms_timeout: Duration::MAX,
            ..Policy::default()
        },
        Policy {
            dek_max_age: Duration::MAX,
            ..Policy::default()
        },
        Policy {
            cache_ttl: Duration::MAX,
            ..Policy::default()
        },
        Policy {
            refresh_retry: Duration::MAX,
            ..Policy::default()
        },
    ] {
        let kms = LocalKms::from_key(KeyMaterial::generate().unwrap());
        let cmk = kms.cmk_id().to_owned();
        let err = Keyring::builder(kms, MemoryKeyStore::new())
            .cmk(cmk)
            .policy(p)
            .build()
            .unwrap_err();
        assert!(
            matches!(err, Error::Misuse(crate::error::Misuse::Policy { .. })),
            "{err}"
        );
    }
    let p = Policy {
        dek_max_uses: 1 << 28,
        ..Policy::default()
    };
    assert_eq!(p.soft_uses(), (1u64 << 28) * 80 / 100);
}

#[test]
fn copied_wrapped_key_is_refused() {
    let (k, store) = keyring_with(Policy::default(), Clock::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let blob_a = k.blocking().encrypt(&label(), b"a").unwrap();
    let a = format::peek_key_id(&blob_a).unwrap();
    let b = rt.block_on(k.rotate(&Scope::default())).unwrap();
    // Forge: give row B the wrapped key and context of row A.
    let ra = rt.block_on(store.get(&a)).unwrap().unwrap();
    let mut rb = rt.block_on(store.get(&b)).unwrap().unwrap();
    rt.block_on(store.delete(&b)).unwrap();
    rb.wrapped = ra.wrapped.clone();
    rb.kms_context = ra.kms_context.clone();
    rt.block_on(store.insert(&rb)).unwrap();
    // A fresh keyring over the same store (cold cache) must refuse row B.
    let kms2 = k.kms().clone();
    let k2 = Keyring::builder(kms2, store.clone())
        .cmk(k.cmk())
        .build()
        .unwrap();
    let mut forged = blob_a.clone();
    forged[format::KEY_ID_OFFSET..format::KEY_ID_OFFSET + 16].copy_from_slice(b.as_bytes());
    let err = k2.blocking().decrypt(&label(), &forged).unwrap_err();
    assert!(
        matches!(err, Error::Store(StoreError::Corrupt { .. })),
        "{err}"
    );
}

/// A provider over a local KMS that can be made to hang, block its thread, fail, or answer
/// slowly, and counts the calls that reach it.
struct Faulty {
    /// What `name` reports: `local` unless made with `Faulty::named`.
    name: &'static str,
    inner: LocalKms,
    mode: AtomicU64,
    /// What `call_budget` reports, in milliseconds (0: none).
    budget_ms: AtomicU64,
    generate_calls: AtomicU64,
    decrypt_calls: AtomicU64,
}

const OK: u64 = 0;
const HANG: u64 = 1;
const DOWN: u64 = 2;
const SLOW: u64 = 3;
const BLOCK_THREAD: u64 = 4;

impl Faulty {
    fn new(inner: LocalKms) -> Arc<Self> {
        Self::named("local", inner)
    }

    /// Like a cloud KMS: it reports no master keys of its own (`holds_cmk` is `None`).
    fn named(name: &'static str, inner: LocalKms) -> Arc<Self> {
        Arc::new(Faulty {
            name,
            inner,
            mode: AtomicU64::new(OK),
            budget_ms: AtomicU64::new(0),
            generate_calls: AtomicU64::new(0),
            decrypt_calls: AtomicU64::new(0),
        })
    }

    fn set(&self, mode: u64) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    async fn fault(&self) -> std::result::Result<(), KmsError> {
        match self.mode.load(Ordering::SeqCst) {
            HANG => std::future::pending().await,
            DOWN => Err(KmsError::new("local", crate::KmsErrorKind::Unavailable)),
            SLOW => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(())
            }
            BLOCK_THREAD => {
                std::thread::sleep(Duration::from_secs(5));
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl KmsProvider for Faulty {
    fn name(&self) -> &str {
        self.name
    }

    fn call_budget(&self) -> Option<Duration> {
        match self.budget_ms.load(Ordering::SeqCst) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    async fn generate_data_key(
        &self,
        cmk: &str,
        context: &EncryptionContext,
    ) -> std::result::Result<crate::GeneratedDataKey, KmsError> {
        self.generate_calls.fetch_add(1, Ordering::SeqCst);
        self.fault().await?;
        self.inner.generate_data_key(cmk, context).await
    }

    async fn decrypt(
        &self,
        cmk: &str,
        wrapped: &[u8],
        context: &EncryptionContext,
    ) -> std::result::Result<KeyMaterial, KmsError> {
        self.decrypt_calls.fetch_add(1, Ordering::SeqCst);
        self.fault().await?;
        self.inner.decrypt(cmk, wrapped, context).await
    }

    async fn encrypt(
        &self,
        cmk: &str,
        plaintext: &KeyMaterial,
        context: &EncryptionContext,
    ) -> std::result::Result<Vec<u8>, KmsError> {
        self.inner.encrypt(cmk, plaintext, context).await
    }
}

fn faulty_keyring(
    policy: Policy,
    clock: Clock,
    store: Arc<MemoryKeyStore>,
) -> (Keyring, Arc<Faulty>) {
    let kms = Faulty::new(LocalKms::from_key(
        KeyMaterial::from_slice(&[9; 32]).unwrap(),
    ));
    let cmk = kms.inner.cmk_id().to_owned();
    let k = Keyring::builder(kms.clone(), store)
        .cmk(cmk)
        .policy(policy)
        .clock(clock)
        .build()
        .unwrap();
    (k, kms)
}

fn quick() -> Policy {
    Policy {
        kms_timeout: Duration::from_millis(300),
        ..Policy::default()
    }
}

#[test]
fn a_hung_kms_is_asked_once_then_writes_fail_fast() {
    let (k, kms) = faulty_keyring(quick(), Clock::default(), Arc::new(MemoryKeyStore::new()));
    kms.set(HANG);
    for _ in 0..3 {
        let err = k.blocking().encrypt(&label(), b"v").unwrap_err();
        assert!(
            matches!(
                err,
                Error::Unavailable(crate::error::Unavailable::WriteKey { .. })
            ),
            "{err}"
        );
        assert!(err.report().to_string().contains("timed out"), "{err}");
    }
    assert_eq!(kms.generate_calls.load(Ordering::SeqCst), 1);
}

#[test]
fn a_hung_kms_is_asked_once_for_a_key_that_is_not_cached() {
    let store = Arc::new(MemoryKeyStore::new());
    let (writer, _) = faulty_keyring(quick(), Clock::default(), store.clone());
    let blob = writer.blocking().encrypt(&label(), b"v").unwrap();
    let (reader, kms) = faulty_keyring(quick(), Clock::default(), store);
    kms.set(HANG);
    for _ in 0..3 {
        let err = reader.blocking().decrypt(&label(), &blob).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Unavailable(crate::error::Unavailable::Timeout { .. })
            ),
            "{err}"
        );
    }
    assert_eq!(kms.decrypt_calls.load(Ordering::SeqCst), 1);
}

#[test]
fn the_async_api_is_bounded_when_the_provider_blocks_its_thread() {
    let (k, kms) = faulty_keyring(quick(), Clock::default(), Arc::new(MemoryKeyStore::new()));
    kms.set(BLOCK_THREAD);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let err = rt.block_on(k.encrypt(&label(), b"v")).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unavailable(crate::error::Unavailable::WriteKey { .. })
        ),
        "{err}"
    );
    // Bounded by kms_timeout (300 ms, plus the bridge's grace), not by the provider's 5 s.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn the_age_limit_holds_without_the_maintenance_tick() {
    let clock = Clock::default();
    let policy = Policy {
        dek_max_age: Duration::from_secs(100),
        ..Policy::default()
    };
    let (k, _) = keyring_with(policy, clock.clone());
    let first = format::peek_key_id(&k.blocking().encrypt(&label(), b"a").unwrap()).unwrap();
    clock.advance(Duration::from_secs(150)); // no tick
    let next = format::peek_key_id(&k.blocking().encrypt(&label(), b"a").unwrap()).unwrap();
    assert_ne!(first, next);
}

#[test]
fn the_outgoing_key_stays_cached_through_an_outage() {
    let clock = Clock::default();
    let policy = Policy {
        dek_max_age: Duration::from_secs(100),
        cache_ttl: Duration::from_millis(500),
        ..Policy::default()
    };
    let (k, kms) = faulty_keyring(policy, clock.clone(), Arc::new(MemoryKeyStore::new()));
    let old = k.blocking().encrypt(&label(), b"recent").unwrap();
    // The key's own cache entry (made with the key) expires.
    std::thread::sleep(Duration::from_millis(700));
    k.inner.cache.run_pending_tasks();
    clock.advance(Duration::from_secs(85));
    k.tick();
    wait_until("the successor", || {
        kms.generate_calls.load(Ordering::SeqCst) == 2
    });
    wait_until("the successor to be stored", || {
        k.inner.rotations.has_pending(&Scope::default())
    });
    kms.set(DOWN);
    clock.advance(Duration::from_secs(20));
    k.tick();
    let new = k.blocking().encrypt(&label(), b"x").unwrap();
    assert_ne!(format::peek_key_id(&new), format::peek_key_id(&old));
    assert_eq!(k.blocking().decrypt(&label(), &old).unwrap(), b"recent");
    assert_eq!(kms.decrypt_calls.load(Ordering::SeqCst), 0);
}

#[test]
fn concurrent_first_users_of_a_blind_index_make_one_key() {
    let (k, kms) = faulty_keyring(
        Policy::default(),
        Clock::default(),
        Arc::new(MemoryKeyStore::new()),
    );
    kms.set(SLOW);
    let spec = BlindIndexSpec::new(
        Label::new("customers.email").unwrap(),
        crate::Normalizer::CaseFolded,
    );
    let indexes: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..32)
            .map(|_| s.spawn(|| k.blocking().blind_index(&spec, b"a@example.com").unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(indexes.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(kms.generate_calls.load(Ordering::SeqCst), 1);
}

#[test]
fn reads_can_require_a_scope() {
    let store = Arc::new(MemoryKeyStore::new());
    let (k, _) = faulty_keyring(Policy::default(), Clock::default(), store.clone());
    let tenant_a = Scope::new("tenant-a").unwrap();
    let tenant_b = Scope::new("tenant-b").unwrap();
    let blob = k
        .blocking()
        .encrypt_scoped(&tenant_a, &label(), b"a's")
        .unwrap();
    assert_eq!(
        k.blocking()
            .decrypt_scoped(&tenant_a, &label(), &blob)
            .unwrap(),
        b"a's"
    );
    let err = k
        .blocking()
        .decrypt_scoped(&tenant_b, &label(), &blob)
        .unwrap_err();
    assert!(matches!(err, Error::ScopeMismatch { .. }), "{err}");
    // A keyring scoped to tenant B, with a cold cache, refuses it too.
    let kms = k.kms().clone();
    let b = Keyring::builder(kms, store.clone())
        .cmk(k.cmk())
        .default_scope(tenant_b)
        .build()
        .unwrap();
    let err = b.blocking().decrypt(&label(), &blob).unwrap_err();
    assert!(matches!(err, Error::ScopeMismatch { .. }), "{err}");
    // An unscoped keyring reads any scope.
    let any = Keyring::builder(k.kms().clone(), store.clone())
        .cmk(k.cmk())
        .build()
        .unwrap();
    assert_eq!(any.blocking().decrypt(&label(), &blob).unwrap(), b"a's");

    // A key row whose scope was edited (so shredding by scope would miss it) does not open.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let id = format::peek_key_id(&blob).unwrap();
    let mut row = rt.block_on(store.get(&id)).unwrap().unwrap();
    rt.block_on(store.delete(&id)).unwrap();
    row.scope = "tenant-c".into();
    rt.block_on(store.insert(&row)).unwrap();
    let cold = Keyring::builder(k.kms().clone(), store)
        .cmk(k.cmk())
        .build()
        .unwrap();
    let err = cold.blocking().decrypt(&label(), &blob).unwrap_err();
    assert!(
        matches!(err, Error::Store(StoreError::Corrupt { .. })),
        "{err}"
    );
}

#[test]
fn a_missing_master_key_stops_the_keyring_from_starting() {
    let store = Arc::new(MemoryKeyStore::new());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    let first = LocalKms::open_or_create_for_development(&path).unwrap();
    let first_id = first.cmk_id().to_owned();
    let k = Keyring::builder(first, store.clone())
        .cmk(first_id.clone())
        .build()
        .unwrap();
    let blob = k.blocking().encrypt(&label(), b"v").unwrap();
    drop(k);
    let backup = dir.path().join("backup.key");
    std::fs::copy(&path, &backup).unwrap();
    // The volume is not mounted: the file is gone, and development mode makes a new key.
    std::fs::remove_file(&path).unwrap();
    let second = LocalKms::open_or_create_for_development(&path).unwrap();
    let second_id = second.cmk_id().to_owned();
    let err = Keyring::builder(second, store.clone())
        .cmk(second_id)
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::MasterKeyMissing(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&first_id), "{msg}");
    assert!(msg.contains("master.key"), "{msg}");
    assert!(msg.contains("created just now"), "{msg}");
    // With the key restored, it starts and reads.
    let restored = LocalKms::open(&backup).unwrap();
    let k = Keyring::builder(restored, store)
        .cmk(first_id)
        .build()
        .unwrap();
    assert_eq!(k.blocking().decrypt(&label(), &blob).unwrap(), b"v");
}

#[test]
fn a_provider_whose_retries_outlast_the_timeout_is_refused() {
    let kms = Faulty::new(LocalKms::from_key(KeyMaterial::generate().unwrap()));
    kms.budget_ms.store(30_000, Ordering::SeqCst);
    let err = Keyring::builder(kms, MemoryKeyStore::new())
        .cmk("c")
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("kms_timeout"), "{err}");
}

#[test]
fn blocking_inside_a_current_thread_runtime_with_a_multi_thread_handle_entered() {
    let store = Arc::new(MemoryKeyStore::new());
    let (writer, _) = faulty_keyring(Policy::default(), Clock::default(), store.clone());
    let blob = writer.blocking().encrypt(&label(), b"v").unwrap();
    let (reader, _) = faulty_keyring(Policy::default(), Clock::default(), store);
    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let ct = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let opened = ct.block_on(async {
        let _entered = mt.handle().enter();
        reader.blocking().decrypt(&label(), &blob)
    });
    assert_eq!(opened.unwrap(), b"v");
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn key_of(blob: &[u8]) -> KeyId {
    format::peek_key_id(blob).unwrap()
}

#[test]
fn a_data_key_retired_in_the_key_table_takes_no_more_writes_after_a_refresh() {
    let (k, store) = keyring_with(Policy::default(), Clock::default());
    let first = k.blocking().encrypt(&label(), b"one").unwrap();
    let old = key_of(&first);
    block_on(store.retire(&old, SystemTime::now())).unwrap();
    // Until the keyring reads the table it keeps writing under its key...
    assert_eq!(key_of(&k.blocking().encrypt(&label(), b"x").unwrap()), old);
    block_on(k.refresh_keys()).unwrap();
    // ...then the next write makes a new key, and the old one stays readable.
    let second = k.blocking().encrypt(&label(), b"two").unwrap();
    assert_ne!(key_of(&second), old);
    assert_eq!(k.blocking().decrypt(&label(), &first).unwrap(), b"one");
    let live = block_on(store.list(&KeyFilter::default())).unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].id, key_of(&second));
}

#[test]
fn retiring_the_active_keys_closes_them_and_keeps_them_readable() {
    let (k, store) = keyring_with(Policy::default(), Clock::default());
    let first = k.blocking().encrypt(&label(), b"one").unwrap();
    assert_eq!(block_on(k.retire_active_keys()).unwrap(), 1);
    assert!(
        block_on(store.list(&KeyFilter::default()))
            .unwrap()
            .is_empty()
    );
    assert_eq!(k.blocking().decrypt(&label(), &first).unwrap(), b"one");
    let second = k.blocking().encrypt(&label(), b"two").unwrap();
    assert_ne!(key_of(&second), key_of(&first));
}

/// A short-lived job's guard: its key is closed when the job ends, from a plain thread and
/// from inside a current-thread runtime (where `#[tokio::main(flavor = "current_thread")]`
/// drops it).
#[test]
fn the_retire_guard_closes_the_active_key_when_it_drops() {
    let (k, store) = keyring_with(Policy::default(), Clock::default());
    let live = || block_on(store.list(&KeyFilter::default())).unwrap().len();
    {
        let _retire = k.retire_on_drop();
        k.blocking().encrypt(&label(), b"one").unwrap();
        assert_eq!(live(), 1);
    }
    assert_eq!(live(), 0);
    assert_eq!(
        k.blocking().retire_active_keys().unwrap(),
        0,
        "nothing left"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let _retire = k.retire_on_drop();
        k.encrypt(&label(), b"two").await.unwrap();
        assert_eq!(store.list(&KeyFilter::default()).await.unwrap().len(), 1);
    });
    assert_eq!(live(), 0);
}

#[test]
fn a_key_deleted_from_the_key_table_leaves_every_cache() {
    let (k, store) = keyring_with(Policy::default(), Clock::default());
    let first = k.blocking().encrypt(&label(), b"one").unwrap();
    block_on(k.rotate(&Scope::default())).unwrap();
    let second = k.blocking().encrypt(&label(), b"two").unwrap();
    // Both keys are in memory: the old one in the cache, the new one active.
    for blob in [&first, &second] {
        assert!(block_on(store.delete(&key_of(blob))).unwrap());
        assert!(k.blocking().decrypt(&label(), blob).is_ok());
    }
    block_on(k.refresh_keys()).unwrap();
    for blob in [&first, &second] {
        let err = k.blocking().decrypt(&label(), blob).unwrap_err();
        assert!(
            matches!(err, Error::UnknownKey { key_id } if key_id == key_of(blob)),
            "{err:?}"
        );
    }
    // Writes go on under a new key.
    let third = k.blocking().encrypt(&label(), b"three").unwrap();
    assert_ne!(key_of(&third), key_of(&second));
    assert_eq!(k.blocking().decrypt(&label(), &third).unwrap(), b"three");
}

#[test]
fn the_maintenance_task_reads_the_key_table_within_key_refresh() {
    let policy = Policy {
        key_refresh: Duration::from_secs(1),
        ..Policy::default()
    };
    let (k, store) = keyring_with(policy, Clock::default());
    let blob = k.blocking().encrypt(&label(), b"one").unwrap();
    block_on(store.delete(&key_of(&blob))).unwrap();
    let deleted = std::time::Instant::now();
    wait_until("the deleted key to be forgotten", || {
        matches!(
            k.blocking().decrypt(&label(), &blob),
            Err(Error::UnknownKey { .. })
        )
    });
    assert!(
        deleted.elapsed() < Duration::from_millis(2500),
        "{:?}",
        deleted.elapsed()
    );
}

#[test]
fn a_blind_index_probes_every_key_of_its_label_while_it_is_rotated() {
    let (k, store) = keyring_with(Policy::default(), Clock::default());
    let spec = BlindIndexSpec::new(
        Label::new("customers.email").unwrap(),
        crate::Normalizer::CaseFolded,
    );
    let before = k.blocking().blind_index(&spec, b"a@example.com").unwrap();
    assert_eq!(
        k.blocking()
            .blind_index_probes(&spec, b"A@example.com ")
            .unwrap(),
        vec![before.clone()]
    );
    let index_keys = |store: &MemoryKeyStore| {
        block_on(store.list(&KeyFilter {
            kind: Some(KeyKind::Index),
            include_retired: true,
            ..KeyFilter::default()
        }))
        .unwrap()
    };
    let old = index_keys(&store)[0].id;
    // The rotation starts: the live key is retired, and the next user makes the next key.
    block_on(store.retire(&old, SystemTime::now())).unwrap();
    block_on(k.refresh_keys()).unwrap();
    let after = k.blocking().blind_index(&spec, b"a@example.com").unwrap();
    assert_ne!(after, before);
    assert_eq!(
        k.blocking()
            .blind_index_probes(&spec, b"a@example.com")
            .unwrap(),
        vec![after.clone(), before.clone()]
    );
    assert_eq!(index_keys(&store).len(), 2);
    // Another keyring on the same table agrees on both keys.
    let other = Keyring::builder(k.kms().clone(), store.clone())
        .cmk(k.cmk())
        .build()
        .unwrap();
    assert_eq!(
        other
            .blocking()
            .blind_index_probes(&spec, b"a@example.com")
            .unwrap(),
        vec![after.clone(), before]
    );
    // The rotation ends: the old key is deleted, and lookups probe the new key only.
    block_on(store.delete(&old)).unwrap();
    block_on(k.refresh_keys()).unwrap();
    assert_eq!(
        k.blocking()
            .blind_index_probes(&spec, b"a@example.com")
            .unwrap(),
        vec![after.clone()]
    );
    // A keyring that has not read the table yet still probes the old key (harmless: no row
    // uses it), until it does.
    assert_eq!(
        other
            .blocking()
            .blind_index_probes(&spec, b"a@example.com")
            .unwrap()
            .len(),
        2
    );
    block_on(other.refresh_keys()).unwrap();
    assert_eq!(
        other
            .blocking()
            .blind_index_probes(&spec, b"a@example.com")
            .unwrap(),
        vec![after]
    );
}

// ----- which master keys a key row may name (security review N1) -----------------------------

/// A row edited to name master key B and to hold a key wrapped under B: the KMS would unwrap
/// it, so the keyring must refuse it before asking.
fn forge_under(store: &MemoryKeyStore, kms: &LocalKms, id: KeyId, b: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut row = rt.block_on(store.get(&id)).unwrap().unwrap();
    let context = EncryptionContext::from_json(&row.kms_context).unwrap();
    row.wrapped = rt
        .block_on(kms.re_encrypt(&row.wrapped, &row.cmk_id, &context, b, &context))
        .unwrap();
    row.cmk_id = b.to_owned();
    rt.block_on(store.delete(&id)).unwrap();
    rt.block_on(store.insert(&row)).unwrap();
}

fn two_master_keys() -> (LocalKms, String, String) {
    let b = KeyMaterial::generate().unwrap();
    let b_id = LocalKms::from_key(KeyMaterial::from_slice(b.expose()).unwrap())
        .cmk_id()
        .to_owned();
    let kms = LocalKms::from_key(KeyMaterial::generate().unwrap()).with_key(b);
    let a_id = kms.cmk_id().to_owned();
    (kms, a_id, b_id)
}

#[test]
fn a_key_row_naming_a_master_key_the_keyring_does_not_trust_is_refused_without_a_kms_call() {
    let (local, a, b) = two_master_keys();
    let kms = Faulty::named("cloud", local);
    let store = Arc::new(MemoryKeyStore::new());
    let writer = Keyring::builder(kms.clone(), store.clone())
        .cmk(&a)
        .build()
        .unwrap();
    let blob = writer.blocking().encrypt(&label(), b"v").unwrap();
    let id = format::peek_key_id(&blob).unwrap();
    forge_under(&store, &kms.inner, id, &b);

    let calls = kms.decrypt_calls.load(Ordering::SeqCst);
    let cold = Keyring::builder(kms.clone(), store.clone())
        .cmk(&a)
        .build()
        .unwrap();
    let err = cold.blocking().decrypt(&label(), &blob).unwrap_err();
    match &err {
        Error::Kms(e) => assert_eq!(e.kind(), crate::KmsErrorKind::InvalidCiphertext),
        other => panic!("expected a KMS error, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&b) && msg.contains(&id.to_hex()), "{msg}");
    assert!(msg.contains("trust_cmk"), "{msg}");
    assert_eq!(kms.decrypt_calls.load(Ordering::SeqCst), calls);
    // Not remembered as an outage: it costs no wait, and trusting B is a restart anyway.
    assert!(cold.inner.recent_load_failure(&id).is_none());

    // Trusted explicitly (keys under an older master key, say), it opens.
    let trusting = Keyring::builder(kms.clone(), store.clone())
        .cmk(&a)
        .trust_cmk(&b)
        .build()
        .unwrap();
    assert_eq!(trusting.blocking().decrypt(&label(), &blob).unwrap(), b"v");
    // And so it does for a keyring that makes its keys under B.
    let under_b = Keyring::builder(kms, store).cmk(&b).build().unwrap();
    assert_eq!(under_b.blocking().decrypt(&label(), &blob).unwrap(), b"v");
}

#[test]
fn keys_moved_to_another_master_key_stay_readable_when_both_are_trusted() {
    // `envelope keys rewrap` from A to B while applications run: they trust B before the move
    // starts, and A for as long as rows name it.
    let (local, a, b) = two_master_keys();
    let kms = Faulty::named("cloud", local);
    let store = Arc::new(MemoryKeyStore::new());
    let old_app = Keyring::builder(kms.clone(), store.clone())
        .cmk(&a)
        .build()
        .unwrap();
    let under_a = old_app.blocking().encrypt(&label(), b"before").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let moved_id = format::peek_key_id(&under_a).unwrap();
    let mut row = rt.block_on(store.get(&moved_id)).unwrap().unwrap();
    let context = EncryptionContext::from_json(&row.kms_context).unwrap();
    let wrapped = rt
        .block_on(kms.re_encrypt(&row.wrapped, &a, &context, &b, &context))
        .unwrap();
    rt.block_on(store.rewrap(&moved_id, &row.wrapped, "cloud", &b, &wrapped))
        .unwrap();
    row = rt.block_on(store.get(&moved_id)).unwrap().unwrap();
    assert_eq!(row.cmk_id, b);

    // During the move: writes under A, trusts B.
    let during = Keyring::builder(kms.clone(), store.clone())
        .cmk(&a)
        .trust_cmk(&b)
        .build()
        .unwrap();
    let written_during = during.blocking().encrypt(&label(), b"during").unwrap();
    assert_eq!(
        during.blocking().decrypt(&label(), &under_a).unwrap(),
        b"before"
    );
    // After: writes under B, trusts A for the rows written during the move.
    let after = Keyring::builder(kms.clone(), store.clone())
        .cmk(&b)
        .trust_cmk(&a)
        .build()
        .unwrap();
    assert_eq!(
        after.blocking().decrypt(&label(), &under_a).unwrap(),
        b"before"
    );
    assert_eq!(
        after.blocking().decrypt(&label(), &written_during).unwrap(),
        b"during"
    );
    // Without A, the row still under it is refused.
    let b_only = Keyring::builder(kms, store).cmk(&b).build().unwrap();
    let err = b_only
        .blocking()
        .decrypt(&label(), &written_during)
        .unwrap_err();
    assert!(err.to_string().contains(&a), "{err}");
}

#[test]
fn a_reader_is_trusted_under_its_own_master_key_only() {
    let (old_local, a, b) = two_master_keys();
    let old = Faulty::named("old-kms", old_local);
    let store = Arc::new(MemoryKeyStore::new());
    let old_app = Keyring::builder(old.clone(), store.clone())
        .cmk(&a)
        .build()
        .unwrap();
    let blob = old_app.blocking().encrypt(&label(), b"v").unwrap();
    let new = || {
        Faulty::new(LocalKms::from_key(
            KeyMaterial::from_slice(&[3; 32]).unwrap(),
        ))
    };
    let new_cmk = new().inner.cmk_id().to_owned();
    let reader = |kms: Arc<Faulty>, cmk: &str| crate::kms::Connected {
        kms,
        cmk: cmk.to_owned(),
    };

    // also_read(Connected) trusts the reader's CMK.
    let k = Keyring::builder(new(), store.clone())
        .cmk(&new_cmk)
        .also_read(reader(old.clone(), &a))
        .build()
        .unwrap();
    assert_eq!(k.blocking().decrypt(&label(), &blob).unwrap(), b"v");

    // A bare provider that cannot tell its master keys is trusted under none.
    let calls = old.decrypt_calls.load(Ordering::SeqCst);
    let k = Keyring::builder(new(), store.clone())
        .cmk(&new_cmk)
        .also_read_with(old.clone())
        .build()
        .unwrap();
    let err = k.blocking().decrypt(&label(), &blob).unwrap_err();
    assert!(err.to_string().contains("none of that provider's"), "{err}");
    assert_eq!(old.decrypt_calls.load(Ordering::SeqCst), calls);
    let k = Keyring::builder(new(), store.clone())
        .cmk(&new_cmk)
        .also_read_with(old.clone())
        .trust_cmk_of("old-kms", &a)
        .build()
        .unwrap();
    assert_eq!(k.blocking().decrypt(&label(), &blob).unwrap(), b"v");

    // The reader's CMK is trusted for the reader only: the keyring's own provider is not
    // trusted under it, nor the reader under the keyring's CMK.
    let id = format::peek_key_id(&blob).unwrap();
    forge_under(&store, &old.inner, id, &b);
    let k = Keyring::builder(new(), store.clone())
        .cmk(&b)
        .also_read(reader(old.clone(), &a))
        .build()
        .unwrap();
    let err = k.blocking().decrypt(&label(), &blob).unwrap_err();
    assert!(
        matches!(err, Error::Kms(_)) && err.to_string().contains(&b),
        "{err}"
    );

    // Misconfigurations are refused at build.
    let err = Keyring::builder(new(), store.clone())
        .cmk(&new_cmk)
        .trust_cmk_of("old-kms", &a)
        .build()
        .unwrap_err();
    assert!(
        matches!(err, Error::Misuse(_)) && err.to_string().contains("also_read"),
        "{err}"
    );
    let err = Keyring::builder(new(), store.clone())
        .cmk(&new_cmk)
        .trust_cmk("")
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::Misuse(_)), "{err}");
    let err = Keyring::builder(new(), store)
        .cmk(&new_cmk)
        .also_read(reader(old, ""))
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::Misuse(_)), "{err}");
}

#[test]
fn a_local_kms_reads_every_master_key_it_holds_without_a_trust_list() {
    // The local KMS answers `holds_cmk`: it unwraps only under the key files it was given, so
    // keys under an older master key it also holds open as before, with no trust list.
    let old_key = KeyMaterial::generate().unwrap();
    let copy = || KeyMaterial::from_slice(old_key.expose()).unwrap();
    let store = Arc::new(MemoryKeyStore::new());
    let old = Keyring::builder(LocalKms::from_key(copy()), store.clone())
        .build()
        .unwrap();
    let blob = old.blocking().encrypt(&label(), b"v").unwrap();
    let both = LocalKms::from_key(KeyMaterial::generate().unwrap()).with_key(copy());
    let new = Keyring::builder(both, store.clone()).build().unwrap();
    assert_ne!(new.cmk(), old.cmk());
    assert_eq!(new.blocking().decrypt(&label(), &blob).unwrap(), b"v");
    // As a reader beside another provider, too.
    let k = Keyring::builder(
        Faulty::named(
            "cloud",
            LocalKms::from_key(KeyMaterial::generate().unwrap()),
        ),
        store,
    )
    .cmk("c")
    .also_read_with(LocalKms::from_key(copy()))
    .build()
    .unwrap();
    assert_eq!(k.blocking().decrypt(&label(), &blob).unwrap(), b"v");
}
