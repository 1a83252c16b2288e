//! What the providers that speak HTTP themselves (Tencent, Vault/OpenBao) share: the endpoint
//! rules, the client settings, and bounded retries with jittered exponential back-off.

use std::time::Duration;

use rand::RngExt as _;

use crate::error::{Error, KmsError, KmsErrorKind, Result};

/// How often, and for how long, one provider call may try.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Retry {
    /// Time allowed for one attempt, connecting and reading the whole response included.
    pub(crate) request_timeout: Duration,
    /// Attempts per call, retries included; at least 1.
    pub(crate) max_attempts: u32,
    /// The first retry waits about this long, each later one twice as long (up to
    /// [`BACKOFF_DOUBLINGS`] doublings), with jitter between 50 % and 150 %.
    pub(crate) backoff: Duration,
}

/// The back-off doubles this many times at most (to 1024 times the first one).
const BACKOFF_DOUBLINGS: u32 = 10;

impl Retry {
    pub(crate) fn new(request_timeout: Duration, max_attempts: u32, backoff: Duration) -> Self {
        Retry {
            request_timeout,
            max_attempts: max_attempts.max(1),
            backoff,
        }
    }

    /// The longest a call can take: every attempt at its full `request_timeout` (which includes
    /// connecting), plus every back-off at its longest jitter (150 %).
    pub(crate) fn budget(&self) -> Duration {
        let attempts = self.request_timeout.saturating_mul(self.max_attempts);
        let retries = self.max_attempts - 1; // `new` made it at least 1
        // The back-off doubles up to retry BACKOFF_DOUBLINGS + 1 and stays flat after it.
        let doubling = retries.min(BACKOFF_DOUBLINGS + 1);
        let growing = (1..=doubling).fold(Duration::ZERO, |sum, retry| {
            sum.saturating_add(scale(self.base(retry), 1.5))
        });
        let flat = scale(self.base(retries), 1.5).saturating_mul(retries - doubling);
        attempts.saturating_add(growing).saturating_add(flat)
    }

