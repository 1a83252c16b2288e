// A benchmark: a failed setup should panic.
#![allow(clippy::unwrap_used)]
//! Seal + open through the keyring (cache hit) against the bare AEAD with a cached cipher, in
//! one run, interleaved, so machine noise hits both sides alike. Prints one row per size with
//! the median cost of each and their ratio.
//!
//! `cargo bench -p envelope-core --bench seal_open` (add `-- --quick` for a short run, or
//! `-- --size 64` for one size).
//!
//! Both sides do the same essential work for one value: a fresh nonce from the thread-local
//! CSPRNG, one output allocation, AES-256-GCM over the same number of AAD bytes, then a copy and
//! an authenticated decrypt. The keyring side adds what envelope adds: the active-key lookup and
//! use count, the header, the key-id lookup in the shared cache on open, and the label check.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use envelope_core::{KeyMaterial, Keyring, Label, LocalKms, MemoryKeyStore};
use rand::Rng as _;

const SIZES: [usize; 4] = [16, 64, 4096, 1 << 20];

struct Bare {
    aead: Aes256Gcm,
    aad: [u8; 39],
}

impl Bare {
    fn seal(&self, pt: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let mut out = Vec::with_capacity(12 + pt.len() + 16);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(pt);
        let tag = self
            .aead
            .encrypt_inout_detached(&Nonce::from(nonce), &self.aad, (&mut out[12..]).into())
            .unwrap();
        out.extend_from_slice(&tag);
        out
    }

    fn open(&self, blob: &[u8]) -> Vec<u8> {
        let (nonce, rest) = blob.split_at(12);
        let (ct, tag) = rest.split_at(rest.len() - 16);
        let mut buf = ct.to_vec();
        self.aead
            .decrypt_inout_detached(
                &Nonce::try_from(nonce).unwrap(),
                &self.aad,
                (&mut buf[..]).into(),
                &Tag::try_from(tag).unwrap(),
            )
            .unwrap();
        buf
    }
}

/// The median of `samples`.
fn per_op(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn time_batch(iters: u32, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    start.elapsed().as_nanos() as f64 / f64::from(iters)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `cargo bench` passes `--bench`; ignore everything else.
    let rounds = if quick { 7 } else { 31 };
    let budget = if quick {
        Duration::from_millis(20)
    } else {
        Duration::from_millis(60)
    };

    let material = KeyMaterial::generate().unwrap();
    let bare = Bare {
        aead: Aes256Gcm::new(material.expose().into()),
        aad: [7u8; 39],
    };
    let kms = LocalKms::from_key(KeyMaterial::generate().unwrap());
    let cmk = kms.cmk_id().to_owned();
    let keyring = Keyring::builder(Arc::new(kms), cmk, Arc::new(MemoryKeyStore::new()))
        .build()
        .unwrap();
    let label = Label::new("users.ssn").unwrap();
    // Warm: the active key exists and is cached.
    let warm = keyring.encrypt_blocking(&label, b"warm").unwrap();
    keyring.decrypt_blocking(&label, &warm).unwrap();

    println!(
        "seal+open per value, median of {rounds} interleaved rounds (ns); ratio = median per-round envelope/bare"
    );
    println!(
        "{:>9} {:>12} {:>12} {:>7}",
        "size", "bare AEAD", "envelope", "ratio"
    );
    // `-- --size 64` measures one size only (for profiling).
    let only: Option<usize> = std::env::args()
        .skip_while(|a| a != "--size")
        .nth(1)
        .and_then(|s| s.parse().ok());
    for size in SIZES.into_iter().filter(|s| only.is_none_or(|o| o == *s)) {
        let pt: Vec<u8> = (0..size).map(|i| i as u8).collect();
        // Pick a batch size that takes about `budget` per side.
        let probe = time_batch(3, || {
            black_box(bare.open(&bare.seal(black_box(&pt))));
        });
        let iters = ((budget.as_nanos() as f64 / probe).max(1.0) as u32).min(1_000_000);
        let mut bare_ns = Vec::with_capacity(rounds);
        let mut env_ns = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            bare_ns.push(time_batch(iters, || {
                black_box(bare.open(&bare.seal(black_box(&pt))));
            }));
            env_ns.push(time_batch(iters, || {
                let blob = keyring.encrypt_blocking(&label, black_box(&pt)).unwrap();
                black_box(keyring.decrypt_blocking(&label, &blob).unwrap());
            }));
        }
        // The ratio is taken per round (each envelope batch against the bare batch just before
        // it, under the same machine conditions), then the median of those ratios.
        let mut ratios: Vec<f64> = env_ns.iter().zip(&bare_ns).map(|(e, b)| e / b).collect();
        let ratio = per_op(&mut ratios);
        let b = per_op(&mut bare_ns);
        let e = per_op(&mut env_ns);
        let name = match size {
            s if s >= 1 << 20 => format!("{} MiB", s >> 20),
            s if s >= 1024 => format!("{} KiB", s >> 10),
            s => format!("{s} B"),
        };
        println!("{name:>9} {b:>12.0} {e:>12.0} {ratio:>6.2}x");
    }
    let m = keyring.metrics();
    println!(
        "keyring: {} KMS calls, {} cache hits, {} misses",
        m.kms_calls, m.cache_hits, m.cache_misses
    );
}
