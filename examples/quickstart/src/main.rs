//! Seal and open a few values with the local KMS and print what happened.
//!
//! `cargo run -p quickstart` needs no setup: it creates `envelope-master.key` (mode 0600) in the
//! current directory on first run and keeps wrapped keys in memory.
#![forbid(unsafe_code)]

use envelope_core::{BlindIndexSpec, Keyring, Label, LocalKms, MemoryKeyStore, Normalizer, format};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let key_file = std::env::var("ENVELOPE_MASTER_KEY_FILE")
        .unwrap_or_else(|_| "envelope-master.key".to_owned());
    let kms = match LocalKms::from_env()? {
        Some(kms) => kms,
        // A console tour with an in-memory key table: a new master key loses nothing here.
        None => LocalKms::open_or_create_for_development(&key_file)?,
    };
    let cmk = kms.cmk_id().to_owned();
    println!("local KMS master key {cmk}");

    let keyring = Keyring::builder(kms, MemoryKeyStore::new())
        .cmk(cmk)
        .build()?;
    keyring.warm().await?;

    let ssn = Label::new("users.ssn")?;
    let email = Label::new("users.email")?;
    let values = ["078-05-1120", "219-09-9999", "457-55-5462"];

    let mut sealed = Vec::new();
    for value in values {
        let blob = keyring.encrypt(&ssn, value.as_bytes()).await?;
        println!(
            "sealed {:>11} -> {} bytes under key {}",
            "***",
            blob.len(),
            format::peek_key_id(&blob)?
        );
        sealed.push(blob);
    }
    for (blob, expected) in sealed.iter().zip(values) {
        let opened = keyring.decrypt(&ssn, blob).await?;
        assert_eq!(opened, expected.as_bytes());
    }
    println!("opened {} values: all match", sealed.len());

    match keyring.decrypt(&email, &sealed[0]).await {
        Err(e) => println!("as another column it fails: {e}"),
        Ok(_) => return Err("a value opened under the wrong label".into()),
    }

    let text = format::to_text(&keyring.encrypt(&email, b"alice@example.com").await?);
    println!("text form for text columns: {}...", &text[..24]);

    let bidx = BlindIndexSpec::new(email.clone(), Normalizer::CaseFolded);
    let a = keyring.blind_index(&bidx, b"Alice@Example.com").await?;
    let b = keyring.blind_index(&bidx, b"alice@example.com ").await?;
    assert_eq!(a, b);
    println!("blind index of the e-mail (case-folded): {}", hex(&a));

    let m = keyring.metrics();
    println!(
        "KMS calls: {} (generate {}, decrypt {}); cache hits {}, misses {}",
        m.kms_calls, m.kms_generate_data_key, m.kms_decrypt, m.cache_hits, m.cache_misses
    );
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
