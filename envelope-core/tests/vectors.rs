//! The committed test vectors in `docs/vectors/v1/`: their generator and their checks.
//!
//! `cargo test -p envelope-core --test vectors` regenerates every vector in memory and fails if
//! a committed file differs by one byte, then runs each file through envelope-core's public API
//! the way docs/FORMAT.md section 8 tells a harness to (a keyring whose key table holds `dek`
//! under `key_id`) and checks its `expect`. The generator seals with aws-lc-rs directly, not with
//! envelope's cipher. To rewrite the files after a deliberate change (which must come with a
//! FORMAT.md change), run it with `ENVELOPE_WRITE_VECTORS=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::SystemTime;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use envelope_core::KmsProvider as _;
use envelope_core::{
    EncryptionContext, Error, KeyId, KeyKind, KeyMaterial, KeyRecord, KeyStore, Keyring, Label,
    LocalKms, MemoryKeyStore, format,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Vector {
    name: String,
    description: String,
    /// `binary`, or `text` when `blob` holds the UTF-8 bytes of a text-form value.
    form: String,
    dek: String,
    key_id: String,
    nonce: String,
    context: String,
    plaintext: String,
    blob: String,
    expect: String,
}

const DEK: [u8; 32] = {
    let mut k = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        k[i] = i as u8;
        i += 1;
    }
    k
};
const OTHER_DEK: [u8; 32] = [0x5a; 32];
const KEY_ID: [u8; 16] = [
    0x0e, 0x7e, 0x10, 0x9e, 0x00, 0x00, 0x40, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
];

fn nonce(n: u8) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0] = 0xa0;
    out[11] = n;
    out
}

/// Seal as docs/FORMAT.md section 3 says, with aws-lc-rs directly.
fn seal(dek: &[u8; 32], label: &str, nonce: &[u8; 12], pt: &[u8]) -> Vec<u8> {
    let mut header = vec![0x01, 0x01];
    header.extend_from_slice(&KEY_ID);
    header.extend_from_slice(nonce);
    let mut aad = header.clone();
    aad.extend_from_slice(label.as_bytes());
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, dek).unwrap());
    let mut ciphertext = pt.to_vec();
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(*nonce),
            Aad::from(&aad[..]),
            &mut ciphertext,
        )
        .unwrap();
    let mut out = header;
    let mut len = ciphertext.len();
    loop {
        let low = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(low);
            break;
        }
        out.push(low | 0x80);
    }
    out.extend_from_slice(&ciphertext);
    out.extend_from_slice(tag.as_ref());
    out
}

struct Case {
    name: &'static str,
    description: &'static str,
    text: bool,
    dek: [u8; 32],
    /// The id the harness holds `dek` under.
    key_id: [u8; 16],
    nonce: [u8; 12],
    context: String,
    plaintext: Vec<u8>,
    blob: Vec<u8>,
    expect: &'static str,
}

fn ok(name: &'static str, description: &'static str, n: u8, context: &str, pt: Vec<u8>) -> Case {
    let blob = seal(&DEK, context, &nonce(n), &pt);
    Case {
        name,
        description,
        text: false,
        dek: DEK,
        key_id: KEY_ID,
        nonce: nonce(n),
        context: context.to_owned(),
        plaintext: pt,
        blob,
        expect: "ok",
    }
}

/// A failure case derived from the `ssn` value by `mutate`.
fn bad(
    name: &'static str,
    description: &'static str,
    expect: &'static str,
    mutate: impl FnOnce(&mut Case),
) -> Case {
    let mut case = ok(name, description, 3, "users.ssn", b"078-05-1120".to_vec());
    case.expect = expect;
    mutate(&mut case);
    case
}

