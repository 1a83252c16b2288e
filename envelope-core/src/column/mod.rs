//! The column types, [`Encrypted`], [`EncryptedText`] and [`BlindIndex`], and what they build
//! on: the column markers, the conversion of field types to plaintext bytes, and sealing and
//! opening through the keyring that [`crate::current`] resolves.
//!
//! The column types are defined here once for every ORM. envelope-sqlx and envelope-diesel
//! re-export them and turn on their ORM impls: sqlx's `Type`, `Encode` and `Decode` (this
//! crate's feature `sqlx`), diesel's `AsExpression`, `FromSqlRow`, `FromSql` (feature `diesel`)
//! and `ToSql` (features `diesel-postgres`, `diesel-mysql`, `diesel-sqlite`). Applications use
//! them through those crates.
//!
//! Declare a column once, then use it as the type parameter of `Encrypted<T, C>`:
//!
//! ```
//! envelope_core::column!(
//!     /// The customers table's national id.
//!     pub CustomerNationalId = "customers.national_id"
//! );
//! use envelope_core::column::Column;
//! assert_eq!(CustomerNationalId::LABEL, "customers.national_id");
//! ```

use std::borrow::Cow;

use crate::blind::{BlindIndexSpec, Normalizer};
use crate::error::{Error, Result};
use crate::format;
use crate::keys::{Label, Scope};

#[cfg(feature = "diesel")]
mod diesel_ext;
#[cfg(feature = "sqlx")]
mod sqlx_ext;
mod types;

pub use types::{BlindIndex, Encrypted, EncryptedText};

/// A column an encrypted value belongs to. Its label is bound into every value, so a value
/// copied into another column does not open there.
pub trait Column: Send + Sync + 'static {
    /// The context label, normally `table.column`: 1 to 255 visible ASCII bytes.
    const LABEL: &'static str;
    /// The key scope writes use; `None` uses the keyring's default scope.
    const SCOPE: Option<&'static str> = None;
}

/// A blind-index column: which label's index key, which normalizer, how many bytes.
pub trait IndexColumn: Send + Sync + 'static {
    /// The label of the indexed value (one index key per label), e.g. `customers.email`.
    const LABEL: &'static str;
    /// How values are normalized before hashing.
    const NORMALIZER: Normalizer = Normalizer::Exact;
    /// Output length in bytes (4 to 32).
    const LEN: usize = BlindIndexSpec::DEFAULT_LEN;
}

