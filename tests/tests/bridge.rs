//! The sync bridge: a cache miss inside a synchronous codec must never panic or deadlock, on any
//! kind of caller, and must time out with a clear error when the KMS does not answer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use envelope_core::{Error, Keyring, Label, Policy};
use envelope_tests::Fixture;

fn label() -> Label {
    Label::new("users.ssn").unwrap()
}

/// A fixture with one value sealed, a slow KMS, and a second keyring with a cold cache.
fn cold_reader(delay_ms: u64) -> (Fixture, Keyring, Vec<u8>) {
    let fx = Fixture::new();
    let blob = fx
        .keyring
        .blocking()
        .encrypt(&label(), b"078-05-1120")
        .unwrap();
    fx.faults.delay_ms.store(delay_ms, Ordering::SeqCst);
    let reader = fx.cold_keyring(Policy::default());
    (fx, reader, blob)
}

fn hung_reader() -> (Fixture, Keyring, Vec<u8>) {
    let fx = Fixture::new();
    let blob = fx
        .keyring
        .blocking()
        .encrypt(&label(), b"078-05-1120")
        .unwrap();
    fx.faults.hang.store(true, Ordering::SeqCst);
    let reader = fx.cold_keyring(Policy {
        kms_timeout: Duration::from_millis(300),
        refresh_retry: RETRY,
        ..Policy::default()
    });
    (fx, reader, blob)
}

/// How long a failed load is remembered in these tests.
const RETRY: Duration = Duration::from_millis(400);

fn assert_timeout(result: Result<Vec<u8>, Error>) {
    match result {
        Err(Error::Unavailable(envelope_core::Unavailable::Timeout { .. })) => {}
        other => panic!("expected a KMS timeout, got {other:?}"),
    }
}

#[test]
fn plain_thread_miss() {
    let (fx, reader, blob) = cold_reader(30);
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let reader = reader.clone();
            let blob = blob.clone();
            std::thread::spawn(move || reader.blocking().decrypt(&label(), &blob).unwrap())
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), b"078-05-1120");
    }
    assert_eq!(fx.calls.decrypts(), 1);
}

fn run_on_workers(rt: tokio::runtime::Runtime, tasks: usize) {
    let (fx, reader, blob) = cold_reader(30);
    rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..tasks {
            let reader = reader.clone();
            let blob = blob.clone();
            // Decode runs right in the task, as sqlx's Decode does: not in spawn_blocking.
            set.spawn(async move { reader.blocking().decrypt(&label(), &blob).unwrap() });
        }
        while let Some(r) = set.join_next().await {
            assert_eq!(r.unwrap(), b"078-05-1120");
        }
    });
    assert_eq!(fx.calls.decrypts(), 1);
}

#[test]
fn multi_thread_runtime_miss() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    run_on_workers(rt, 16);
}

#[test]
fn single_worker_multi_thread_runtime_miss() {
    // The layout that deadlocks when moka's waiters block the only worker outside block_in_place.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    run_on_workers(rt, 16);
}

#[test]
fn current_thread_runtime_miss() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    run_on_workers(rt, 8);
}

#[test]
fn spawn_blocking_miss() {
    let (fx, reader, blob) = cold_reader(30);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let reader = reader.clone();
            let blob = blob.clone();
            set.spawn_blocking(move || reader.blocking().decrypt(&label(), &blob).unwrap());
        }
        while let Some(r) = set.join_next().await {
            assert_eq!(r.unwrap(), b"078-05-1120");
        }
    });
    assert_eq!(fx.calls.decrypts(), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn async_api_on_current_thread_runtime() {
    let (fx, reader, blob) = cold_reader(30);
    let l = label();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (reader, blob, l) = (reader.clone(), blob.clone(), l.clone());
        set.spawn(async move { reader.decrypt(&l, &blob).await });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap().unwrap(), b"078-05-1120");
    }
    assert_eq!(fx.calls.decrypts(), 1);
}

#[test]
fn first_write_from_every_context() {
    // No active key yet: the first encrypt_blocking makes one through the bridge.
    let fx = Fixture::new();
    fx.faults.delay_ms.store(20, Ordering::SeqCst);
    let k = fx.keyring.clone();
    std::thread::spawn(move || k.blocking().encrypt(&label(), b"a").unwrap())
        .join()
        .unwrap();

    for flavor in ["current", "multi"] {
        let fx = Fixture::new();
        fx.faults.delay_ms.store(20, Ordering::SeqCst);
        let rt = match flavor {
            "current" => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            _ => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build(),
        }
        .unwrap();
        let k = fx.keyring.clone();
        rt.block_on(async move {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..8 {
                let k = k.clone();
                set.spawn(async move { k.blocking().encrypt(&label(), b"a").unwrap() });
            }
            while let Some(r) = set.join_next().await {
                r.unwrap();
            }
        });
        // Eight concurrent first writes made one data key.
        assert_eq!(fx.calls.generates(), 1, "{flavor}");
    }
}

#[test]
fn hung_kms_times_out_on_a_plain_thread() {
    let (_fx, reader, blob) = hung_reader();
    assert_timeout(reader.blocking().decrypt(&label(), &blob));
    assert_eq!(reader.metrics().bridge_timeouts, 1);
}

#[test]
fn hung_kms_times_out_on_runtimes() {
    for rt in [
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap(),
    ] {
        let (_fx, reader, blob) = hung_reader();
        let r = rt.block_on(async move {
            let task = tokio::spawn(async move { reader.blocking().decrypt(&label(), &blob) });
            task.await.unwrap()
        });
        assert_timeout(r);
    }
    let (_fx, reader, blob) = hung_reader();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = rt.block_on(async move {
        tokio::task::spawn_blocking(move || reader.blocking().decrypt(&label(), &blob))
            .await
            .unwrap()
    });
    assert_timeout(r);
}

#[tokio::test(flavor = "current_thread")]
async fn hung_kms_times_out_in_the_async_api() {
    let (_fx, reader, blob) = hung_reader();
    assert_timeout(reader.decrypt(&label(), &blob).await);
}

#[test]
fn timed_out_load_is_retried_once_the_kms_answers() {
    let (fx, reader, blob) = hung_reader();
    assert_timeout(reader.blocking().decrypt(&label(), &blob));
    fx.faults.hang.store(false, Ordering::SeqCst);
    // For `refresh_retry` the failure is remembered: readers fail at once, no new KMS call.
    let decrypts = fx.calls.decrypts();
    assert_timeout(reader.blocking().decrypt(&label(), &blob));
    assert_eq!(fx.calls.decrypts(), decrypts);
    // After it, the key is loaded again.
    std::thread::sleep(RETRY + Duration::from_millis(200));
    assert_eq!(
        reader.blocking().decrypt(&label(), &blob).unwrap(),
        b"078-05-1120"
    );
}

#[test]
fn dropping_a_keyring_inside_a_runtime_does_not_panic() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let fx = Fixture::new();
        let blob = fx.keyring.encrypt(&label(), b"x").await.unwrap();
        assert_eq!(fx.keyring.decrypt(&label(), &blob).await.unwrap(), b"x");
        drop(fx);
    });
    let fx = Fixture::new();
    let k = fx.keyring.clone();
    drop(fx);
    let survivors = Arc::new(k);
    assert!(survivors.blocking().encrypt(&label(), b"y").is_ok());
}
