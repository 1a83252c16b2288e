//! Key URIs ([`KeyUri`]).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::kms::KmsProvider;

/// Key URIs: one string that names a KMS provider and a master key in it, as the CLI's config
/// and an application's settings both take it.
///
/// | URI | provider | master key | read from the environment |
/// |---|---|---|---|
/// | `local://PATH` | [`LocalKms`](crate::LocalKms) | the key file's key | nothing |
/// | `tencent://REGION/CMK_ID` | Tencent Cloud KMS | `CMK_ID` | `TENCENTCLOUD_SECRET_ID`, `TENCENTCLOUD_SECRET_KEY`, `TENCENTCLOUD_SESSION_TOKEN`, `ENVELOPE_TENCENT_ENDPOINT`; or `ENVELOPE_TENCENT_CREDENTIALS=instance-role`: see `TencentConfig::for_region_from_env` (feature `kms-tencent`) |
/// | `aws://REGION/KEY` | AWS KMS | `KEY`: a key id, key ARN, `alias/NAME` or alias ARN | the SDK's default chain (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, web identity, instance metadata, ...), `AWS_ENDPOINT_URL_KMS` |
/// | `vault://HOST[:PORT]/MOUNT/KEY` | Vault / OpenBao Transit over https | `MOUNT/KEY` | `VAULT_TOKEN` (or `BAO_TOKEN`), `VAULT_NAMESPACE`, `VAULT_CACERT` |
/// | `vault+http://HOST[:PORT]/MOUNT/KEY` | the same over plain http, for a loopback host only (a dev server) | `MOUNT/KEY` | as above |
///
/// `PATH` is everything after `local://` (`local:///etc/envelope/master.key` is absolute,
/// `local://master.key` relative to the working directory). A URI never carries credentials:
/// one with `user@` or `?query` is refused, so a secret cannot end up in a config file or a log
/// line that prints the URI.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyUri {
    /// `local://PATH`: a master key file made with `envelope keygen`.
    Local {
        /// The key file.
        path: PathBuf,
    },
    /// `tencent://REGION/CMK_ID`.
    Tencent {
        /// The region, for example `ap-guangzhou`.
        region: String,
        /// The CMK's KeyId (or `alias/NAME`).
        cmk: String,
    },
    /// `aws://REGION/KEY`.
    Aws {
        /// The region, for example `eu-west-1`.
        region: String,
        /// A key id, key ARN, alias name (`alias/NAME`) or alias ARN.
        key: String,
    },
    /// `vault://HOST[:PORT]/MOUNT/KEY` (https) or `vault+http://...` (plain http, loopback only).
    Vault {
        /// The server's base URL, `https://HOST[:PORT]` (or `http://` for `vault+http`).
        address: String,
        /// The transit key as `MOUNT/KEY`.
        cmk: String,
    },
}

const FORMS: &str = "a key URI is local://PATH, tencent://REGION/CMK_ID, aws://REGION/KEY_ID_OR_ARN, or vault://HOST[:PORT]/MOUNT/KEY (see docs/PROVIDERS.md)";

fn bad(uri: &str, why: impl fmt::Display) -> Error {
    Error::config(format!("key URI {uri:?}"), why.to_string())
}

impl FromStr for KeyUri {
    type Err = Error;

    fn from_str(uri: &str) -> Result<Self> {
        KeyUri::parse(uri)
    }
}