/// Declare a column marker: `column!(pub UsersSsn = "users.ssn");`.
///
/// The label is checked when the program compiles:
///
/// ```compile_fail
/// envelope_core::column!(pub UsersSsn = "users ssn"); // a space: does not compile
/// ```
#[macro_export]
macro_rules! column {
    ($(#[$meta:meta])* $vis:vis $name:ident = $label:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        $vis struct $name;
        impl $crate::column::Column for $name {
            const LABEL: &'static str = $label;
        }
        const _: () = ::core::assert!(
            $crate::__private::label_is_valid($label),
            "a column label is 1 to 255 bytes of visible ASCII with no spaces, such as \"users.ssn\""
        );
    };
}

/// Declare a blind-index marker:
/// `blind_index!(pub CustomerEmailIndex = "customers.email", CaseFolded);`.
///
/// The label is checked when the program compiles:
///
/// ```compile_fail
/// envelope_core::blind_index!(pub EmailIndex = "", CaseFolded); // empty: does not compile
/// ```
#[macro_export]
macro_rules! blind_index {
    ($(#[$meta:meta])* $vis:vis $name:ident = $label:literal, $normalizer:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        $vis struct $name;
        impl $crate::column::IndexColumn for $name {
            const LABEL: &'static str = $label;
            const NORMALIZER: $crate::Normalizer = $crate::Normalizer::$normalizer;
        }
        const _: () = ::core::assert!(
            $crate::__private::label_is_valid($label),
            "a blind index label is 1 to 255 bytes of visible ASCII with no spaces, such as \"users.email\""
        );
    };
}

/// A field type that can be encrypted: how it becomes bytes and comes back.
///
/// Integers are stored big-endian at their full width, floats as their IEEE 754 bits,
/// `bool` as one byte, UUIDs as their 16 bytes, dates and times as ISO 8601 text, `AsJson` as
/// compact JSON (docs/FORMAT.md section 6.1 has the exact bytes).
///
/// # A type of your own
///
/// Implement it for a type your crate defines. For a type from another crate (the orphan rule
/// forbids implementing a foreign trait for a foreign type), wrap it in a newtype, or store it
/// as JSON with `AsJson<T>` (feature `json`) if it implements serde's traits:
///
/// ```
/// use std::borrow::Cow;
/// use envelope_core::column::Plaintext;
///
/// /// Cents, from a crate that knows nothing of envelope.
/// #[derive(Debug, PartialEq)]
/// struct Amount(i64);
///
/// impl Plaintext for Amount {
///     fn to_plaintext(&self) -> envelope_core::Result<Cow<'_, [u8]>> {
///         self.0.to_plaintext() // reuse an encoding the spec defines
///     }
///     fn from_plaintext(bytes: Vec<u8>) -> envelope_core::Result<Self> {
///         i64::from_plaintext(bytes).map(Amount)
///     }
/// }
///
/// let bytes = Amount(1999).to_plaintext()?.into_owned();
/// assert_eq!(Amount::from_plaintext(bytes)?, Amount(1999));
/// // A field then reads `Encrypted<Amount, OrderTotal>` in envelope-sqlx or envelope-diesel.
/// # Ok::<(), envelope_core::Error>(())
/// ```
///
/// An encoding of your own is a contract with every reader of the column, the `envelope` CLI
/// included: keep it stable, and prefer one the spec already defines.
pub trait Plaintext: Sized {
    /// The bytes to seal.
    ///
    /// # Errors
    /// [`Error::PlaintextEncode`] when the value cannot be encoded (an `AsJson` value whose
    /// `Serialize` fails): the write fails, nothing is sealed.
    fn to_plaintext(&self) -> Result<Cow<'_, [u8]>>;
    /// Rebuild the value from opened bytes.
    ///
    /// # Errors
    /// [`Error::PlaintextType`] when the bytes are not a value of this type.
    fn from_plaintext(bytes: Vec<u8>) -> Result<Self>;
}

fn type_error(expected: &'static str, got: impl Into<String>) -> Error {
    Error::PlaintextType {
        expected,
        detail: got.into(),
    }
}

impl Plaintext for String {
    fn to_plaintext(&self) -> Result<Cow<'_, [u8]>> {
        Ok(Cow::Borrowed(self.as_bytes()))
    }
    fn from_plaintext(bytes: Vec<u8>) -> Result<Self> {
        String::from_utf8(bytes).map_err(|_| type_error("String", "the bytes are not UTF-8"))
    }
}

impl Plaintext for Vec<u8> {
    fn to_plaintext(&self) -> Result<Cow<'_, [u8]>> {
        Ok(Cow::Borrowed(self))
    }
    fn from_plaintext(bytes: Vec<u8>) -> Result<Self> {
        Ok(bytes)
    }
}

/// Numbers as their big-endian bytes at full width: two's complement for the signed integers,
/// the IEEE 754 bits for the floats (every value round-trips exactly, `-0.0` and NaN payloads
/// included).
macro_rules! be_bytes_plaintext {
    ($($t:ty),*) => {$(
        impl Plaintext for $t {
            fn to_plaintext(&self) -> Result<Cow<'_, [u8]>> {
                Ok(Cow::Owned(self.to_be_bytes().to_vec()))
            }
            fn from_plaintext(bytes: Vec<u8>) -> Result<Self> {
                let arr = bytes.as_slice().try_into().map_err(|_| {
                    type_error(stringify!($t), format!("{} bytes", bytes.len()))
                })?;
                Ok(<$t>::from_be_bytes(arr))
            }
        }
    )*};
}
be_bytes_plaintext!(i16, i32, i64, u16, u32, u64, f32, f64);

impl Plaintext for bool {
    fn to_plaintext(&self) -> Result<Cow<'_, [u8]>> {
        Ok(Cow::Borrowed(if *self { &[1] } else { &[0] }))
    }
    fn from_plaintext(bytes: Vec<u8>) -> Result<Self> {
        match bytes.as_slice() {
            [0] => Ok(false),
            [1] => Ok(true),
            _ => Err(type_error("bool", "not a 0 or 1 byte")),
        }
    }
}

