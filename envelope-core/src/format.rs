//! The value format, blob v1. `docs/FORMAT.md` is the normative text; this module mirrors it.
//!
//! ```text
//! offset  size  field
//! 0       1     version            0x01
//! 1       1     algorithm          0x01 = AES-256-GCM, 96-bit nonce, 128-bit tag
//! 2       16    key id             the key table's primary key
//! 18      12    nonce              random, from a CSPRNG
//! 30      1..4  ciphertext length  L, unsigned LEB128, minimal, L < 2^28
//! 30+n    L     ciphertext
//! 30+n+L  16    tag
//! ```
//!
//! The AAD is the first 30 bytes followed by the context label's bytes. Parsing reads the
//! version first and rejects, before any cryptography, everything that is not exactly one
//! well-formed value.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::error::FormatError;
use crate::keys::{KeyId, Label};

/// Format version 1.
pub const VERSION_1: u8 = 0x01;
/// Algorithm id 1: AES-256-GCM with a 96-bit nonce and a 128-bit tag.
pub const ALG_AES_256_GCM: u8 = 0x01;
/// Offset of the key id in every version.
pub const KEY_ID_OFFSET: usize = 2;
/// Length of the fixed header (version, algorithm, key id, nonce).
pub const HEADER_LEN: usize = 30;
/// Nonce length.
pub const NONCE_LEN: usize = 12;
/// Tag length.
pub const TAG_LEN: usize = 16;
/// The largest plaintext (and ciphertext) the format carries: 2^28 - 1 bytes.
pub const MAX_PLAINTEXT_LEN: usize = (1 << 28) - 1;
/// Prefix of the text form.
pub const TEXT_PREFIX: &str = "ev1:";

/// The highest byte value reserved for a version number; a first byte of 0x00 or above this is
/// not an envelope value at all.
const MAX_VERSION_BYTE: u8 = 0x1f;
const NONCE_OFFSET: usize = KEY_ID_OFFSET + KeyId::LEN;

/// A parsed v1 value: borrowed views into the bytes.
#[derive(Clone, Copy)]
pub struct Envelope<'a> {
    header: &'a [u8; HEADER_LEN],
    ciphertext: &'a [u8],
    tag: &'a [u8; TAG_LEN],
}

impl<'a> Envelope<'a> {
    /// The key id the value was sealed under.
    pub fn key_id(&self) -> KeyId {
        let mut id = [0u8; KeyId::LEN];
        id.copy_from_slice(&self.header[KEY_ID_OFFSET..NONCE_OFFSET]);
        KeyId::from_bytes(id)
    }

    /// The format version (always 1 here).
    pub fn version(&self) -> u8 {
        self.header[0]
    }

    /// The algorithm id.
    pub fn algorithm(&self) -> u8 {
        self.header[1]
    }

    /// The ciphertext's length, which equals the plaintext's.
    pub fn ciphertext_len(&self) -> usize {
        self.ciphertext.len()
    }

    pub(crate) fn header(&self) -> &'a [u8; HEADER_LEN] {
        self.header
    }

    pub(crate) fn nonce(&self) -> &'a [u8] {
        &self.header[NONCE_OFFSET..HEADER_LEN]
    }

    pub(crate) fn ciphertext(&self) -> &'a [u8] {
        self.ciphertext
    }

    pub(crate) fn tag(&self) -> &'a [u8; TAG_LEN] {
        self.tag
    }
}

impl std::fmt::Debug for Envelope<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("version", &self.version())
            .field("key_id", &self.key_id())
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

/// Parse a binary value.
///
/// # Errors
/// In the order FORMAT.md gives: [`FormatError::NotEnvelope`] (empty, or the first byte is not a
/// version number), [`FormatError::UnsupportedVersion`], [`FormatError::Truncated`] (header),
/// [`FormatError::UnknownAlgorithm`], [`FormatError::MalformedLength`],
/// [`FormatError::Truncated`] (body), [`FormatError::TrailingBytes`].
pub fn parse(bytes: &[u8]) -> Result<Envelope<'_>, FormatError> {
    let version = *bytes.first().ok_or(FormatError::NotEnvelope)?;
    if version == 0 || version > MAX_VERSION_BYTE {
        if is_postgres_hex_text(bytes) {
            return Err(FormatError::HexText);
        }
        return Err(FormatError::NotEnvelope);
    }
    if version != VERSION_1 {
        return Err(FormatError::UnsupportedVersion(version));
    }
    parse_v1(bytes)
}

/// Whether `bytes` look like PostgreSQL's text output of a `bytea` value that holds an envelope
/// value: `\x` and an even number of hex digits, the first byte a version byte. This is what a
/// `TEXT` or `VARCHAR` column holds after a binary value was bound to it (the server casts the
/// `bytea` parameter to its hex text).
fn is_postgres_hex_text(bytes: &[u8]) -> bool {
    let Some(digits) = bytes.strip_prefix(b"\\x") else {
        return false;
    };
    if digits.len() < 2 || digits.len() % 2 != 0 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return false;
    }
    let first = hex::decode(&digits[..2])
        .ok()
        .and_then(|b| b.first().copied());
    matches!(first, Some(v) if v != 0 && v <= MAX_VERSION_BYTE)
}

