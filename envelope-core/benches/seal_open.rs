// A benchmark: a failed setup should panic.
#![allow(clippy::unwrap_used)]
//! Seal + open through the keyring (cache hit) against two bare AEADs with a cached cipher, in
//! one run, interleaved, so machine noise hits all sides alike. Prints one row per size with the
//! median cost of each and the ratios.
//!
//! `cargo bench -p envelope-core --bench seal_open` (add `-- --quick` for a short run, or
//! `-- --size 64` for one size).
//!
//! The baselines: aes-gcm, the bare AEAD PERFORMANCE.md measures against (what an application
//! hand-rolling column encryption in Rust would reach for), and aws-lc-rs, the implementation
//! envelope itself uses, so the second ratio is envelope's own overhead. All sides do the same
//! essential work for one value: a fresh nonce from the thread-local CSPRNG, one output
//! allocation, AES-256-GCM over the same number of AAD bytes, then an authenticated decrypt into
//! a new buffer. The keyring side adds what envelope adds: the active-key lookup and use count,
//! the header, the key-id lookup on open, and the label in the AAD.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Tag};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, UnboundKey};
use envelope_core::{KeyMaterial, Keyring, Label, LocalKms, MemoryKeyStore};
use rand::Rng as _;

const SIZES: [usize; 4] = [16, 64, 4096, 1 << 20];
/// The AAD length envelope uses with the label `users.ssn`: 30 header bytes + 9.
const AAD: [u8; 39] = [7u8; 39];

fn nonce() -> [u8; 12] {
    let mut nonce = [0u8; 12];
    rand::rng().fill_bytes(&mut nonce);
    nonce
}

/// Bare aes-gcm: `nonce || ciphertext || tag`.
struct BareAesGcm(Aes256Gcm);

impl BareAesGcm {
    fn seal(&self, pt: &[u8]) -> Vec<u8> {
        let nonce = nonce();
        let mut out = Vec::with_capacity(12 + pt.len() + 16);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(pt);
        let tag = self
            .0
            .encrypt_inout_detached(&nonce.into(), &AAD, (&mut out[12..]).into())
            .unwrap();
        out.extend_from_slice(&tag);
        out
    }

    fn open(&self, blob: &[u8]) -> Vec<u8> {
        let (nonce, rest) = blob.split_at(12);
        let (ct, tag) = rest.split_at(rest.len() - 16);
        let mut buf = ct.to_vec();
        self.0
            .decrypt_inout_detached(
                &nonce.try_into().unwrap(),
                &AAD,
                (&mut buf[..]).into(),
                &Tag::try_from(tag).unwrap(),
            )
            .unwrap();
        buf
    }
}

/// Bare aws-lc-rs, the same calls envelope makes: `nonce || ciphertext || tag`.
struct BareAwsLc(LessSafeKey);

impl BareAwsLc {
    fn seal(&self, pt: &[u8]) -> Vec<u8> {
        let nonce = nonce();
        let mut out = Vec::with_capacity(12 + pt.len() + 16);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(pt);
        let tag = self
            .0
            .seal_in_place_separate_tag(
                aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                Aad::from(&AAD),
                &mut out[12..],
            )
            .unwrap();
        out.extend_from_slice(tag.as_ref());
        out
    }

    fn open(&self, blob: &[u8]) -> Vec<u8> {
        let (nonce, rest) = blob.split_at(12);
        let (ct, tag) = rest.split_at(rest.len() - 16);
        let mut out = vec![0u8; ct.len()];
        self.0
            .open_separate_gather(
                aws_lc_rs::aead::Nonce::try_assume_unique_for_key(nonce).unwrap(),
                Aad::from(&AAD),
                ct,
                tag,
                &mut out,
            )
            .unwrap();
        out
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
    let aes_gcm = BareAesGcm(Aes256Gcm::new(material.expose().into()));
    let aws_lc = BareAwsLc(LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, material.expose()).unwrap(),
    ));
    let kms = LocalKms::from_key(KeyMaterial::generate().unwrap());
    let keyring = Keyring::builder(kms, MemoryKeyStore::new())
        .build()
        .unwrap();
    let label = Label::new("users.ssn").unwrap();
    // Warm: the active key exists and is cached.
    let warm = keyring.blocking().encrypt(&label, b"warm").unwrap();
    keyring.blocking().decrypt(&label, &warm).unwrap();

    println!(
        "seal+open per value, median of {rounds} interleaved rounds (ns); ratios = median per-round envelope/bare"
    );
    println!(
        "{:>9} {:>12} {:>12} {:>12} {:>14} {:>15}",
        "size", "aes-gcm", "aws-lc-rs", "envelope", "vs aes-gcm", "vs aws-lc-rs"
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
            black_box(aes_gcm.open(&aes_gcm.seal(black_box(&pt))));
        });
        let iters = ((budget.as_nanos() as f64 / probe).max(1.0) as u32).min(1_000_000);
        let (mut gcm_ns, mut lc_ns, mut env_ns) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            gcm_ns.push(time_batch(iters, || {
                black_box(aes_gcm.open(&aes_gcm.seal(black_box(&pt))));
            }));
            lc_ns.push(time_batch(iters, || {
                black_box(aws_lc.open(&aws_lc.seal(black_box(&pt))));
            }));
            env_ns.push(time_batch(iters, || {
                let blob = keyring.blocking().encrypt(&label, black_box(&pt)).unwrap();
                black_box(keyring.blocking().decrypt(&label, &blob).unwrap());
            }));
        }
        // Ratios are taken per round (each envelope batch against the bare batches just before
        // it, under the same machine conditions), then the median of those ratios.
        let ratio = |base: &[f64]| {
            let mut r: Vec<f64> = env_ns.iter().zip(base).map(|(e, b)| e / b).collect();
            per_op(&mut r)
        };
        let (vs_gcm, vs_lc) = (ratio(&gcm_ns), ratio(&lc_ns));
        let (g, l, e) = (per_op(&mut gcm_ns), per_op(&mut lc_ns), per_op(&mut env_ns));
        let name = match size {
            s if s >= 1 << 20 => format!("{} MiB", s >> 20),
            s if s >= 1024 => format!("{} KiB", s >> 10),
            s => format!("{s} B"),
        };
        println!("{name:>9} {g:>12.0} {l:>12.0} {e:>12.0} {vs_gcm:>13.2}x {vs_lc:>14.2}x");
    }
    let m = keyring.metrics();
    println!(
        "keyring: {} KMS calls, {} cache hits, {} misses",
        m.kms_calls, m.cache_hits, m.cache_misses
    );
}