#[cfg(feature = "uuid")]
impl Plaintext for uuid::Uuid {
    fn to_plaintext(&self) -> Result<Cow<'_, [u8]>> {
        Ok(Cow::Borrowed(self.as_bytes()))
    }
    fn from_plaintext(bytes: Vec<u8>) -> Result<Self> {
        uuid::Uuid::from_slice(&bytes)
            .map_err(|_| type_error("Uuid", format!("{} bytes", bytes.len())))
    }
}

#[cfg(feature = "chrono")]
impl Plaintext for chrono::NaiveDate {
    fn to_plaintext(&self) -> Result<Cow<'_, [u8]>> {
        Ok(Cow::Owned(self.format("%Y-%m-%d").to_string().into_bytes()))
    }
    fn from_plaintext(bytes: Vec<u8>) -> Result<Self> {
        let s = std::str::from_utf8(&bytes).map_err(|_| type_error("NaiveDate", "not UTF-8"))?;
        chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map_err(|e| type_error("NaiveDate", e.to_string()))
    }
}

/// A date and time without a time zone, as `YYYY-MM-DDTHH:MM:SS[.fraction]` (docs/FORMAT.md
/// section 6.1, `datetime`).
#[cfg(feature = "chrono")]
impl Plaintext for chrono::NaiveDateTime {
    fn to_plaintext(&self) -> Result<Cow<'_, [u8]>> {
        Ok(Cow::Owned(
            self.format(NAIVE_DATE_TIME).to_string().into_bytes(),
        ))
    }
    fn from_plaintext(bytes: Vec<u8>) -> Result<Self> {
        let s =
            std::str::from_utf8(&bytes).map_err(|_| type_error("NaiveDateTime", "not UTF-8"))?;
        chrono::NaiveDateTime::parse_from_str(s, NAIVE_DATE_TIME)
            .map_err(|e| type_error("NaiveDateTime", e.to_string()))
    }
}

/// `%.f` writes no fraction for whole seconds, else 3, 6 or 9 digits, as `SecondsFormat::AutoSi`
/// does for [`chrono::DateTime`].
#[cfg(feature = "chrono")]
const NAIVE_DATE_TIME: &str = "%Y-%m-%dT%H:%M:%S%.f";

#[cfg(feature = "chrono")]
impl Plaintext for chrono::DateTime<chrono::Utc> {
    fn to_plaintext(&self) -> Result<Cow<'_, [u8]>> {
        Ok(Cow::Owned(
            self.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
                .into_bytes(),
        ))
    }
    fn from_plaintext(bytes: Vec<u8>) -> Result<Self> {
        let s = std::str::from_utf8(&bytes).map_err(|_| type_error("DateTime", "not UTF-8"))?;
        chrono::DateTime::parse_from_rfc3339(s)
            .map(|d| d.with_timezone(&chrono::Utc))
            .map_err(|e| type_error("DateTime", e.to_string()))
    }
}

#[cfg(feature = "json")]
pub use json::AsJson;

#[cfg(feature = "json")]
mod json {
    use std::borrow::Cow;

    use super::{Plaintext, type_error};
    use crate::error::{Error, Result};

    /// Any serde type, stored as JSON inside the envelope: `Encrypted<AsJson<Notes>, C>`
    /// (cargo feature `json`).
    #[derive(Clone, Default, PartialEq, Eq)]
    pub struct AsJson<T>(pub T);

    impl<T> std::fmt::Debug for AsJson<T> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("AsJson(<redacted>)")
        }
    }

    impl<T> std::ops::Deref for AsJson<T> {
        type Target = T;
        fn deref(&self) -> &T {
            &self.0
        }
    }

    impl<T: serde::Serialize + serde::de::DeserializeOwned> Plaintext for AsJson<T> {
        fn to_plaintext(&self) -> Result<Cow<'_, [u8]>> {
            // serde_json's messages can quote the data (a custom `Serialize` may say anything):
            // report only the kind of failure.
            serde_json::to_vec(&self.0)
                .map(Cow::Owned)
                .map_err(|e| Error::PlaintextEncode {
                    ty: "AsJson",
                    detail: format!(
                        "serializing to JSON failed ({} error; for example a map whose keys are not strings)",
                        json_category(&e)
                    ),
                })
        }
        fn from_plaintext(bytes: Vec<u8>) -> Result<Self> {
            // Never `e.to_string()`: serde_json quotes the offending (decrypted) value in it.
            serde_json::from_slice(&bytes).map(AsJson).map_err(|e| {
                type_error(
                    "AsJson",
                    format!(
                        "{} error at line {} column {} of the decrypted JSON (the field's type does not match what was stored)",
                        json_category(&e),
                        e.line(),
                        e.column()
                    ),
                )
            })
        }
    }

    fn json_category(e: &serde_json::Error) -> &'static str {
        match e.classify() {
            serde_json::error::Category::Io => "I/O",
            serde_json::error::Category::Syntax => "syntax",
            serde_json::error::Category::Data => "data type",
            serde_json::error::Category::Eof => "unexpected end of input",
        }
    }
}

