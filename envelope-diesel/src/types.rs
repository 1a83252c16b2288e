//! The column types: `Encrypted<T, C>`, `EncryptedText<T, C>` and `BlindIndex<I>`.
//!
//! Reading is one generic `FromSql` per type. Writing produces a temporary (the sealed value),
//! which diesel's backends take in two different ways: PostgreSQL and MySQL copy the bytes into
//! their bind buffer (`Output::write_all`), SQLite takes an owned value (`Output::set_value`).
//! A generic impl over both cannot be written outside diesel (E0119), hence one impl per backend.

use std::marker::PhantomData;

use diesel::backend::Backend;
use diesel::deserialize::{self, FromSql, FromSqlRow};
use diesel::expression::AsExpression;
use diesel::serialize::{self, ToSql};
use diesel::sql_types::{Binary, Text};
use envelope_core::column::{self, Column, IndexColumn, Plaintext};

/// A field stored encrypted in a binary column (diesel's `Binary`: `BYTEA` on PostgreSQL, `BLOB`,
/// `MEDIUMBLOB` or `VARBINARY(n)` on MySQL/MariaDB, `BLOB` on SQLite): sealed in `ToSql`, opened
/// in `FromSql`, under column marker `C`. Use `Option<Encrypted<T, C>>` for a
/// `Nullable<Binary>` column: SQL `NULL` stays `NULL`.
///
/// It derefs to `T`. Its `Debug` never shows the value (diesel requires `Debug` on bind values
/// and prints it in `debug_query`).
#[derive(AsExpression, FromSqlRow)]
#[diesel(sql_type = Binary)]
pub struct Encrypted<T, C> {
    value: T,
    column: PhantomData<fn() -> C>,
}

/// A field stored encrypted in a text column (`TEXT`, `VARCHAR`; diesel's `Text`), as the text
/// form `ev1:...`. About a third larger than [`Encrypted`]; use it where the column must stay
/// text.
#[derive(AsExpression, FromSqlRow)]
#[diesel(sql_type = Text)]
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

impl<T: Plaintext, C: Column, DB: Backend> FromSql<Binary, DB> for Encrypted<T, C>
where
    Vec<u8>: FromSql<Binary, DB>,
{
    fn from_sql(bytes: DB::RawValue<'_>) -> deserialize::Result<Self> {
        let stored = <Vec<u8> as FromSql<Binary, DB>>::from_sql(bytes)?;
        Ok(Self::new(column::open::<T, C>(&stored)?))
    }
}

impl<T: Plaintext, C: Column, DB: Backend> FromSql<Text, DB> for EncryptedText<T, C>
where
    String: FromSql<Text, DB>,
{
    fn from_sql(bytes: DB::RawValue<'_>) -> deserialize::Result<Self> {
        let stored = <String as FromSql<Text, DB>>::from_sql(bytes)?;
        Ok(Self::new(column::open_text::<T, C>(&stored)?))
    }
}

/// `ToSql` for a backend whose bind collector copies bytes (PostgreSQL, MySQL).
#[cfg(any(feature = "postgres", feature = "mysql"))]
macro_rules! raw_bytes_to_sql {
    ($db:ty) => {
        impl<T: Plaintext, C: Column> ToSql<Binary, $db> for Encrypted<T, C> {
            fn to_sql<'b>(&'b self, out: &mut serialize::Output<'b, '_, $db>) -> serialize::Result {
                let sealed = column::seal::<T, C>(&self.value)?;
                std::io::Write::write_all(out, &sealed)?;
                Ok(serialize::IsNull::No)
            }
        }

        impl<T: Plaintext, C: Column> ToSql<Text, $db> for EncryptedText<T, C> {
            fn to_sql<'b>(&'b self, out: &mut serialize::Output<'b, '_, $db>) -> serialize::Result {
                let sealed = column::seal_text::<T, C>(&self.value)?;
                std::io::Write::write_all(out, sealed.as_bytes())?;
                Ok(serialize::IsNull::No)
            }
        }
    };
}

#[cfg(feature = "postgres")]
raw_bytes_to_sql!(diesel::pg::Pg);
#[cfg(feature = "mysql")]
raw_bytes_to_sql!(diesel::mysql::Mysql);

#[cfg(feature = "sqlite")]
impl<T: Plaintext, C: Column> ToSql<Binary, diesel::sqlite::Sqlite> for Encrypted<T, C> {
    fn to_sql<'b>(
        &'b self,
        out: &mut serialize::Output<'b, '_, diesel::sqlite::Sqlite>,
    ) -> serialize::Result {
        out.set_value(column::seal::<T, C>(&self.value)?);
        Ok(serialize::IsNull::No)
    }
}

#[cfg(feature = "sqlite")]
impl<T: Plaintext, C: Column> ToSql<Text, diesel::sqlite::Sqlite> for EncryptedText<T, C> {
    fn to_sql<'b>(
        &'b self,
        out: &mut serialize::Output<'b, '_, diesel::sqlite::Sqlite>,
    ) -> serialize::Result {
        out.set_value(column::seal_text::<T, C>(&self.value)?);
        Ok(serialize::IsNull::No)
    }
}

/// An equality-search column beside an encrypted one (diesel's `Binary`): a truncated keyed HMAC
/// of the normalized value (see [`envelope_core::BlindIndexSpec`]). Compute it when writing the row, and
/// the probe the same way for `.filter(customers::email_bidx.eq(&probe))`.
#[derive(AsExpression, FromSqlRow)]
#[diesel(sql_type = Binary)]
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

// The digest is already computed, so one generic impl borrows it for every backend.
impl<I: IndexColumn, DB: Backend> ToSql<Binary, DB> for BlindIndex<I>
where
    [u8]: ToSql<Binary, DB>,
{
    fn to_sql<'b>(&'b self, out: &mut serialize::Output<'b, '_, DB>) -> serialize::Result {
        <[u8] as ToSql<Binary, DB>>::to_sql(&self.digest, out)
    }
}

impl<I, DB: Backend> FromSql<Binary, DB> for BlindIndex<I>
where
    Vec<u8>: FromSql<Binary, DB>,
{
    fn from_sql(bytes: DB::RawValue<'_>) -> deserialize::Result<Self> {
        Ok(BlindIndex {
            digest: <Vec<u8> as FromSql<Binary, DB>>::from_sql(bytes)?,
            index: PhantomData,
        })
    }
}
