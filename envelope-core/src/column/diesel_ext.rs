//! diesel's `FromSql` and `ToSql` for the column types (feature `diesel`; `AsExpression` and
//! `FromSqlRow` are derived where the types are declared).
//!
//! Reading is one generic `FromSql` per type. Writing produces a temporary (the sealed value),
//! which diesel's backends take in two different ways: PostgreSQL and MySQL copy the bytes into
//! their bind buffer (`Output::write_all`), SQLite takes an owned value (`Output::set_value`).
//! A generic impl over both cannot be written outside diesel (E0119), hence one impl per backend,
//! each behind its feature (`diesel-postgres`, `diesel-mysql`, `diesel-sqlite`).

use diesel::backend::Backend;
use diesel::deserialize::{self, FromSql};
use diesel::serialize::{self, ToSql};
use diesel::sql_types::{Binary, Text};

use super::{BlindIndex, Column, Encrypted, EncryptedText, IndexColumn, Plaintext};

impl<T: Plaintext, C: Column, DB: Backend> FromSql<Binary, DB> for Encrypted<T, C>
where
    Vec<u8>: FromSql<Binary, DB>,
{
    fn from_sql(bytes: DB::RawValue<'_>) -> deserialize::Result<Self> {
        let stored = <Vec<u8> as FromSql<Binary, DB>>::from_sql(bytes)?;
        Ok(Self::new(super::open::<T, C>(&stored)?))
    }
}

impl<T: Plaintext, C: Column, DB: Backend> FromSql<Text, DB> for EncryptedText<T, C>
where
    String: FromSql<Text, DB>,
{
    fn from_sql(bytes: DB::RawValue<'_>) -> deserialize::Result<Self> {
        let stored = <String as FromSql<Text, DB>>::from_sql(bytes)?;
        Ok(Self::new(super::open_text::<T, C>(&stored)?))
    }
}

/// `ToSql` for a backend whose bind collector copies bytes (PostgreSQL, MySQL).
#[cfg(any(feature = "diesel-postgres", feature = "diesel-mysql"))]
macro_rules! raw_bytes_to_sql {
    ($db:ty) => {
        impl<T: Plaintext, C: Column> ToSql<Binary, $db> for Encrypted<T, C> {
            fn to_sql<'b>(&'b self, out: &mut serialize::Output<'b, '_, $db>) -> serialize::Result {
                let sealed = super::seal::<T, C>(self)?;
                std::io::Write::write_all(out, &sealed)?;
                Ok(serialize::IsNull::No)
            }
        }

        impl<T: Plaintext, C: Column> ToSql<Text, $db> for EncryptedText<T, C> {
            fn to_sql<'b>(&'b self, out: &mut serialize::Output<'b, '_, $db>) -> serialize::Result {
                let sealed = super::seal_text::<T, C>(self)?;
                std::io::Write::write_all(out, sealed.as_bytes())?;
                Ok(serialize::IsNull::No)
            }
        }
    };
}

#[cfg(feature = "diesel-postgres")]
raw_bytes_to_sql!(diesel::pg::Pg);
#[cfg(feature = "diesel-mysql")]
raw_bytes_to_sql!(diesel::mysql::Mysql);

#[cfg(feature = "diesel-sqlite")]
impl<T: Plaintext, C: Column> ToSql<Binary, diesel::sqlite::Sqlite> for Encrypted<T, C> {
    fn to_sql<'b>(
        &'b self,
        out: &mut serialize::Output<'b, '_, diesel::sqlite::Sqlite>,
    ) -> serialize::Result {
        out.set_value(super::seal::<T, C>(self)?);
        Ok(serialize::IsNull::No)
    }
}

#[cfg(feature = "diesel-sqlite")]
impl<T: Plaintext, C: Column> ToSql<Text, diesel::sqlite::Sqlite> for EncryptedText<T, C> {
    fn to_sql<'b>(
        &'b self,
        out: &mut serialize::Output<'b, '_, diesel::sqlite::Sqlite>,
    ) -> serialize::Result {
        out.set_value(super::seal_text::<T, C>(self)?);
        Ok(serialize::IsNull::No)
    }
}

// The digest is already computed, so one generic impl borrows it for every backend.
impl<I: IndexColumn, DB: Backend> ToSql<Binary, DB> for BlindIndex<I>
where
    [u8]: ToSql<Binary, DB>,
{
    fn to_sql<'b>(&'b self, out: &mut serialize::Output<'b, '_, DB>) -> serialize::Result {
        <[u8] as ToSql<Binary, DB>>::to_sql(self.as_bytes(), out)
    }
}

impl<I, DB: Backend> FromSql<Binary, DB> for BlindIndex<I>
where
    Vec<u8>: FromSql<Binary, DB>,
{
    fn from_sql(bytes: DB::RawValue<'_>) -> deserialize::Result<Self> {
        <Vec<u8> as FromSql<Binary, DB>>::from_sql(bytes).map(Self::from_digest)
    }
}
