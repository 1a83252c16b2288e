//! TC3-HMAC-SHA256, Tencent Cloud API 3.0's request signature.
//!
//! Public so that the KMS emulator verifies requests with exactly the code the client signs
//! them with, and so that both can be checked against the published vectors and the official
//! SDK. Every function is pure.

use hmac::Mac as _;
use sha2::{Digest as _, Sha256};

type HmacSha256 = hmac::Hmac<Sha256>;

/// The algorithm name in the string to sign and the Authorization header.
pub const ALGORITHM: &str = "TC3-HMAC-SHA256";

/// Lower-case hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length.
    let mut mac = <HmacSha256 as hmac::KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The UTC calendar date (`YYYY-MM-DD`) of a Unix timestamp: the credential scope's date.
pub fn utc_date(timestamp: i64) -> String {
    // Howard Hinnant's days-to-civil algorithm.
    let z = timestamp.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// One request as the signature sees it.
#[derive(Clone, Debug)]
pub struct CanonicalInput<'a> {
    /// HTTP method, upper case (`POST`).
    pub method: &'a str,
    /// The path (`/`).
    pub uri: &'a str,
    /// The canonical query string (empty for POST).
    pub query: &'a str,
    /// The signed headers as (name, value); names in any case, any order.
    pub headers: &'a [(&'a str, &'a str)],
    /// The exact body bytes sent.
    pub payload: &'a [u8],
}

impl CanonicalInput<'_> {
    /// The signed header names, lower case, sorted, joined with `;`.
    pub fn signed_headers(&self) -> String {
        let mut names: Vec<String> = self
            .headers
            .iter()
            .map(|(n, _)| n.to_ascii_lowercase())
            .collect();
        names.sort();
        names.join(";")
    }

    /// The canonical request of step 1.
    pub fn canonical_request(&self) -> String {
        let mut headers: Vec<(String, String)> = self
            .headers
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_ascii_lowercase()))
            .collect();
        headers.sort();
        let mut canonical_headers = String::new();
        for (n, v) in &headers {
            canonical_headers.push_str(n);
            canonical_headers.push(':');
            canonical_headers.push_str(v);
            canonical_headers.push('\n');
        }
        format!(
            "{}\n{}\n{}\n{}\n{}\n{}",
            self.method,
            self.uri,
            self.query,
            canonical_headers,
            self.signed_headers(),
            sha256_hex(self.payload)
        )
    }
}

/// The credential scope: `YYYY-MM-DD/<service>/tc3_request`.
pub fn credential_scope(timestamp: i64, service: &str) -> String {
    format!("{}/{service}/tc3_request", utc_date(timestamp))
}

/// The string to sign of step 2.
pub fn string_to_sign(timestamp: i64, service: &str, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{timestamp}\n{}\n{}",
        credential_scope(timestamp, service),
        sha256_hex(canonical_request.as_bytes())
    )
}

/// The signing key of step 3: HMAC chain over the date, the service and `tc3_request`.
pub fn signing_key(secret_key: &[u8], date: &str, service: &str) -> [u8; 32] {
    let mut k = Vec::with_capacity(3 + secret_key.len());
    k.extend_from_slice(b"TC3");
    k.extend_from_slice(secret_key);
    let k_date = hmac(&k, date.as_bytes());
    zeroize::Zeroize::zeroize(&mut k);
    let k_service = hmac(&k_date, service.as_bytes());
    hmac(&k_service, b"tc3_request")
}

/// The lower-case hex signature of a request.
pub fn signature(
    secret_key: &[u8],
    timestamp: i64,
    service: &str,
    input: &CanonicalInput<'_>,
) -> String {
    signature_with_scope_date(secret_key, &utc_date(timestamp), timestamp, service, input)
}

/// The signature with an explicit credential-scope date. A correct client always passes
/// [`utc_date`]`(timestamp)`; a verifier uses this to recompute what a client with a wrong date
/// would have sent.
pub fn signature_with_scope_date(
    secret_key: &[u8],
    date: &str,
    timestamp: i64,
    service: &str,
    input: &CanonicalInput<'_>,
) -> String {
    let key = signing_key(secret_key, date, service);
    let sts = format!(
        "{ALGORITHM}\n{timestamp}\n{date}/{service}/tc3_request\n{}",
        sha256_hex(input.canonical_request().as_bytes())
    );
    hex::encode(hmac(&key, sts.as_bytes()))
}