fn cases() -> Vec<Case> {
    let pattern = |n: usize| (0..n).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>();
    let mut text = ok(
        "text_form",
        "The text form: `ev1:` and padded standard base64 of the binary value; `blob` holds the text's UTF-8 bytes.",
        9,
        "customers.email",
        b"alice@example.com".to_vec(),
    );
    text.text = true;
    text.blob = format::to_text(&text.blob).into_bytes();
    vec![
        ok(
            "empty",
            "The empty plaintext is encrypted, not stored as NULL.",
            1,
            "users.ssn",
            vec![],
        ),
        ok(
            "one_byte",
            "A one-byte plaintext.",
            2,
            "users.ssn",
            b"A".to_vec(),
        ),
        ok(
            "ssn",
            "A short text value.",
            3,
            "users.ssn",
            b"078-05-1120".to_vec(),
        ),
        ok(
            "bytes_64",
            "64 bytes, the benchmark's value size.",
            4,
            "users.notes",
            pattern(64),
        ),
        ok(
            "bytes_127",
            "The longest value with a one-byte length field.",
            5,
            "users.notes",
            pattern(127),
        ),
        ok(
            "bytes_128",
            "The shortest value with a two-byte length field.",
            6,
            "users.notes",
            pattern(128),
        ),
        ok("kib_4", "4 KiB.", 7, "users.notes", pattern(4096)),
        ok(
            "kib_16",
            "16 KiB: a three-byte length field.",
            10,
            "users.notes",
            pattern(16384),
        ),
        ok(
            "unicode",
            "UTF-8 text with non-ASCII characters.",
            8,
            "users.name",
            "Zoë 王小明 🔐".as_bytes().to_vec(),
        ),
        ok(
            "long_label",
            "A 255-byte context label, the longest allowed.",
            11,
            &"l".repeat(255),
            b"x".to_vec(),
        ),
        text,
        bad(
            "tag_flipped",
            "The last bit of the tag is flipped.",
            "Decrypt",
            |c| {
                let n = c.blob.len();
                c.blob[n - 1] ^= 0x01;
            },
        ),
        bad(
            "ciphertext_flipped",
            "One ciphertext bit is flipped.",
            "Decrypt",
            |c| c.blob[31] ^= 0x80,
        ),
        bad(
            "nonce_flipped",
            "One nonce bit is flipped.",
            "Decrypt",
            |c| c.blob[20] ^= 0x04,
        ),
        bad(
            "key_id_flipped",
            "One key-id bit is flipped (the key id is in the AAD); the harness holds the vector's dek under the flipped id, so the tag fails.",
            "Decrypt",
            |c| {
                c.blob[5] ^= 0x10;
                c.key_id[3] ^= 0x10;
            },
        ),
        bad(
            "context_mismatch",
            "The value is opened as another column.",
            "Decrypt",
            |c| c.context = "users.email".into(),
        ),
        bad(
            "wrong_key",
            "The value is opened with a different key under the same id.",
            "Decrypt",
            |c| c.dek = OTHER_DEK,
        ),
        bad(
            "truncated_header",
            "Only the first 20 bytes.",
            "Truncated",
            |c| c.blob.truncate(20),
        ),
        bad(
            "truncated_length",
            "The 30-byte header alone, no length field.",
            "Truncated",
            |c| c.blob.truncate(30),
        ),
        bad(
            "truncated_tag",
            "The last byte of the tag is missing.",
            "Truncated",
            |c| {
                c.blob.pop();
            },
        ),
        bad(
            "trailing_bytes",
            "One byte after the tag.",
            "TrailingBytes",
            |c| c.blob.push(0),
        ),
        bad(
            "unknown_version",
            "Version byte 0x02.",
            "UnsupportedVersion",
            |c| c.blob[0] = 0x02,
        ),
        bad(
            "unknown_algorithm",
            "Algorithm byte 0x02.",
            "UnknownAlgorithm",
            |c| c.blob[1] = 0x02,
        ),
        bad(
            "non_minimal_length",
            "The length 11 written as two bytes (0x8b 0x00).",
            "MalformedLength",
            |c| {
                c.blob.splice(30..31, [0x8b, 0x00]);
            },
        ),
        bad(
            "length_too_long",
            "A five-byte length field.",
            "MalformedLength",
            |c| {
                c.blob.splice(30..31, [0x8b, 0x80, 0x80, 0x80, 0x00]);
            },
        ),
        bad(
            "length_five_bytes",
            "A minimal five-byte length field (ff ff ff ff 01): only the four-byte limit rejects it.",
            "MalformedLength",
            |c| {
                c.blob.splice(30..31, [0xff, 0xff, 0xff, 0xff, 0x01]);
            },
        ),
        bad(
            "length_four_continuations",
            "The value ends right after four length bytes that all have the high bit set: the limit is reached before the end.",
            "MalformedLength",
            |c| {
                c.blob.truncate(30);
                c.blob.extend_from_slice(&[0x80, 0x80, 0x80, 0x80]);
            },
        ),
        bad(
            "length_runs_out",
            "The value ends inside its length field, after three bytes with the high bit set.",
            "Truncated",
            |c| {
                c.blob.truncate(30);
                c.blob.extend_from_slice(&[0x80, 0x80, 0x80]);
            },
        ),
        bad(
            "unknown_key",
            "A well-formed value under a key id the harness does not hold (a shredded key, or a value from another database).",
            "UnknownKey",
            |c| c.key_id = [0x11; 16],
        ),
        bad(
            "not_envelope_text",
            "Legacy plaintext `hello`.",
            "NotEnvelope",
            |c| c.blob = b"hello".to_vec(),
        ),
        bad(
            "not_envelope_empty",
            "An empty byte string.",
            "NotEnvelope",
            |c| c.blob = vec![],
        ),
        bad(
            "not_envelope_zero",
            "A first byte of 0x00.",
            "NotEnvelope",
            |c| c.blob[0] = 0x00,
        ),
        bad(
            "text_missing_prefix",
            "Base64 of a valid value without the `ev1:` prefix.",
            "NotEnvelope",
            |c| {
                c.text = true;
                c.blob = format::to_text(&c.blob).as_bytes()[4..].to_vec();
            },
        ),
        bad(
            "text_bad_base64",
            "The prefix followed by characters outside base64.",
            "MalformedText",
            |c| {
                c.text = true;
                c.blob = b"ev1:!!!!".to_vec();
            },
        ),
        bad(
            "text_unpadded",
            "Base64 with its padding removed.",
            "MalformedText",
            |c| {
                c.text = true;
                let t = format::to_text(&c.blob);
                c.blob = t.trim_end_matches('=').as_bytes().to_vec();
            },
        ),
    ]
}

