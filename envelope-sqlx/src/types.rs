//! The column types: `Encrypted<T, C>`, `EncryptedText<T, C>` and `BlindIndex<I>`.

use std::marker::PhantomData;

use envelope_core::column::{self, Column, IndexColumn, Plaintext};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::{Database, Decode, Encode, Type};

/// A field stored encrypted in a binary column (`BYTEA` on PostgreSQL, `BLOB`, `MEDIUMBLOB` or
/// `VARBINARY(n)` on MySQL/MariaDB, `BLOB` on SQLite): sealed when bound, opened when decoded,
/// under column marker `C`. Use `Option<Encrypted<T, C>>` for a nullable column: SQL `NULL`
/// stays `NULL`.
///
/// PostgreSQL accepts it bound into a `TEXT` column (the server stores the bytes' hex text);
/// the read then fails, with sqlx's type mismatch (`BYTEA` against `TEXT`), or, where that
/// check does not run (`try_get_unchecked`), with
/// [`FormatError::HexText`](envelope_core::FormatError::HexText), whose message names the fix.
/// Use [`EncryptedText`] for a text column.
///
/// With `query!`/`query_as!`, name the type in the column alias (sqlx's output type override;
/// MySQL writes the alias in backticks), since the macros see only the column's SQL type; a bind
/// parameter on PostgreSQL takes `as _`, which skips the macro's type check:
///
/// ```ignore
/// let row = sqlx::query_as!(
///     Customer,
///     r#"SELECT name, email AS "email: Encrypted<String, CustomerEmail>" FROM customers WHERE id = $1"#,
///     id
/// )
/// .fetch_one(&pool)
/// .await?;
/// sqlx::query!(
///     "INSERT INTO customers (name, email) VALUES ($1, $2)",
///     name,
///     Encrypted::<String, CustomerEmail>::new(email) as _
/// )
/// .execute(&pool)
/// .await?;
/// ```
///
/// It derefs to `T`. Its `Debug` never shows the value.
pub struct Encrypted<T, C> {
    value: T,
    column: PhantomData<fn() -> C>,
}

/// A field stored encrypted in a text column (`TEXT`, `VARCHAR`), as the text form `ev1:...`.
/// About a third larger than [`Encrypted`]; use it where the column must stay text.
pub struct EncryptedText<T, C> {
    value: T,
    column: PhantomData<fn() -> C>,
}

/// The impls `Encrypted` and `EncryptedText` share: `new`, `into_inner`, `From<T>`,
/// `Deref`/`DerefMut` to `T`, `Clone`, `PartialEq`, `Eq`, and a `Debug` that never shows the
/// value.
macro_rules! value_wrapper {
    ($ty:ident) => {
        impl<T, C> $ty<T, C> {
            /// Wrap a value.
            pub fn new(value: T) -> Self {
                $ty {
                    value,
                    column: PhantomData,
                }
            }

            /// The value.
            pub fn into_inner(self) -> T {
                self.value
            }
        }

        impl<T, C> From<T> for $ty<T, C> {
            fn from(value: T) -> Self {
                Self::new(value)
            }
        }

        impl<T, C> std::ops::Deref for $ty<T, C> {
            type Target = T;
            fn deref(&self) -> &T {
                &self.value
            }
        }

        impl<T, C> std::ops::DerefMut for $ty<T, C> {
            fn deref_mut(&mut self) -> &mut T {
                &mut self.value
            }
        }

        impl<T: Clone, C> Clone for $ty<T, C> {
            fn clone(&self) -> Self {
                Self::new(self.value.clone())
            }
        }

        impl<T: PartialEq, C> PartialEq for $ty<T, C> {
            fn eq(&self, other: &Self) -> bool {
                self.value == other.value
            }
        }

        impl<T: Eq, C> Eq for $ty<T, C> {}

        impl<T, C: Column> std::fmt::Debug for $ty<T, C> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(
                    f,
                    "{}<{}>(<redacted>)",
                    stringify!($ty),
                    <C as Column>::LABEL
                )
            }
        }
    };
}

value_wrapper!(Encrypted);
value_wrapper!(EncryptedText);

impl<T, C, DB: Database> Type<DB> for Encrypted<T, C>
where
    Vec<u8>: Type<DB>,
{
    fn type_info() -> DB::TypeInfo {
        <Vec<u8> as Type<DB>>::type_info()
    }

    fn compatible(ty: &DB::TypeInfo) -> bool {
        <Vec<u8> as Type<DB>>::compatible(ty)
    }
}

impl<'q, T: Plaintext, C: Column, DB: Database> Encode<'q, DB> for Encrypted<T, C>
where
    Vec<u8>: Encode<'q, DB>,
{
    fn encode_by_ref(&self, buf: &mut DB::ArgumentBuffer) -> Result<IsNull, BoxDynError> {
        let sealed = column::seal::<T, C>(&self.value)?;
        <Vec<u8> as Encode<'q, DB>>::encode(sealed, buf)
    }
}

impl<'r, T: Plaintext, C: Column, DB: Database> Decode<'r, DB> for Encrypted<T, C>
where
    &'r [u8]: Decode<'r, DB>,
{
    fn decode(value: DB::ValueRef<'r>) -> Result<Self, BoxDynError> {
        let stored = <&'r [u8] as Decode<'r, DB>>::decode(value)?;
        Ok(Self::new(column::open::<T, C>(stored)?))
    }
}