/// The Authorization header value.
pub fn authorization(
    secret_id: &str,
    secret_key: &[u8],
    timestamp: i64,
    service: &str,
    input: &CanonicalInput<'_>,
) -> String {
    format!(
        "{ALGORITHM} Credential={secret_id}/{}, SignedHeaders={}, Signature={}",
        credential_scope(timestamp, service),
        input.signed_headers(),
        signature(secret_key, timestamp, service, input)
    )
}

/// A parsed Authorization header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedAuthorization {
    /// The SecretId.
    pub secret_id: String,
    /// The scope's date.
    pub date: String,
    /// The scope's service.
    pub service: String,
    /// The signed header names, as declared.
    pub signed_headers: Vec<String>,
    /// The hex signature.
    pub signature: String,
}

/// Parse `TC3-HMAC-SHA256 Credential=ID/DATE/SERVICE/tc3_request, SignedHeaders=a;b, Signature=HEX`.
/// `None` when the header is malformed.
pub fn parse_authorization(value: &str) -> Option<ParsedAuthorization> {
    let rest = value.strip_prefix(ALGORITHM)?.strip_prefix(' ')?;
    let mut parts = rest.split(", ");
    let credential = parts.next()?.strip_prefix("Credential=")?;
    let signed = parts.next()?.strip_prefix("SignedHeaders=")?;
    let signature = parts.next()?.strip_prefix("Signature=")?;
    if parts.next().is_some() {
        return None;
    }
    let mut cred = credential.rsplitn(4, '/');
    if cred.next()? != "tc3_request" {
        return None;
    }
    let service = cred.next()?.to_owned();
    let date = cred.next()?.to_owned();
    let secret_id = cred.next()?.to_owned();
    if secret_id.is_empty()
        || signature.len() != 64
        || !signature.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return None;
    }
    let signed_headers: Vec<String> = signed.split(';').map(str::to_owned).collect();
    if signed_headers.iter().any(String::is_empty) {
        return None;
    }
    Some(ParsedAuthorization {
        secret_id,
        date,
        service,
        signed_headers,
        signature: signature.to_owned(),
    })
}

