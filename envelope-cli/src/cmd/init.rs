//! `envelope init`.

use crate::config::Config;
use crate::context::{self, key_store};
use crate::error::Failure;
use crate::job::Jobs;
use crate::report::Output;
use crate::retry::retrying;

/// How long `envelope init` retries a KMS that fails with a transient error.
const INIT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// `envelope init`: create the key table and the job table (idempotent), and check that the
/// KMS answers by making a data key (retired at once: it is never used).
///
/// # Errors
/// A [`Failure`].
pub(crate) async fn init(config: &Config, output: &Output) -> Result<(), Failure> {
    let db = context::connect(config, 2).await?;
    let (_, table) = key_store(config)?;
    table.create().await.map_err(|e| {
        Failure::Unavailable(format!("creating the key table {}: {e}", config.key_table))
    })?;
    Jobs::new(db.clone(), &config.job_table)
        .create_table(&config.job_table)
        .await?;
    let keyring = context::keyring(config).await?;
    // A transient KMS failure (a throttled or briefly failing service) is retried for a while
    // before init reports the KMS unreachable.
    retrying("making a data key", INIT_PATIENCE, || keyring.warm())
        .await
        .map_err(|e| Failure::core(format!("making a data key with kms = {}", config.kms), e))?;
    // That key was made only to show that the KMS answers: it takes no writes.
    keyring
        .retire_active_keys()
        .await
        .map_err(|e| Failure::core("retiring the test data key", e))?;
    output.line(
        &format!(
            "ready: key table {}, job table {}, KMS {} answers",
            config.key_table, config.job_table, config.kms
        ),
        serde_json::json!({
            "event": "init",
            "key_table": config.key_table,
            "job_table": config.job_table,
            "kms": config.kms.to_string(),
        }),
    );
    Ok(())
}
