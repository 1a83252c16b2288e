//! The column types: `Encrypted<T, C>`, `EncryptedText<T, C>` and `BlindIndex<I>`.

use std::marker::PhantomData;

use envelope_core::column::{self, Column, Plaintext};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::{Database, Decode, Encode, Type};

/// A field stored encrypted in a binary column (`BYTEA`, `BLOB`, `VARBINARY`): sealed when bound,
/// opened when decoded, under column marker `C`. Use `Option<Encrypted<T, C>>` for a nullable
/// column: SQL `NULL` stays `NULL`.
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

envelope_core::__column_wrapper!(Encrypted);
envelope_core::__column_wrapper!(EncryptedText);

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
/// value (see [`envelope_core::blind`]). Compute it when writing the row, and compute the probe
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

envelope_core::__blind_index_wrapper!(BlindIndex);

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