fn parse_v1(bytes: &[u8]) -> Result<Envelope<'_>, FormatError> {
    let min = HEADER_LEN + 1 + TAG_LEN;
    let (header, rest) = bytes
        .split_first_chunk::<HEADER_LEN>()
        .ok_or(FormatError::Truncated {
            len: bytes.len(),
            needed: min,
        })?;
    if header[1] != ALG_AES_256_GCM {
        return Err(FormatError::UnknownAlgorithm(header[1]));
    }
    let (ct_len, n) = read_length(rest).map_err(|e| match e {
        LengthError::Incomplete => FormatError::Truncated {
            len: bytes.len(),
            needed: min,
        },
        LengthError::Malformed => FormatError::MalformedLength,
    })?;
    let body = &rest[n..];
    let needed_body = ct_len + TAG_LEN;
    let needed = HEADER_LEN + n + needed_body;
    if body.len() < needed_body {
        return Err(FormatError::Truncated {
            len: bytes.len(),
            needed,
        });
    }
    if body.len() > needed_body {
        return Err(FormatError::TrailingBytes {
            extra: body.len() - needed_body,
        });
    }
    let (ciphertext, tag) = body.split_at(ct_len);
    let tag: &[u8; TAG_LEN] = tag.try_into().map_err(|_| FormatError::Truncated {
        len: bytes.len(),
        needed,
    })?;
    Ok(Envelope {
        header,
        ciphertext,
        tag,
    })
}

/// Read the key id of a value without decrypting it (for example to prefetch its key).
///
/// # Errors
/// The same as [`parse`].
pub fn peek_key_id(bytes: &[u8]) -> Result<KeyId, FormatError> {
    parse(bytes).map(|e| e.key_id())
}

/// Total length of a sealed value carrying `plaintext_len` bytes.
pub fn sealed_len(plaintext_len: usize) -> usize {
    HEADER_LEN + length_len(plaintext_len) + plaintext_len + TAG_LEN
}

enum LengthError {
    Incomplete,
    Malformed,
}

/// Unsigned LEB128, at most 4 bytes (values below 2^28), minimal encoding only.
fn read_length(bytes: &[u8]) -> Result<(usize, usize), LengthError> {
    let mut value: usize = 0;
    for i in 0..4 {
        let b = *bytes.get(i).ok_or(LengthError::Incomplete)?;
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            // A zero final byte after the first is a non-minimal encoding.
            if i > 0 && b == 0 {
                return Err(LengthError::Malformed);
            }
            return Ok((value, i + 1));
        }
    }
    Err(LengthError::Malformed)
}

pub(crate) fn length_len(len: usize) -> usize {
    match len {
        0..0x80 => 1,
        0x80..0x4000 => 2,
        0x4000..0x20_0000 => 3,
        _ => 4,
    }
}

pub(crate) fn write_length(out: &mut Vec<u8>, mut len: usize) {
    debug_assert!(len <= MAX_PLAINTEXT_LEN);
    loop {
        // Truncation to the low 7 bits is the encoding.
        let low = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(low);
            return;
        }
        out.push(low | 0x80);
    }
}

/// Write the 30-byte header.
pub(crate) fn write_header(out: &mut Vec<u8>, key_id: &KeyId, nonce: &[u8; NONCE_LEN]) {
    out.push(VERSION_1);
    out.push(ALG_AES_256_GCM);
    out.extend_from_slice(key_id.as_bytes());
    out.extend_from_slice(nonce);
}

/// Call `f` with the AAD: the 30 header bytes followed by the label's bytes. The AAD is built
/// on the stack, in place (labels of up to 34 bytes fit a 64-byte buffer; longer ones, up to
/// 255, a 285-byte one), and never moved.
pub(crate) fn with_aad<R>(header: &[u8], label: &Label, f: impl FnOnce(&[u8]) -> R) -> R {
    #[inline(always)]
    fn build<'a>(buf: &'a mut [u8], header: &[u8], label: &[u8]) -> &'a [u8] {
        let len = HEADER_LEN + label.len();
        buf[..HEADER_LEN].copy_from_slice(&header[..HEADER_LEN]);
        buf[HEADER_LEN..len].copy_from_slice(label);
        &buf[..len]
    }
    let label = label.as_str().as_bytes();
    if HEADER_LEN + label.len() <= 64 {
        let mut buf = [0u8; 64];
        f(build(&mut buf, header, label))
    } else {
        let mut buf = [0u8; HEADER_LEN + 255];
        f(build(&mut buf, header, label))
    }
}