fn label_of<C: Column>() -> Result<Label> {
    Label::new(C::LABEL)
}

fn scope_of<C: Column>(keyring: &crate::Keyring) -> Result<Scope> {
    match C::SCOPE {
        Some(s) => Scope::new(s),
        None => Ok(keyring.default_scope().clone()),
    }
}

/// Seal `value` for column `C` with the current keyring (see [`crate::current`]); for the
/// synchronous encoders of the column types.
///
/// # Errors
/// [`Misuse::NoKeyring`](crate::Misuse::NoKeyring), or any error of [`crate::Blocking::encrypt_scoped`].
pub fn seal<T: Plaintext, C: Column>(value: &T) -> Result<Vec<u8>> {
    let keyring = crate::current()?;
    let scope = scope_of::<C>(&keyring)?;
    keyring
        .blocking()
        .encrypt_scoped(&scope, &label_of::<C>()?, &value.to_plaintext()?)
}

/// [`seal`] to the text form.
///
/// # Errors
/// As [`seal`].
pub fn seal_text<T: Plaintext, C: Column>(value: &T) -> Result<String> {
    seal::<T, C>(value).map(|b| format::to_text(&b))
}

/// Open a stored value of column `C`. A column with a [`Column::SCOPE`] opens only values
/// sealed under that scope's keys ([`Error::ScopeMismatch`] otherwise); a scoped keyring
/// requires its own scope.
///
/// While the keyring has the column's migration window open
/// ([`crate::Keyring::open_migration_window`]), a stored value that the format parser rejects,
/// whatever the reason, is legacy plaintext and is returned as it is; a value that parses as an
/// envelope must open, and fails with its error if it does not. Outside the window every value
/// must be an envelope (fail closed). `docs/FORMAT.md` states the rule.
///
/// # Errors
/// [`Misuse::NoKeyring`](crate::Misuse::NoKeyring), any error of [`crate::Blocking::decrypt`], or
/// [`Error::PlaintextType`].
pub fn open<T: Plaintext, C: Column>(stored: &[u8]) -> Result<T> {
    let keyring = crate::current()?;
    let label = label_of::<C>()?;
    let opened = match C::SCOPE {
        Some(scope) => keyring
            .blocking()
            .decrypt_scoped(&Scope::new(scope)?, &label, stored),
        None => keyring.blocking().decrypt(&label, stored),
    };
    match opened {
        Ok(bytes) => T::from_plaintext(bytes),
        Err(Error::Format(_)) if keyring.migration_window_open(&label) => {
            T::from_plaintext(stored.to_vec())
        }
        Err(e) => Err(e),
    }
}

/// Open a text-form stored value of column `C`; scopes and legacy text as in [`open`].
///
/// # Errors
/// As [`open`], plus [`crate::FormatError::MalformedText`].
pub fn open_text<T: Plaintext, C: Column>(stored: &str) -> Result<T> {
    let keyring = crate::current()?;
    let label = label_of::<C>()?;
    let opened = format::from_text(stored)
        .map_err(Error::from)
        .and_then(|blob| match C::SCOPE {
            Some(scope) => keyring
                .blocking()
                .decrypt_scoped(&Scope::new(scope)?, &label, &blob),
            None => keyring.blocking().decrypt(&label, &blob),
        });
    match opened {
        Ok(bytes) => T::from_plaintext(bytes),
        Err(Error::Format(_)) if keyring.migration_window_open(&label) => {
            T::from_plaintext(stored.as_bytes().to_vec())
        }
        Err(e) => Err(e),
    }
}

/// The blind index of `value` for index column `I`, with the current keyring.
///
/// # Errors
/// [`Misuse::NoKeyring`](crate::Misuse::NoKeyring), or any error of [`crate::Blocking::blind_index`].
pub fn blind_index<I: IndexColumn>(value: &[u8]) -> Result<Vec<u8>> {
    let keyring = crate::current()?;
    keyring.blocking().blind_index(&index_spec::<I>()?, value)
}

