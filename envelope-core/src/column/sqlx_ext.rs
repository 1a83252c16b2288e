//! sqlx's `Type`, `Encode` and `Decode` for the column types (feature `sqlx`), generic over the
//! database: each delegates to what the driver does for bytes (`Vec<u8>`, `&[u8]`) or text
//! (`String`, `&str`), as sqlx's own `Text<T>` does.

use sqlx_core::database::Database;
use sqlx_core::decode::Decode;
use sqlx_core::encode::{Encode, IsNull};
use sqlx_core::error::BoxDynError;
use sqlx_core::types::Type;

use super::{BlindIndex, Column, Encrypted, EncryptedText, Plaintext};

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
        let sealed = super::seal::<T, C>(self)?;
        <Vec<u8> as Encode<'q, DB>>::encode(sealed, buf)
    }
}

impl<'r, T: Plaintext, C: Column, DB: Database> Decode<'r, DB> for Encrypted<T, C>
where
    &'r [u8]: Decode<'r, DB>,
{
    fn decode(value: DB::ValueRef<'r>) -> Result<Self, BoxDynError> {
        let stored = <&'r [u8] as Decode<'r, DB>>::decode(value)?;
        Ok(Self::new(super::open::<T, C>(stored)?))
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
        let sealed = super::seal_text::<T, C>(self)?;
        <String as Encode<'q, DB>>::encode(sealed, buf)
    }
}

impl<'r, T: Plaintext, C: Column, DB: Database> Decode<'r, DB> for EncryptedText<T, C>
where
    &'r str: Decode<'r, DB>,
{
    fn decode(value: DB::ValueRef<'r>) -> Result<Self, BoxDynError> {
        let stored = <&'r str as Decode<'r, DB>>::decode(value)?;
        Ok(Self::new(super::open_text::<T, C>(stored)?))
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
        <Vec<u8> as Encode<'q, DB>>::encode(self.as_bytes().to_vec(), buf)
    }
}

impl<'r, I, DB: Database> Decode<'r, DB> for BlindIndex<I>
where
    Vec<u8>: Decode<'r, DB>,
{
    fn decode(value: DB::ValueRef<'r>) -> Result<Self, BoxDynError> {
        <Vec<u8> as Decode<'r, DB>>::decode(value).map(Self::from_digest)
    }
}