fn to_vector(c: &Case) -> Vector {
    Vector {
        name: c.name.into(),
        description: c.description.into(),
        form: if c.text { "text" } else { "binary" }.into(),
        dek: hex::encode(c.dek),
        key_id: hex::encode(c.key_id),
        nonce: hex::encode(c.nonce),
        context: c.context.clone(),
        plaintext: hex::encode(&c.plaintext),
        blob: hex::encode(&c.blob),
        expect: c.expect.into(),
    }
}

/// What docs/FORMAT.md section 8 tells a harness to do with a vector, through the public API:
/// decode the form, then open the bytes with a keyring whose key table holds `dek` under
/// `key_id` (wrapped by a local KMS) and nothing else.
async fn evaluate(v: &Vector) -> Result<Vec<u8>, String> {
    let raw = hex::decode(&v.blob).map_err(|e| format!("the vector's blob is not hex: {e}"))?;
    let bytes = if v.form == "text" {
        let text = String::from_utf8(raw).map_err(|_| "the text form is not UTF-8".to_owned())?;
        format::from_text(&text).map_err(|e| Error::from(e).name().to_owned())?
    } else {
        raw
    };
    let kms = LocalKms::from_key(KeyMaterial::from_slice(&[0x42; 32]).unwrap());
    let cmk = kms.cmk_id().to_owned();
    let id = KeyId::from_bytes(hex::decode(&v.key_id).unwrap().try_into().unwrap());
    let dek =
        KeyMaterial::from_slice(&hex::decode(&v.dek).unwrap()).map_err(|e| e.name().to_owned())?;
    let context = EncryptionContext::new()
        .with("envelope.key_id", id.to_hex())
        .with("envelope.kind", KeyKind::Data.as_str())
        .with("envelope.scope", "default");
    let wrapped = kms.encrypt(&cmk, &dek, &context).await.unwrap();
    let store = MemoryKeyStore::new();
    store
        .insert(&KeyRecord {
            id,
            kind: KeyKind::Data,
            scope: "default".into(),
            provider: kms.name().to_owned(),
            cmk_id: cmk,
            wrapped,
            kms_context: context.canonical_json(),
            created_at: SystemTime::now(),
            retired_at: Some(SystemTime::now()),
        })
        .await
        .unwrap();
    let keyring = Keyring::builder(kms, store).build().unwrap();
    let label = Label::new(v.context.clone()).map_err(|e| e.name().to_owned())?;
    keyring
        .decrypt(&label, &bytes)
        .await
        .map_err(|e| e.name().to_owned())
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/vectors/v1")
}

fn render(v: &Vector) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| unreachable!());
    s.push('\n');
    s
}

#[test]
fn committed_vectors_match_the_generator() {
    let write = std::env::var_os("ENVELOPE_WRITE_VECTORS").is_some();
    let cases = cases();
    let mut names = std::collections::BTreeSet::new();
    for case in &cases {
        assert!(names.insert(case.name), "duplicate vector {}", case.name);
        let path = dir().join(format!("{}.json", case.name));
        let expected = render(&to_vector(case));
        if write {
            std::fs::create_dir_all(dir()).unwrap();
            std::fs::write(&path, &expected).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; regenerate with ENVELOPE_WRITE_VECTORS=1",
                path.display()
            )
        });
        assert_eq!(
            committed,
            expected,
            "{} drifted from the generator",
            path.display()
        );
    }
    // No stray files either.
    let on_disk = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .count();
    assert_eq!(
        on_disk,
        cases.len(),
        "docs/vectors/v1 holds files the generator does not make"
    );
}

#[tokio::test]
async fn every_committed_vector_gives_its_expected_result() {
    let mut positive = 0;
    let mut negative = 0;
    for entry in std::fs::read_dir(dir()).unwrap() {
        let path = entry.unwrap().path();
        let v: Vector = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let got = evaluate(&v).await;
        if v.expect == "ok" {
            positive += 1;
            let pt = got.unwrap_or_else(|e| panic!("{}: {e}", v.name));
            assert_eq!(hex::encode(pt), v.plaintext, "{}", v.name);
        } else {
            negative += 1;
            match got {
                Ok(_) => panic!("{} opened but should fail with {}", v.name, v.expect),
                Err(e) => assert_eq!(e, v.expect, "{}", v.name),
            }
        }
    }
    assert!(
        positive >= 8 && negative >= 8,
        "{positive} positive, {negative} negative"
    );
}