impl<T, C, DB: Database> Type<DB> for EncryptedText<T, C>
where
    String: Type<DB>,
{
    fn type_info() -> DB::TypeInfo {
        <String as Type<DB>>::type_info()
    }

    fn compatible(ty: &DB::TypeInfo) -> bool {
        <String as Type<DB>>::compatible(ty)
    }
}

impl<'q, T: Plaintext, C: Column, DB: Database> Encode<'q, DB> for EncryptedText<T, C>
where
    String: Encode<'q, DB>,
{
    fn encode_by_ref(&self, buf: &mut DB::ArgumentBuffer) -> Result<IsNull, BoxDynError> {
        let sealed = column::seal_text::<T, C>(&self.value)?;
        <String as Encode<'q, DB>>::encode(sealed, buf)
    }
}

impl<'r, T: Plaintext, C: Column, DB: Database> Decode<'r, DB> for EncryptedText<T, C>
where
    &'r str: Decode<'r, DB>,
{
    fn decode(value: DB::ValueRef<'r>) -> Result<Self, BoxDynError> {
        let stored = <&'r str as Decode<'r, DB>>::decode(value)?;
        Ok(Self::new(column::open_text::<T, C>(stored)?))
    }
}

/// An equality-search column beside an encrypted one: a truncated keyed HMAC of the normalized
/// value (see [`envelope_core::BlindIndexSpec`]). Compute it when writing the row, and compute the probe
/// the same way for `WHERE email_bidx = $1`:
///
/// ```
/// # use envelope_core::{Keyring, LocalKms, KeyMaterial, MemoryKeyStore};
/// use envelope_sqlx::{BlindIndex, blind_index};
///
/// blind_index!(pub CustomerEmailIndex = "customers.email", CaseFolded);
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let kms = LocalKms::from_key(KeyMaterial::generate()?);
/// # let keyring = Keyring::builder(kms, MemoryKeyStore::new()).build()?;
/// keyring.install_for(async {
///     let probe = BlindIndex::<CustomerEmailIndex>::of("Alice@Example.com")?;
///     // CaseFolded: the probe for any spelling matches what was stored for the value.
///     assert_eq!(probe, BlindIndex::<CustomerEmailIndex>::of("alice@example.com")?);
///     let _query = sqlx::query::<sqlx::Postgres>("SELECT name FROM customers WHERE email_bidx = $1")
///         .bind(&probe);
///     Ok::<_, envelope_core::Error>(())
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub struct BlindIndex<I> {
    digest: Vec<u8>,
    index: PhantomData<fn() -> I>,
}

impl<I: IndexColumn> BlindIndex<I> {
    /// The index of `value` under the current keyring's index key for `I`.
    ///
    /// # Errors
    /// [`Misuse::NoKeyring`](envelope_core::Misuse::NoKeyring), or a KMS or key-store error while the index
    /// key is first loaded or created.
    pub fn of(value: impl AsRef<[u8]>) -> Result<Self, envelope_core::Error> {
        Ok(BlindIndex {
            digest: envelope_core::column::blind_index::<I>(value.as_ref())?,
            index: PhantomData,
        })
    }

    /// The probes that find `value` in the index column, one per index key `I`'s label
    /// has: bind them all in `WHERE index_column IN (...)`. There is one except while
    /// `envelope rotate --index` recomputes the column, when rows indexed under the old
    /// key and under the new one are both found.
    ///
    /// # Errors
    /// As [`Self::of`].
    pub fn probes(value: impl AsRef<[u8]>) -> Result<Vec<Self>, envelope_core::Error> {
        Ok(
            envelope_core::column::blind_index_probes::<I>(value.as_ref())?
                .into_iter()
                .map(|digest| BlindIndex {
                    digest,
                    index: PhantomData,
                })
                .collect(),
        )
    }

    /// The stored bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.digest
    }
}

impl<I> Clone for BlindIndex<I> {
    fn clone(&self) -> Self {
        BlindIndex {
            digest: self.digest.clone(),
            index: PhantomData,
        }
    }
}

impl<I> PartialEq for BlindIndex<I> {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl<I> Eq for BlindIndex<I> {}

impl<I: IndexColumn> std::fmt::Debug for BlindIndex<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not secret in itself, but equal digests reveal equal values: keep them out of
        // logs.
        write!(f, "BlindIndex<{}>(<redacted>)", <I as IndexColumn>::LABEL)
    }
}

impl<I, DB: Database> Type<DB> for BlindIndex<I>
where
    Vec<u8>: Type<DB>,
{
    fn type_info() -> DB::TypeInfo {
        <Vec<u8> as Type<DB>>::type_info()
    }

    fn compatible(ty: &DB::TypeInfo) -> bool {
        <Vec<u8> as Type<DB>>::compatible(ty)
    }
}

impl<'q, I, DB: Database> Encode<'q, DB> for BlindIndex<I>
where
    Vec<u8>: Encode<'q, DB>,
{
    fn encode_by_ref(&self, buf: &mut DB::ArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <Vec<u8> as Encode<'q, DB>>::encode(self.digest.clone(), buf)
    }
}

impl<'r, I, DB: Database> Decode<'r, DB> for BlindIndex<I>
where
    Vec<u8>: Decode<'r, DB>,
{
    fn decode(value: DB::ValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(BlindIndex {
            digest: <Vec<u8> as Decode<'r, DB>>::decode(value)?,
            index: PhantomData,
        })
    }
}