/// The lookup probes of `value` for index column `I` (one per index key), with the current
/// keyring.
///
/// # Errors
/// [`Misuse::NoKeyring`](crate::Misuse::NoKeyring), or any error of [`crate::Blocking::blind_index_probes`].
pub fn blind_index_probes<I: IndexColumn>(value: &[u8]) -> Result<Vec<Vec<u8>>> {
    let keyring = crate::current()?;
    keyring
        .blocking()
        .blind_index_probes(&index_spec::<I>()?, value)
}

fn index_spec<I: IndexColumn>() -> Result<BlindIndexSpec> {
    BlindIndexSpec::new(Label::new(I::LABEL)?, I::NORMALIZER).with_len(I::LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round<T: Plaintext + PartialEq + std::fmt::Debug>(v: T) {
        let bytes = v.to_plaintext().unwrap().into_owned();
        assert_eq!(T::from_plaintext(bytes).unwrap(), v);
    }

    #[test]
    fn plaintext_round_trips() {
        round(String::from("Zoë"));
        round(vec![0u8, 255]);
        round(-5i16);
        round(i32::MIN);
        round(i64::MAX);
        round(true);
        round(false);
        round(u16::MAX);
        round(u32::MAX);
        round(u64::MAX);
        round(f32::MIN_POSITIVE);
        round(-0.0f64);
        round(f64::INFINITY);
        assert!(String::from_plaintext(vec![0xff]).is_err());
        assert!(i32::from_plaintext(vec![1, 2]).is_err());
        assert!(u64::from_plaintext(vec![0; 4]).is_err());
        assert!(f32::from_plaintext(vec![0; 8]).is_err());
        assert!(bool::from_plaintext(vec![2]).is_err());
    }

    /// The encodings of docs/FORMAT.md section 6.1, byte for byte.
    #[test]
    fn numeric_encodings_are_the_spec() {
        assert_eq!(&*0x0102u16.to_plaintext().unwrap(), &[1, 2]);
        assert_eq!(&*u32::MAX.to_plaintext().unwrap(), &[0xff; 4]);
        assert_eq!(&*1.5f32.to_plaintext().unwrap(), &[0x3f, 0xc0, 0, 0]);
        assert_eq!(
            &*(-2.0f64).to_plaintext().unwrap(),
            &[0xc0, 0, 0, 0, 0, 0, 0, 0]
        );
        let nan = f64::from_bits(0x7ff8_0000_0000_0001);
        let back = f64::from_plaintext(nan.to_plaintext().unwrap().into_owned()).unwrap();
        assert_eq!(back.to_bits(), nan.to_bits());
    }

    #[cfg(feature = "chrono")]
    #[test]
    fn naive_date_times_are_the_spec() {
        let at =
            |s: &str| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").unwrap();
        for (value, text) in [
            (at("2024-02-29 20:30:00"), "2024-02-29T20:30:00"),
            (at("2024-02-29 20:30:00.25"), "2024-02-29T20:30:00.250"),
            (
                at("0987-06-05 01:02:03.000004"),
                "0987-06-05T01:02:03.000004",
            ),
            (
                at("2024-01-01 00:00:00.123456789"),
                "2024-01-01T00:00:00.123456789",
            ),
        ] {
            assert_eq!(&*value.to_plaintext().unwrap(), text.as_bytes());
            round(value);
        }
        for bad in [
            "2024-02-29 20:30:00",
            "2024-02-29T20:30:00Z",
            "2023-02-29T00:00:00",
        ] {
            assert!(
                chrono::NaiveDateTime::from_plaintext(bad.as_bytes().to_vec()).is_err(),
                "{bad}"
            );
        }
    }

    #[cfg(feature = "json")]
    #[test]
    fn json_fields_round_trip_and_never_show_their_value() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Notes {
            text: String,
        }
        let j = AsJson(Notes { text: "x".into() });
        assert_eq!(format!("{j:?}"), "AsJson(<redacted>)");
        let back = AsJson::<Notes>::from_plaintext(j.to_plaintext().unwrap().into_owned()).unwrap();
        assert_eq!(back.0, j.0);
    }

    crate::column!(Ssn = "users.ssn");

    #[test]
    fn column_macro_declares_a_marker() {
        assert_eq!(Ssn::LABEL, "users.ssn");
        assert_eq!(Ssn::SCOPE, None);
    }
}
