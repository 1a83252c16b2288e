//! A process that forks after sealing: parent and child must never share a nonce stream, and
//! a keyring inherited by the child must not write under its parent's data keys.
//!
//! fork(2) and waitpid(2) exist only as libc calls, hence the one `unsafe` of the workspace's
//! tests. The child does the least it can (no locks another thread might have held at the fork)
//! and reports through a file and its exit code; it ends with `_exit`, so no destructor or test
//! harness code runs twice. Only the child this test started is waited for or killed.
#![allow(unsafe_code, clippy::unwrap_used, clippy::expect_used)]
#![cfg(unix)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use envelope_core::{
    EncryptionContext, Error, KeyMaterial, Keyring, KmsProvider, Label, LocalKms, MemoryKeyStore,
    format,
};

/// The tests of this file one at a time: a fork while another thread is in the middle of a
/// one-time initialization (a `OnceLock`, a runtime starting) leaves the child waiting for a
/// thread it does not have. Real programs fork before they start threads, or from one thread.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static FORKS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    FORKS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Run `child` in a forked child; returns its exit code. The child is killed if it has not
/// finished within 30 s (a deadlock after fork must fail the test, not hang it).
fn in_forked_child(child: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child runs `child` and ends with `_exit`; it never returns into the harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(101);
        // SAFETY: `_exit` ends the child without running atexit handlers or destructors.
        unsafe { libc::_exit(code) };
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut status = 0;
    loop {
        // SAFETY: waiting for the child this function forked, by its pid.
        let done = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if done == pid {
            break;
        }
        if Instant::now() > deadline {
            // SAFETY: signalling the child this function forked, by its pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: reaping that same child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            panic!("the forked child did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(libc::WIFEXITED(status), "child died abnormally: {status}");
    libc::WEXITSTATUS(status)
}

#[test]
fn parent_and_child_never_share_nonces_or_data_keys() {
    let _serial = serial();
    let label = Label::new("users.ssn").unwrap();
    let kms = Arc::new(LocalKms::from_key(KeyMaterial::generate().unwrap()));
    let cmk = kms.cmk_id().to_owned();
    let keyring = Keyring::builder(kms.clone(), MemoryKeyStore::new())
        .cmk(cmk.clone())
        .build()
        .unwrap();
    // Seal once before the fork, so this thread's nonce generator and the active key exist.
    let before = keyring.blocking().encrypt(&label, b"before").unwrap();
    let context = EncryptionContext::new().with("purpose", "fork test");
    let material = KeyMaterial::generate().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(kms.encrypt(&cmk, &material, &context)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("child");
    let code = in_forked_child(|| {
        // The inherited keyring refuses to write, with a typed error that says what to do.
        let refused = match keyring.blocking().encrypt(&label, b"child") {
            Err(Error::Misuse(envelope_core::Misuse::ForkedProcess { built_in }))
                if built_in != std::process::id() =>
            {
                0
            }
            Err(_) => 2,
            Ok(_) => 3,
        };
        if refused != 0 {
            return refused;
        }
        // Any other user of the nonce generator (here the local KMS wrapping a key under the
        // shared master key) gets a stream of its own.
        let wrapped = futures_lite(kms.encrypt(&cmk, &material, &context));
        std::fs::write(&out, wrapped).unwrap();
        0
    });
    assert_eq!(
        code, 0,
        "child exit code (2: wrong error, 3: wrote under the parent's key)"
    );

    // The parent goes on under its key.
    let parent = keyring.blocking().encrypt(&label, b"parent").unwrap();
    assert_eq!(
        keyring.blocking().decrypt(&label, &parent).unwrap(),
        b"parent"
    );
    // Local KMS wrapped form: 0x01 || nonce (12) || ciphertext || tag.
    let parent_wrapped = rt.block_on(kms.encrypt(&cmk, &material, &context)).unwrap();
    let child_wrapped = std::fs::read(&out).unwrap();
    assert_ne!(
        parent_wrapped[1..13],
        child_wrapped[1..13],
        "parent and child drew the same nonce"
    );
    assert_eq!(format::peek_key_id(&parent), format::peek_key_id(&before));
}

#[test]
fn a_keyring_built_after_the_fork_works_in_the_child() {
    let _serial = serial();
    let label = Label::new("users.ssn").unwrap();
    // A keyring in the parent first: its clock thread is not inherited by the child.
    let kms = Arc::new(LocalKms::from_key(KeyMaterial::generate().unwrap()));
    let parent = Keyring::builder(kms.clone(), MemoryKeyStore::new())
        .cmk(kms.cmk_id())
        .build()
        .unwrap();
    parent.blocking().encrypt(&label, b"parent").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("child");
    let code = in_forked_child(|| {
        let kms = LocalKms::from_key(KeyMaterial::generate().unwrap());
        let cmk = kms.cmk_id().to_owned();
        let keyring = Keyring::builder(kms, MemoryKeyStore::new())
            .cmk(cmk)
            .policy(envelope_core::Policy {
                dek_max_age: Duration::from_millis(200),
                ..envelope_core::Policy::default()
            })
            .build()
            .unwrap();
        let blob = keyring.blocking().encrypt(&label, b"in the child").unwrap();
        if keyring.blocking().decrypt(&label, &blob).unwrap() != b"in the child" {
            return 4;
        }
        // Key ages advance in the child: its keyring started a clock of its own.
        std::thread::sleep(Duration::from_millis(500));
        let later = keyring.blocking().encrypt(&label, b"later").unwrap();
        if format::peek_key_id(&later).unwrap() == format::peek_key_id(&blob).unwrap() {
            return 5;
        }
        std::fs::write(&out, &blob).unwrap();
        0
    });
    assert_eq!(code, 0);
    assert!(std::fs::read(&out).unwrap().len() > 12);
}

/// Poll a future that is ready at once (the local KMS does no I/O), without a runtime: the
/// child must not rely on threads it does not have.
fn futures_lite<F: std::future::Future<Output = Result<Vec<u8>, envelope_core::KmsError>>>(
    fut: F,
) -> Vec<u8> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(result) => result.unwrap(),
        std::task::Poll::Pending => panic!("the local KMS is never pending"),
    }
}