impl KeyUri {
    /// Parse a key URI.
    ///
    /// # Errors
    /// [`Error::Config`] naming the problem and the accepted forms.
    pub fn parse(uri: &str) -> Result<Self> {
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad(uri, FORMS))?;
        if scheme != "local" && (rest.contains('@') || rest.contains('?') || rest.contains('#')) {
            return Err(bad(
                uri,
                "a key URI carries no credentials or options; credentials come from the environment (see docs/PROVIDERS.md)",
            ));
        }
        let two = |what: &str| {
            rest.split_once('/')
                .filter(|(a, b)| !a.is_empty() && !b.is_empty() && !b.ends_with('/'))
                .ok_or_else(|| bad(uri, format!("expected {scheme}://{what}")))
        };
        match scheme {
            "local" if !rest.is_empty() => Ok(KeyUri::Local {
                path: PathBuf::from(rest),
            }),
            "local" => Err(bad(uri, "expected local://PATH")),
            "tencent" => {
                let (region, cmk) = two("REGION/CMK_ID")?;
                Ok(KeyUri::Tencent {
                    region: region.to_owned(),
                    cmk: cmk.to_owned(),
                })
            }
            "aws" => {
                let (region, key) = two("REGION/KEY_ID_OR_ARN")?;
                if let Some(arn_region) = key
                    .strip_prefix("arn:")
                    .and_then(|arn| arn.split(':').nth(2))
                    && arn_region != region
                {
                    return Err(bad(
                        uri,
                        format!(
                            "the ARN is in region {arn_region}, the URI names {region}; AWS KMS keys are regional"
                        ),
                    ));
                }
                Ok(KeyUri::Aws {
                    region: region.to_owned(),
                    key: key.to_owned(),
                })
            }
            "vault" | "vault+http" => {
                let (host, cmk) = rest
                    .split_once('/')
                    .filter(|(h, c)| !h.is_empty() && c.contains('/'))
                    .ok_or_else(|| {
                        bad(uri, format!("expected {scheme}://HOST[:PORT]/MOUNT/KEY"))
                    })?;
                let tls = if scheme == "vault" { "https" } else { "http" };
                Ok(KeyUri::Vault {
                    address: format!("{tls}://{host}"),
                    cmk: cmk.to_owned(),
                })
            }
            "openbao" | "bao" => Err(bad(
                uri,
                "OpenBao speaks the Vault API: write vault://HOST[:PORT]/MOUNT/KEY",
            )),
            _ => Err(bad(uri, FORMS)),
        }
    }

    /// The name of the provider this URI picks, as [`KmsProvider::name`] reports it and the
    /// key table's `provider` column records it: `local`, `tencent`, `aws` or `vault`.
    pub fn provider_name(&self) -> &'static str {
        match self {
            KeyUri::Local { .. } => "local",
            KeyUri::Tencent { .. } => "tencent",
            KeyUri::Aws { .. } => "aws",
            KeyUri::Vault { .. } => "vault",
        }
    }

    /// The master key this URI names, spelled as a key row written under it records it
    /// ([`KeyRecord::cmk_id`](crate::KeyRecord::cmk_id)): `CMK_ID`, `KEY` or `MOUNT/KEY`.
    /// `None` for `local://`, whose key id is read from the key file
    /// ([`KeyUri::connect`] returns it).
    pub fn cmk(&self) -> Option<&str> {
        match self {
            KeyUri::Local { .. } => None,
            KeyUri::Tencent { cmk, .. } | KeyUri::Vault { cmk, .. } => Some(cmk),
            KeyUri::Aws { key, .. } => Some(key),
        }
    }

    /// Whether `self` and `other` name the same KMS (the same key file, Tencent or AWS region,
    /// or Vault server), whatever master key in it each names: then one provider serves both.
    pub fn same_kms(&self, other: &KeyUri) -> bool {
        match (self, other) {
            (KeyUri::Local { path: a }, KeyUri::Local { path: b }) => a == b,
            (KeyUri::Tencent { region: a, .. }, KeyUri::Tencent { region: b, .. })
            | (KeyUri::Aws { region: a, .. }, KeyUri::Aws { region: b, .. })
            | (KeyUri::Vault { address: a, .. }, KeyUri::Vault { address: b, .. }) => a == b,
            _ => false,
        }
    }

    /// Build the provider this URI names, with credentials from the environment (see the
    /// [`KeyUri`] docs), and return it with the master key id new data keys are made under.
    ///
    /// # Errors
    /// [`Error::Config`] when a credential is missing, the key file cannot be read, or this
    /// build lacks the provider's cargo feature (`kms-tencent`, `kms-aws`, `kms-vault`).
    pub async fn connect(&self) -> Result<Connected> {
        match self {
            KeyUri::Local { path } => {
                let kms = crate::kms::local::LocalKms::open(path)?;
                let cmk = kms.cmk_id().to_owned();
                Ok(Connected {
                    kms: Arc::new(kms),
                    cmk,
                })
            }
            #[cfg(feature = "kms-tencent")]
            KeyUri::Tencent { region, cmk } => {
                use crate::kms::tencent::{TencentConfig, TencentKms};
                let config = TencentConfig::for_region_from_env(region.clone())?;
                Ok(Connected {
                    kms: Arc::new(TencentKms::new(config)?),
                    cmk: cmk.clone(),
                })
            }
            #[cfg(feature = "kms-aws")]
            KeyUri::Aws { region, key } => {
                use crate::kms::aws::{AwsConfig, AwsKms};
                Ok(Connected {
                    kms: Arc::new(AwsKms::new(AwsConfig::new(region.clone())).await?),
                    cmk: key.clone(),
                })
            }
            #[cfg(feature = "kms-vault")]
            KeyUri::Vault { address, cmk } => {
                use crate::kms::vault::{VaultConfig, VaultKms};
                let config = VaultConfig::for_address_from_env(address.clone())?;
                Ok(Connected {
                    kms: Arc::new(VaultKms::new(config)?),
                    cmk: cmk.clone(),
                })
            }
            #[allow(unreachable_patterns)]
            other => Err(Error::config(
                other.to_string(),
                format!(
                    "this build has no '{}' provider; enable envelope-core's kms-{} feature",
                    other.provider_name(),
                    other.provider_name()
                ),
            )),
        }
    }
}

