//! The column types, `Encrypted<T, C>`, `EncryptedText<T, C>` and `BlindIndex<I>`, and what they
//! do whatever the ORM: the ORM traits are in `sqlx_ext.rs` and `diesel_ext.rs`.

use std::marker::PhantomData;

use super::{Column, IndexColumn};
use crate::error::Error;

/// A field stored encrypted in a binary column: sealed when bound, opened when read, under
/// column marker `C`. The column is `BYTEA` on PostgreSQL, `BLOB`, `MEDIUMBLOB` or
/// `VARBINARY(n)` on MySQL/MariaDB and `BLOB` on SQLite (diesel's `Binary`). Use
/// `Option<Encrypted<T, C>>` for a nullable column (diesel's `Nullable<Binary>`): SQL `NULL`
/// stays `NULL`.
///
/// It derefs to `T`. Its `Debug` never shows the value (diesel requires `Debug` on bind values
/// and prints it in `debug_query`).
///
/// envelope-sqlx and envelope-diesel re-export it (`envelope_sqlx::Encrypted`,
/// `envelope_diesel::Encrypted`: one type) and turn on its ORM impls, the cargo features `sqlx`
/// and `diesel` of this crate.
///
/// # With sqlx
///
/// Sealed in `Encode`, opened in `Decode`, on any database whose driver stores `Vec<u8>`.
///
/// PostgreSQL accepts it bound into a `TEXT` column (the server stores the bytes' hex text);
/// the read then fails, with sqlx's type mismatch (`BYTEA` against `TEXT`), or, where that
/// check does not run (`try_get_unchecked`), with
/// [`FormatError::HexText`](crate::FormatError::HexText), whose message names the fix.
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
/// # With diesel
///
/// Sealed in `ToSql`, opened in `FromSql`, for a `Binary` or `Nullable<Binary>` column of the
/// `table!` schema. Writing needs the backend's feature of envelope-diesel (`postgres`, `mysql`
/// or `sqlite`).
#[cfg_attr(
    feature = "diesel",
    derive(diesel::expression::AsExpression, diesel::deserialize::FromSqlRow),
    diesel(sql_type = diesel::sql_types::Binary)
)]
pub struct Encrypted<T, C> {
    value: T,
    column: PhantomData<fn() -> C>,
}

/// A field stored encrypted in a text column (`TEXT`, `VARCHAR`; diesel's `Text`), as the text
/// form `ev1:...`. About a third larger than [`Encrypted`]; use it where the column must stay
/// text. Otherwise it is used as [`Encrypted`] is, with sqlx and with diesel.
#[cfg_attr(
    feature = "diesel",
    derive(diesel::expression::AsExpression, diesel::deserialize::FromSqlRow),
    diesel(sql_type = diesel::sql_types::Text)
)]
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

/// An equality-search column beside an encrypted one (a binary column; diesel's `Binary`): a
/// truncated keyed HMAC of the normalized value (see [`BlindIndexSpec`](crate::BlindIndexSpec)).
/// Compute it when writing the row, and compute the probe the same way for the search: bind it
/// in `WHERE email_bidx = $1` with sqlx, or filter on `customers::email_bidx.eq(&probe)` with
/// diesel.
///
/// ```
/// # use envelope_core::{Keyring, LocalKms, KeyMaterial, MemoryKeyStore};
/// use envelope_core::blind_index;
/// use envelope_core::column::BlindIndex;
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
///     Ok::<_, envelope_core::Error>(())
/// })
/// .await?;
/// # Ok(()) }
/// ```
///
/// Its `Debug` never shows the digest: equal digests reveal equal values.
#[cfg_attr(
    feature = "diesel",
    derive(diesel::expression::AsExpression, diesel::deserialize::FromSqlRow),
    diesel(sql_type = diesel::sql_types::Binary)
)]
pub struct BlindIndex<I> {
    digest: Vec<u8>,
    index: PhantomData<fn() -> I>,
}

impl<I: IndexColumn> BlindIndex<I> {
    /// The index of `value` under the current keyring's index key for `I`.
    ///
    /// # Errors
    /// [`Misuse::NoKeyring`](crate::Misuse::NoKeyring), or a KMS or key-store error while the
    /// index key is first loaded or created.
    pub fn of(value: impl AsRef<[u8]>) -> Result<Self, Error> {
        super::blind_index::<I>(value.as_ref()).map(Self::from_digest)
    }

    /// The probes that find `value` in the index column, one per index key `I`'s label
    /// has: bind them all in `WHERE index_column IN (...)`. There is one except while
    /// `envelope rotate --index` recomputes the column, when rows indexed under the old
    /// key and under the new one are both found.
    ///
    /// # Errors
    /// As [`Self::of`].
    pub fn probes(value: impl AsRef<[u8]>) -> Result<Vec<Self>, Error> {
        Ok(super::blind_index_probes::<I>(value.as_ref())?
            .into_iter()
            .map(Self::from_digest)
            .collect())
    }
}

impl<I> BlindIndex<I> {
    /// The stored bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.digest
    }

    /// A digest computed or read back.
    pub(super) fn from_digest(digest: Vec<u8>) -> Self {
        BlindIndex {
            digest,
            index: PhantomData,
        }
    }
}

impl<I> Clone for BlindIndex<I> {
    fn clone(&self) -> Self {
        Self::from_digest(self.digest.clone())
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

#[cfg(test)]
mod tests {
    use super::*;

    crate::column!(Email = "customers.email");
    crate::blind_index!(EmailIndex = "customers.email", CaseFolded);

    #[test]
    fn wrappers_hold_the_value_and_never_show_it() {
        let mut e = Encrypted::<String, Email>::from(String::from("alice@example.com"));
        assert_eq!(format!("{e:?}"), "Encrypted<customers.email>(<redacted>)");
        e.push('!');
        assert_eq!(
            e.clone(),
            Encrypted::new(String::from("alice@example.com!"))
        );
        assert_eq!(e.into_inner(), "alice@example.com!");

        let t = EncryptedText::<i64, Email>::new(7);
        assert_eq!(
            format!("{t:?}"),
            "EncryptedText<customers.email>(<redacted>)"
        );
        assert_eq!(*t, 7);

        let b = BlindIndex::<EmailIndex>::from_digest(vec![1, 2, 3]);
        assert_eq!(format!("{b:?}"), "BlindIndex<customers.email>(<redacted>)");
        assert_eq!(b.clone().as_bytes(), &[1, 2, 3]);
    }
}
