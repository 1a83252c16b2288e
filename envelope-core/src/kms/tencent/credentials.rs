//! Where the Tencent provider's credentials come from: static keys (with an optional STS session
//! token), or the CAM role of the CVM instance (or TKE node) it runs on, read from the instance
//! metadata service and refreshed before it expires.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::error::{Error, KmsError, KmsErrorKind, Result};
use crate::secret::SecretString;

use super::PROVIDER;

/// Read the credentials of the CAM role bound to this CVM instance (or TKE node) from the
/// instance metadata service, as Tencent recommends for code running on Tencent Cloud: no
/// SecretKey is stored anywhere, and the temporary credentials are replaced before they expire.
///
/// The provider reads `GET {metadata_endpoint}/latest/meta-data/cam/security-credentials/` for
/// the role name (unless [`InstanceRole::role`] is set), then
/// `.../security-credentials/ROLE` for `TmpSecretId`, `TmpSecretKey`, `Token` and
/// `ExpiredTime`, at the first call and again when the credentials expire within
/// [`InstanceRole::refresh_before`] or are refused.
#[derive(Clone, Debug)]
pub struct InstanceRole {
    /// The metadata service. Default `http://metadata.tencentyun.com` (a link-local address
    /// inside Tencent Cloud; plain http by design).
    pub metadata_endpoint: String,
    /// The role's name; `None` (the default) takes the one the metadata service lists.
    pub role: Option<String>,
    /// Replace the credentials when they expire within this. Default 5 minutes.
    pub refresh_before: Duration,
    /// Time allowed for each metadata request. Default 1 s.
    pub timeout: Duration,
}

impl Default for InstanceRole {
    fn default() -> Self {
        InstanceRole {
            metadata_endpoint: "http://metadata.tencentyun.com".to_owned(),
            role: None,
            refresh_before: Duration::from_secs(300),
            timeout: Duration::from_secs(1),
        }
    }
}

/// One set of credentials to sign with.
pub(super) struct Credentials {
    pub(super) secret_id: String,
    pub(super) secret_key: SecretString,
    pub(super) token: Option<SecretString>,
    /// Unix seconds; `None` for static keys.
    expires: Option<i64>,
}

impl Credentials {
    pub(super) fn fixed(
        secret_id: String,
        secret_key: SecretString,
        token: Option<SecretString>,
    ) -> Self {
        Credentials {
            secret_id,
            secret_key,
            token,
            expires: None,
        }
    }
}

/// The provider's credentials: fixed, or the instance role's, refreshed.
pub(super) enum Source {
    Fixed(Arc<Credentials>),
    Role(RoleSource),
}

pub(super) struct RoleSource {
    base: reqwest::Url,
    role: Option<String>,
    refresh_before: Duration,
    timeout: Duration,
    /// The current set; the lock also makes concurrent refreshes one request.
    current: tokio::sync::Mutex<Option<Arc<Credentials>>>,
}

fn now_secs() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
    )
    .unwrap_or(i64::MAX)
}

/// The metadata service's answer for a role.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RoleCredentials {
    tmp_secret_id: String,
    tmp_secret_key: String,
    token: String,
    expired_time: i64,
    #[serde(default)]
    code: String,
}

/// The metadata service's host inside Tencent Cloud (it resolves to a link-local address).
const TENCENT_METADATA_HOST: &str = "metadata.tencentyun.com";

/// Whether plain http may reach `url`'s host for credentials: Tencent's metadata host, a
/// link-local address (169.254.0.0/16, fe80::/10: not routed beyond the instance's link) or a
/// loopback one. Anywhere else its answers (credentials) could be read or forged on the way.
fn metadata_host_is_local(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match bare.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => ip.is_link_local() || ip.is_loopback(),
        Ok(std::net::IpAddr::V6(ip)) => ip.is_loopback() || (ip.segments()[0] & 0xffc0) == 0xfe80,
        Err(_) => {
            bare.eq_ignore_ascii_case(TENCENT_METADATA_HOST)
                || bare.eq_ignore_ascii_case("localhost")
        }
    }
}

impl RoleSource {
    /// `allow_insecure_http`: plain http to any metadata host
    /// ([`TencentConfig::danger_allow_insecure_http`](super::TencentConfig)).
    pub(super) fn new(role: &InstanceRole, allow_insecure_http: bool) -> Result<Self> {
        let what = || {
            format!(
                "InstanceRole::metadata_endpoint {:?}",
                role.metadata_endpoint
            )
        };
        let base = reqwest::Url::parse(&role.metadata_endpoint)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .ok_or_else(|| Error::config(what(), "is not an http(s) URL with a host"))?;
        if base.scheme() == "http" && !allow_insecure_http && !metadata_host_is_local(&base) {
            return Err(Error::config(
                what(),
                "plain http carries credentials only to the metadata service's own host, a link-local or a loopback address: use https, or set TencentConfig::danger_allow_insecure_http",
            ));
        }
        Ok(RoleSource {
            base,
            role: role.role.clone().filter(|r| !r.is_empty()),
            refresh_before: role.refresh_before,
            timeout: role.timeout,
            current: tokio::sync::Mutex::new(None),
        })
    }

    /// The longest [`RoleSource::get`] can take: two metadata requests.
    pub(super) fn budget(&self) -> Duration {
        self.timeout.saturating_mul(2)
    }