/// Compare two signatures in constant time (the length is not hidden).
pub fn signatures_equal(a: &str, b: &str) -> bool {
    // aws-lc's comparison, not a hand-rolled fold the optimizer may turn into an early exit.
    aws_lc_rs::constant_time::verify_slices_are_equal(a.as_bytes(), b.as_bytes()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = br#"{"Limit": 1, "Filters": [{"Values": ["\u672a\u547d\u540d"], "Name": "instance-name"}]}"#;
    const TS: i64 = 1_551_113_065;

    fn cvm(with_action: bool) -> Vec<(&'static str, &'static str)> {
        let mut h = vec![
            ("Content-Type", "application/json; charset=utf-8"),
            ("Host", "cvm.tencentcloudapi.com"),
        ];
        if with_action {
            h.push(("X-TC-Action", "DescribeInstances"));
        }
        h
    }

    fn input<'a>(headers: &'a [(&'a str, &'a str)], body: &'a [u8]) -> CanonicalInput<'a> {
        CanonicalInput {
            method: "POST",
            uri: "/",
            query: "",
            headers,
            payload: body,
        }
    }

    #[test]
    fn date_is_utc() {
        assert_eq!(utc_date(TS), "2019-02-25");
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(-1), "1969-12-31");
    }

    #[test]
    fn vector_a() {
        let headers = cvm(false);
        let i = input(&headers, BODY);
        assert_eq!(
            sha256_hex(BODY),
            "35e9c5b0e3ae67532d3c9f17ead6c90222632e5b1ff7f6e89887f1398934f064"
        );
        assert_eq!(
            sha256_hex(i.canonical_request().as_bytes()),
            "5ffe6a04c0664d6b969fab9a13bdab201d63ee709638e2749d62a09ca18d7031"
        );
        let sk = b"Gu5t9xGARNpq86cd98joQYCN3*******";
        assert_eq!(
            hex::encode(signing_key(sk, "2019-02-25", "cvm")),
            "8aa8ab5755582f576e94bcfe383b8e29325b0ca90c3590d569221c6a63a091ed"
        );
        assert_eq!(
            authorization("AKIDz8krbsJ5yKBZQpn74WFkmLPx3*******", sk, TS, "cvm", &i),
            "TC3-HMAC-SHA256 Credential=AKIDz8krbsJ5yKBZQpn74WFkmLPx3*******/2019-02-25/cvm/tc3_request, SignedHeaders=content-type;host, Signature=2230eefd229f582d8b1b891af7107b91597240707d778ab3738f756258d7652c"
        );
    }

    #[test]
    fn vector_b() {
        let headers = cvm(false);
        let sk = b"Gu5t9xGARNpq86cd98joQYCN3EXAMPLE";
        assert_eq!(
            hex::encode(signing_key(sk, "2019-02-25", "cvm")),
            "ac658d5dde49e9bfdd14e04e062f66b05d9f637d44b8a8d845327d4a77f666b1"
        );
        assert_eq!(
            signature(sk, TS, "cvm", &input(&headers, BODY)),
            "72e494ea809ad7a8c8f7a4507b9bddcbaa8e581f516e8da2f66e2c5a96525168"
        );
    }

    #[test]
    fn vector_c() {
        let headers = cvm(true);
        let i = input(&headers, BODY);
        assert_eq!(
            sha256_hex(i.canonical_request().as_bytes()),
            "7019a55be8395899b900fb5564e4200d984910f34794a27cb3fb7d10ff6a1e84"
        );
        let sk = b"********************************";
        assert_eq!(
            hex::encode(signing_key(sk, "2019-02-25", "cvm")),
            "b596b923aad85185e2d1f6659d2a062e0a86731226e021e61bfe06f7ed05f5af"
        );
        assert_eq!(
            authorization("AKID********************************", sk, TS, "cvm", &i),
            "TC3-HMAC-SHA256 Credential=AKID********************************/2019-02-25/cvm/tc3_request, SignedHeaders=content-type;host;x-tc-action, Signature=10b1a37a7301a02ca19a647ad722d5e43b4b3cff309d421d85b46093f6ab6c4f"
        );
    }

    #[test]
    fn vector_d() {
        let body = br#"{"KeyId": "23e80852-1e38-11e9-b129-5cb9019b4b01", "KeySpec": "AES_256", "EncryptionContext": "{\"table\": \"users\", \"column\": \"ssn\"}"}"#;
        assert_eq!(
            sha256_hex(body),
            "a5571f35b90a07d61e00df60d986c51ea8416ed87aa6e4f9239fadc82b89f5bc"
        );
        let headers = [
            ("Content-Type", "application/json"),
            ("Host", "kms.tencentcloudapi.com"),
        ];
        let i = input(&headers, body);
        assert_eq!(
            sha256_hex(i.canonical_request().as_bytes()),
            "5f8152c2b8d2b00de755e240413848bce7f3533089e855e9a812272276a1dd77"
        );
        let sk = b"exampleSecretKeyExampleSecretKey";
        assert_eq!(
            hex::encode(signing_key(sk, "2019-02-25", "kms")),
            "2dbe3936b64b92d2737ba8b26fdaf7c46979aa8b886602adb438c73fae862a0b"
        );
        let auth = authorization("AKIDEXAMPLEEXAMPLEEXAMPLE", sk, TS, "kms", &i);
        assert_eq!(
            auth,
            "TC3-HMAC-SHA256 Credential=AKIDEXAMPLEEXAMPLEEXAMPLE/2019-02-25/kms/tc3_request, SignedHeaders=content-type;host, Signature=59002820be5039dae93dd6059f3a0af4272063aa31e7a8781d1f4be9e44c36de"
        );
        let parsed = parse_authorization(&auth).unwrap();
        assert_eq!(parsed.secret_id, "AKIDEXAMPLEEXAMPLEEXAMPLE");
        assert_eq!(parsed.date, "2019-02-25");
        assert_eq!(parsed.service, "kms");
        assert_eq!(parsed.signed_headers, vec!["content-type", "host"]);
    }

    #[test]
    fn malformed_authorization_is_refused() {
        for bad in [
            "",
            "TC3-HMAC-SHA256",
            "HMAC Credential=a/2019-02-25/kms/tc3_request, SignedHeaders=host, Signature=00",
            "TC3-HMAC-SHA256 Credential=a/2019-02-25/kms/tc3, SignedHeaders=host, Signature=aa",
            "TC3-HMAC-SHA256 Credential=/2019-02-25/kms/tc3_request, SignedHeaders=host, Signature=59002820be5039dae93dd6059f3a0af4272063aa31e7a8781d1f4be9e44c36de",
            "TC3-HMAC-SHA256 Credential=a/2019-02-25/kms/tc3_request, SignedHeaders=, Signature=59002820be5039dae93dd6059f3a0af4272063aa31e7a8781d1f4be9e44c36de",
        ] {
            assert!(parse_authorization(bad).is_none(), "{bad}");
        }
        assert!(signatures_equal("abc", "abc"));
        assert!(!signatures_equal("abc", "abd"));
        assert!(!signatures_equal("abc", "ab"));
    }
}