    /// The wait before retry number `attempt` (1 for the first retry), jittered between 50 %
    /// and 150 % so that synchronized clients spread out.
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        scale(self.base(attempt), 0.5 + rand::rng().random::<f64>())
    }

    fn base(&self, attempt: u32) -> Duration {
        self.backoff
            .saturating_mul(1 << attempt.saturating_sub(1).min(BACKOFF_DOUBLINGS))
    }

    /// Run `attempt` until it succeeds, fails in a way a retry cannot fix, or runs out of
    /// attempts. `target` names the provider in the debug log of each retry.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        target: &'static str,
        action: &str,
        mut attempt: F,
    ) -> std::result::Result<T, KmsError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, KmsError>>,
    {
        let mut n = 0;
        loop {
            n += 1;
            match attempt().await {
                Err(e) if e.is_retryable() && n < self.max_attempts => {
                    let wait = self.delay(n);
                    tracing::debug!(target: "envelope::kms", provider = target, action, attempt = n, ?wait, error = %e, "retrying");
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }
}

/// `d * factor`, saturating instead of panicking on overflow.
fn scale(d: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

/// Parse and check an endpoint: an http(s) URL with a host, plain `http://` only for a loopback
/// host unless `allow_insecure_http`. `what` names the setting in errors
/// (`TencentConfig::endpoint`).
pub(crate) fn endpoint(
    provider: &str,
    what: &str,
    endpoint: &str,
    allow_insecure_http: bool,
) -> Result<reqwest::Url> {
    let url = reqwest::Url::parse(endpoint).map_err(|e| {
        Error::config(
            format!("{provider} endpoint {endpoint:?}"),
            format!("is not a URL: {e}"),
        )
    })?;
    if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
        return Err(Error::config(
            format!("{provider} endpoint {endpoint:?}"),
            "must be an http(s) URL with a host",
        ));
    }
    if url.scheme() == "http" && !is_loopback(&url) && !allow_insecure_http {
        return Err(Error::config(
            format!("{provider} endpoint {endpoint:?}"),
            format!(
                "is plain http to a host that is not a loopback address: KMS responses carry plaintext data keys, so use https (or set {what} on a network you control)"
            ),
        ));
    }
    Ok(url)
}

/// Whether the URL's host is a loopback address: `127.0.0.0/8`, `::1` or `localhost`.
pub(crate) fn is_loopback(url: &reqwest::Url) -> bool {
    // The URL parser has already normalized the host: IPv4 in dotted decimal, IPv6 in brackets.
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    super::is_loopback_host(bare)
}

/// An HTTP client with these timeouts that never follows a redirect: a redirect would send the
/// authenticated request (its token or signed session token) elsewhere and take a data key from
/// whoever answers there.
pub(crate) fn client(
    connect_timeout: Duration,
    request_timeout: Duration,
    extra_roots: Vec<reqwest::Certificate>,
) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .timeout(request_timeout)
        .redirect(reqwest::redirect::Policy::none());
    for cert in extra_roots {
        builder = builder.add_root_certificate(cert);
    }
    builder.build().map_err(|e| {
        Error::System(crate::error::SystemError::HttpClient {
            detail: e.to_string(),
        })
    })
}

/// The most a KMS or metadata response may hold. Real answers are a few hundred bytes to a few
/// KiB; a timeout bounds how long a response takes, not how big it is (at loopback speed that
/// is gigabytes held in memory).
pub(crate) const MAX_RESPONSE: usize = 64 * 1024;

/// Read a response's body, refusing one larger than [`MAX_RESPONSE`] (by its `Content-Length`
/// before reading, or as it arrives). The body is held in memory that is wiped on drop.
///
/// # Errors
/// [`KmsErrorKind::InvalidResponse`] for a body too large; a transport error while reading.
pub(crate) async fn read_capped(
    provider: &'static str,
    mut response: reqwest::Response,
) -> std::result::Result<zeroize::Zeroizing<Vec<u8>>, KmsError> {
    let too_large = || {
        KmsError::new(provider, KmsErrorKind::InvalidResponse).with_message(format!(
            "the response is larger than {} KiB; refused",
            MAX_RESPONSE / 1024
        ))
    };
    if response
        .content_length()
        .is_some_and(|n| n > MAX_RESPONSE as u64)
    {
        return Err(too_large());
    }
    let mut body = zeroize::Zeroizing::new(Vec::new());
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| transport_error(provider, &e))?
    {
        if body.len() + chunk.len() > MAX_RESPONSE {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A failed send or read, as a retryable network or timeout error.
pub(crate) fn transport_error(provider: &'static str, e: &reqwest::Error) -> KmsError {
    let kind = if e.is_timeout() {
        KmsErrorKind::Timeout
    } else {
        KmsErrorKind::Network
    };
    // reqwest's Display names the URL and the failure, never a body.
    KmsError::new(provider, kind).with_message(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-shot HTTP server on loopback that answers `head` then `body_len` bytes.
    async fn serve(head: String, body_len: usize) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(head.as_bytes()).await;
            let chunk = vec![b'x'; 16 * 1024];
            let mut left = body_len;
            while left > 0 {
                let n = left.min(chunk.len());
                if s.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                left -= n;
            }
        });
        format!("http://{addr}/")
    }

    #[tokio::test]
    async fn responses_are_capped() {
        let client = reqwest::Client::new();
        // Announced too large: refused before reading.
        let url = serve(
            "HTTP/1.1 200 OK\r\ncontent-length: 10000000\r\n\r\n".into(),
            10_000_000,
        )
        .await;
        let r = client.get(&url).send().await.unwrap();
        let e = read_capped("test", r).await.unwrap_err();
        assert_eq!(e.kind(), KmsErrorKind::InvalidResponse);
        // Not announced (read to the end of the connection): refused as it arrives.
        let url = serve(
            "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".into(),
            1_000_000,
        )
        .await;
        let r = client.get(&url).send().await.unwrap();
        let e = read_capped("test", r).await.unwrap_err();
        assert_eq!(e.kind(), KmsErrorKind::InvalidResponse);
        assert!(e.to_string().contains("64 KiB"), "{e}");
        // A normal answer is read whole.
        let url = serve(
            "HTTP/1.1 200 OK\r\ncontent-length: 3000\r\n\r\n".into(),
            3000,
        )
        .await;
        let r = client.get(&url).send().await.unwrap();
        assert_eq!(read_capped("test", r).await.unwrap().len(), 3000);
    }

    fn retry(request_timeout: Duration, max_attempts: u32, backoff: Duration) -> Retry {
        Retry::new(request_timeout, max_attempts, backoff)
    }

    #[test]
    fn budget_counts_every_attempt_and_the_longest_backoffs() {
        // 3 attempts x 2.5 s, plus back-offs of 100 ms and 200 ms at 150 % jitter.
        let r = retry(Duration::from_millis(2500), 3, Duration::from_millis(100));
        assert_eq!(r.budget(), Duration::from_millis(7950));
        // Zero attempts are clamped to one, with no back-off.
        let r = retry(Duration::from_secs(4), 0, Duration::from_secs(1));
        assert_eq!(r.budget(), Duration::from_secs(4));
        // 5 s + (10 + 20 + 40 + 80) ms x 1.5
        let r = retry(Duration::from_secs(1), 5, Duration::from_millis(10));
        assert_eq!(r.budget(), Duration::from_millis(5225));
        // Past ten doublings the back-off stays at 1024 x backoff:
        // (2 + 4 + ... + 2048) + 2 x 2048 ms, all x 1.5
        let r = retry(Duration::ZERO, 14, Duration::from_millis(2));
        assert_eq!(r.budget(), Duration::from_millis((4094 + 4096) * 3 / 2));
        // Absurd settings saturate instead of panicking.
        let r = retry(Duration::MAX, u32::MAX, Duration::MAX);
        assert_eq!(r.budget(), Duration::MAX);
        assert!(r.delay(40) >= Duration::from_secs(1));
    }

    #[test]
    fn delays_are_jittered_around_a_doubling_base() {
        let r = retry(Duration::from_secs(1), 5, Duration::from_millis(100));
        for attempt in 1..=4u32 {
            let base = 100.0 * f64::from(1u32 << (attempt - 1));
            for _ in 0..50 {
                let d = r.delay(attempt).as_secs_f64() * 1000.0;
                assert!((base * 0.5..=base * 1.5).contains(&d), "{attempt}: {d}");
            }
        }
    }

    #[test]
    fn plain_http_is_for_loopback_hosts_only() {
        for ok in [
            "http://127.0.0.1:9190",
            "http://127.8.9.10",
            "http://[::1]:9190",
            "http://localhost:9190",
            "http://LocalHost",
            "https://10.0.0.1:1",
            "https://kms.ap-guangzhou.tencentcloudapi.com",
        ] {
            assert!(endpoint("test", "x", ok, false).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:1",
            "http://kms.tencentcloudapi.com",
            "http://localhost.example.com",
            "http://[::ffff:10.0.0.1]",
            "http://0.0.0.0:9190",
        ] {
            let err = endpoint("test", "Config::danger", bad, false).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains(bad)
                    && msg.contains("not a loopback address")
                    && msg.contains("Config::danger"),
                "{msg}"
            );
            assert!(endpoint("test", "x", bad, true).is_ok(), "{bad} opted in");
        }
        for bad in ["ftp://x", "not a url", "http://"] {
            assert!(endpoint("test", "x", bad, true).is_err(), "{bad}");
        }
    }
}