    /// Credentials valid for at least `refresh_before` (or, if the metadata service fails, the
    /// current ones while they last).
    pub(super) async fn get(
        &self,
        client: &reqwest::Client,
    ) -> std::result::Result<Arc<Credentials>, KmsError> {
        let mut current = self.current.lock().await;
        let now = now_secs();
        let fresh_until =
            now.saturating_add(i64::try_from(self.refresh_before.as_secs()).unwrap_or(i64::MAX));
        if let Some(c) = current.as_ref()
            && c.expires.is_some_and(|e| e > fresh_until)
        {
            return Ok(c.clone());
        }
        match self.fetch(client).await {
            Ok(c) => {
                let c = Arc::new(c);
                *current = Some(c.clone());
                tracing::debug!(target: "envelope::kms::tencent", expires = ?c.expires, "instance role credentials refreshed");
                Ok(c)
            }
            Err(e) => match current.as_ref() {
                Some(c) if c.expires.is_some_and(|x| x > now) => {
                    tracing::warn!(target: "envelope::kms::tencent", error = %e, "cannot refresh the instance role credentials; using the current ones until they expire");
                    Ok(c.clone())
                }
                _ => Err(e),
            },
        }
    }

    /// Forget the current credentials (the KMS refused them): the next call fetches new ones.
    pub(super) async fn forget(&self) {
        *self.current.lock().await = None;
    }

    async fn fetch(&self, client: &reqwest::Client) -> std::result::Result<Credentials, KmsError> {
        let role = match &self.role {
            Some(r) => r.clone(),
            None => {
                let listed = self.read(client, "").await?;
                let name = listed.lines().next().unwrap_or("").trim().to_owned();
                if name.is_empty() {
                    return Err(metadata_error(
                        KmsErrorKind::Auth,
                        &self.base,
                        "no CAM role is bound to this instance (bind one in the CVM console, or use TENCENTCLOUD_SECRET_ID/KEY)",
                    ));
                }
                name
            }
        };
        let body = self.read(client, &role).await?;
        let parsed: RoleCredentials = serde_json::from_str(&body).map_err(|_| {
            metadata_error(
                KmsErrorKind::InvalidResponse,
                &self.base,
                &format!("the credentials of role {role:?} are not the expected JSON"),
            )
        })?;
        if !parsed.code.is_empty() && parsed.code != "Success" {
            return Err(metadata_error(
                KmsErrorKind::Auth,
                &self.base,
                &format!(
                    "the metadata service answered Code {:?} for role {role:?}",
                    parsed.code
                ),
            ));
        }
        Ok(Credentials {
            secret_id: parsed.tmp_secret_id,
            secret_key: SecretString::new(parsed.tmp_secret_key),
            token: Some(SecretString::new(parsed.token)),
            expires: Some(parsed.expired_time),
        })
    }

    /// `GET .../cam/security-credentials/{leaf}` as text (wiped on drop: it holds a key).
    async fn read(
        &self,
        client: &reqwest::Client,
        leaf: &str,
    ) -> std::result::Result<Zeroizing<String>, KmsError> {
        let mut url = self.base.clone();
        {
            let Ok(mut segments) = url.path_segments_mut() else {
                unreachable!("http(s) URLs have paths")
            };
            segments
                .pop_if_empty()
                .extend(["latest", "meta-data", "cam", "security-credentials"])
                .push(leaf);
        }
        let response = client
            .get(url)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| {
                let kind = if e.is_timeout() {
                    KmsErrorKind::Timeout
                } else {
                    KmsErrorKind::Network
                };
                metadata_error(kind, &self.base, &format!("no answer: {e}"))
            })?;
        let status = response.status();
        let body = super::super::http::read_capped(super::PROVIDER, response)
            .await
            .map_err(|e| {
                metadata_error(e.kind(), &self.base, &format!("reading the answer: {e}"))
            })?;
        let text = Zeroizing::new(String::from_utf8_lossy(&body).into_owned());
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(metadata_error(
                KmsErrorKind::Auth,
                &self.base,
                &format!("no CAM role {leaf:?} on this instance (HTTP 404)"),
            ));
        }
        if !status.is_success() {
            let kind = if status.is_server_error() {
                KmsErrorKind::Unavailable
            } else {
                KmsErrorKind::InvalidResponse
            };
            return Err(metadata_error(kind, &self.base, &format!("HTTP {status}")));
        }
        Ok(text)
    }
}

fn metadata_error(kind: KmsErrorKind, base: &reqwest::Url, what: &str) -> KmsError {
    KmsError::new(PROVIDER, kind).with_message(format!(
        "instance role credentials from the metadata service at {base}: {what}"
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn plain_http_metadata_only_to_local_hosts() {
        let ok = |u: &str, insecure: bool| {
            super::RoleSource::new(
                &super::InstanceRole {
                    metadata_endpoint: u.into(),
                    ..super::InstanceRole::default()
                },
                insecure,
            )
            .is_ok()
        };
        for local in [
            "http://metadata.tencentyun.com",
            "http://169.254.0.23",
            "http://127.0.0.1:8080",
            "http://[::1]:80",
            "http://[fe80::1]",
            "https://metadata.example.com",
        ] {
            assert!(ok(local, false), "{local}");
        }
        for remote in [
            "http://metadata.example.com",
            "http://10.0.0.5",
            "http://[2001:db8::1]",
        ] {
            assert!(!ok(remote, false), "{remote}");
            assert!(ok(remote, true), "{remote}");
        }
    }
}