impl fmt::Display for KeyUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyUri::Local { path } => write!(f, "local://{}", path.display()),
            KeyUri::Tencent { region, cmk } => write!(f, "tencent://{region}/{cmk}"),
            KeyUri::Aws { region, key } => write!(f, "aws://{region}/{key}"),
            KeyUri::Vault { address, cmk } => match address.split_once("://") {
                Some(("http", host)) => write!(f, "vault+http://{host}/{cmk}"),
                Some((_, host)) => write!(f, "vault://{host}/{cmk}"),
                None => write!(f, "vault://{address}/{cmk}"),
            },
        }
    }
}

/// A provider built from a [`KeyUri`], and the master key it names:
/// `Keyring::builder(c.kms, store).cmk(c.cmk)` to make keys under it, or
/// [`KeyringBuilder::also_read(c)`](crate::KeyringBuilder::also_read) to read keys made under it.
#[derive(Clone)]
pub struct Connected {
    /// The provider.
    pub kms: Arc<dyn KmsProvider>,
    /// The master key id new data keys are made under.
    pub cmk: String,
}

impl fmt::Debug for Connected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connected")
            .field("kms", &self.kms.name())
            .field("cmk", &self.cmk)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses_and_prints_back() {
        for (uri, provider) in [
            ("local://master.key", "local"),
            ("local:///etc/envelope/master.key", "local"),
            (
                "tencent://ap-guangzhou/23e80852-1e38-11e9-b129-5cb9019b4b01",
                "tencent",
            ),
            ("tencent://ap-guangzhou/alias/users", "tencent"),
            (
                "aws://eu-west-1/1234abcd-12ab-34cd-56ef-1234567890ab",
                "aws",
            ),
            ("aws://eu-west-1/alias/users", "aws"),
            (
                "aws://us-east-1/arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
                "aws",
            ),
            ("vault://vault.example.com:8200/transit/users", "vault"),
            ("vault://vault.example.com/team-a/transit/users", "vault"),
            ("vault+http://127.0.0.1:8200/transit/users", "vault"),
        ] {
            let parsed = KeyUri::parse(uri).unwrap();
            assert_eq!(parsed.provider_name(), provider, "{uri}");
            if provider != "local" {
                // The master key is the URI's last part(s), as written.
                let cmk = parsed.cmk().unwrap();
                assert!(uri.ends_with(&format!("/{cmk}")), "{uri}");
            } else {
                assert_eq!(parsed.cmk(), None);
            }
            assert_eq!(parsed.to_string(), uri);
            assert_eq!(uri.parse::<KeyUri>().unwrap(), parsed);
        }
        assert_eq!(
            KeyUri::parse("vault://v.example.com:8200/team-a/transit/users").unwrap(),
            KeyUri::Vault {
                address: "https://v.example.com:8200".into(),
                cmk: "team-a/transit/users".into()
            }
        );
        assert_eq!(
            KeyUri::parse("vault+http://127.0.0.1:8200/transit/k").unwrap(),
            KeyUri::Vault {
                address: "http://127.0.0.1:8200".into(),
                cmk: "transit/k".into()
            }
        );
    }

    #[test]
    fn bad_uris_say_what_is_wrong() {
        for (uri, needle) in [
            ("master.key", "a key URI is"),
            ("local://", "local://PATH"),
            ("tencent://ap-guangzhou", "REGION/CMK_ID"),
            ("tencent://ap-guangzhou/", "REGION/CMK_ID"),
            ("tencent://AKID:secret@ap-guangzhou/k", "no credentials"),
            ("aws://eu-west-1", "REGION/KEY_ID_OR_ARN"),
            (
                "aws://eu-west-1/arn:aws:kms:us-east-1:111122223333:key/k",
                "region us-east-1",
            ),
            ("vault://host/users", "HOST[:PORT]/MOUNT/KEY"),
            ("vault://host:8200/transit/k?token=s.x", "no credentials"),
            ("openbao://host/transit/k", "vault://"),
            ("gcp://x/y", "a key URI is"),
        ] {
            let e = KeyUri::parse(uri).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, Error::Config(_)), "{uri}");
            assert!(msg.contains(needle) && msg.contains(uri), "{uri}: {msg}");
        }
    }

    #[test]
    fn same_kms_compares_the_server_not_the_key() {
        let p = |s: &str| KeyUri::parse(s).unwrap();
        assert!(p("tencent://ap-guangzhou/a").same_kms(&p("tencent://ap-guangzhou/b")));
        assert!(!p("tencent://ap-guangzhou/a").same_kms(&p("tencent://ap-beijing/a")));
        assert!(p("aws://us-east-1/a").same_kms(&p("aws://us-east-1/alias/b")));
        assert!(p("vault://h:1/t/a").same_kms(&p("vault://h:1/t2/b")));
        assert!(!p("vault://h:1/t/a").same_kms(&p("vault+http://h:1/t/a")));
        assert!(!p("local://a").same_kms(&p("local://b")));
        assert!(!p("aws://us-east-1/a").same_kms(&p("tencent://us-east-1/a")));
    }
}