/// Encode a binary value in the text form: `ev1:` followed by padded standard base64.
pub fn to_text(blob: &[u8]) -> String {
    let mut s = String::with_capacity(TEXT_PREFIX.len() + blob.len().div_ceil(3) * 4);
    s.push_str(TEXT_PREFIX);
    STANDARD.encode_string(blob, &mut s);
    s
}

/// Decode a text-form value to its binary bytes (not yet parsed).
///
/// # Errors
/// [`FormatError::NotEnvelope`] without the prefix; [`FormatError::MalformedText`] when the rest
/// is not canonical padded standard base64.
pub fn from_text(text: &str) -> Result<Vec<u8>, FormatError> {
    let body = text
        .strip_prefix(TEXT_PREFIX)
        .ok_or(FormatError::NotEnvelope)?;
    STANDARD
        .decode(body)
        .map_err(|_| FormatError::MalformedText)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ct_len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        write_header(&mut out, &KeyId::from_bytes([9; 16]), &[1; 12]);
        write_length(&mut out, ct_len);
        out.extend(std::iter::repeat_n(0x55, ct_len));
        out.extend_from_slice(&[0xaa; TAG_LEN]);
        out
    }

    #[test]
    fn parses_what_it_writes() {
        for len in [0, 1, 127, 128, 16383, 16384, 70_000] {
            let blob = sample(len);
            assert_eq!(blob.len(), sealed_len(len));
            let env = parse(&blob).unwrap();
            assert_eq!(env.key_id(), KeyId::from_bytes([9; 16]));
            assert_eq!(env.ciphertext().len(), len);
            assert_eq!(env.nonce(), &[1; 12]);
        }
    }

    #[test]
    fn overhead_is_at_most_48_bytes_below_16_kib() {
        assert_eq!(sealed_len(0), 47);
        assert_eq!(sealed_len(64) - 64, 47);
        assert_eq!(sealed_len(16383) - 16383, 48);
        assert_eq!(sealed_len(1 << 20) - (1 << 20), 49);
    }

    #[test]
    fn rejects_in_order() {
        assert_eq!(parse(&[]).unwrap_err(), FormatError::NotEnvelope);
        assert_eq!(parse(b"hello").unwrap_err(), FormatError::NotEnvelope);
        assert_eq!(parse(&[0]).unwrap_err(), FormatError::NotEnvelope);
        // PostgreSQL's hex text of a bytea envelope value, as a TEXT column holds it.
        let blob = [0x01, 0x01, 0xab, 0xcd];
        let hex_text = format!("\\x{}", hex::encode(blob));
        assert_eq!(
            parse(hex_text.as_bytes()).unwrap_err(),
            FormatError::HexText
        );
        // Not hex text: odd digits, a non-hex digit, a byte that is no version, no digits.
        for text in [&b"\\x010"[..], b"\\x01zz", b"\\x2001", b"\\x"] {
            assert_eq!(
                parse(text).unwrap_err(),
                FormatError::NotEnvelope,
                "{text:?}"
            );
        }
        assert_eq!(
            parse(&[2, 1, 0]).unwrap_err(),
            FormatError::UnsupportedVersion(2)
        );
        let blob = sample(4);
        assert!(matches!(
            parse(&blob[..10]).unwrap_err(),
            FormatError::Truncated { .. }
        ));
        assert!(matches!(
            parse(&blob[..blob.len() - 1]).unwrap_err(),
            FormatError::Truncated { .. }
        ));
        let mut long = blob.clone();
        long.push(0);
        assert_eq!(
            parse(&long).unwrap_err(),
            FormatError::TrailingBytes { extra: 1 }
        );
        let mut alg = blob.clone();
        alg[1] = 7;
        assert_eq!(parse(&alg).unwrap_err(), FormatError::UnknownAlgorithm(7));
    }

    #[test]
    fn length_must_be_minimal_and_bounded() {
        let mut blob = sample(0);
        // Replace the one-byte length 0x00 with the non-minimal 0x80 0x00.
        blob.splice(HEADER_LEN..HEADER_LEN + 1, [0x80, 0x00]);
        assert_eq!(parse(&blob).unwrap_err(), FormatError::MalformedLength);
        let mut blob = sample(0);
        blob.splice(HEADER_LEN..HEADER_LEN + 1, [0xff, 0xff, 0xff, 0xff, 0x01]);
        assert_eq!(parse(&blob).unwrap_err(), FormatError::MalformedLength);
    }

    #[test]
    fn text_form_round_trips_and_rejects() {
        let blob = sample(3);
        let text = to_text(&blob);
        assert!(text.starts_with("ev1:"));
        assert_eq!(from_text(&text).unwrap(), blob);
        assert_eq!(from_text("hello").unwrap_err(), FormatError::NotEnvelope);
        assert_eq!(
            from_text("ev1:@@@").unwrap_err(),
            FormatError::MalformedText
        );
        assert_eq!(from_text("ev1:AQ").unwrap_err(), FormatError::MalformedText);
    }
}
