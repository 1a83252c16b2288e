//! What the sync and the async diesel tests share: the column markers, the `people` table and
//! its row type, and sample rows.
#![allow(dead_code, unreachable_pub)]

use diesel::prelude::*;
use diesel::sql_types::{Binary, Nullable, Text};
use envelope_core::Error;
use envelope_diesel::{
    AsJson, BlindIndex, Encrypted, EncryptedText, blind_index, column, envelope_error,
};

column!(pub Name = "people.name");
column!(pub Photo = "people.photo");
column!(pub Age = "people.age");
column!(pub Small = "people.small");
column!(pub Big = "people.big");
column!(pub Flag = "people.flag");
column!(pub Ident = "people.ident");
column!(pub Born = "people.born");
column!(pub Seen = "people.seen");
column!(pub Notes = "people.notes");
column!(pub Email = "people.email");
column!(pub Phone = "people.phone");
blind_index!(pub EmailIndex = "people.email", CaseFolded);

diesel::table! {
    people (id) {
        id -> BigInt,
        name -> Binary,
        photo -> Nullable<Binary>,
        age -> Nullable<Binary>,
        small -> Nullable<Binary>,
        big -> Nullable<Binary>,
        flag -> Nullable<Binary>,
        ident -> Nullable<Binary>,
        born -> Nullable<Binary>,
        seen -> Nullable<Binary>,
        notes -> Nullable<Binary>,
        email -> Nullable<Binary>,
        email_bidx -> Nullable<Binary>,
        phone -> Nullable<Text>,
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NoteBody {
    pub text: String,
    pub tags: Vec<String>,
}

#[derive(Queryable, Selectable, Insertable, Debug, PartialEq)]
#[diesel(table_name = people)]
pub struct Person {
    pub id: i64,
    pub name: Encrypted<String, Name>,
    pub photo: Option<Encrypted<Vec<u8>, Photo>>,
    pub age: Option<Encrypted<i32, Age>>,
    pub small: Option<Encrypted<i16, Small>>,
    pub big: Option<Encrypted<i64, Big>>,
    pub flag: Option<Encrypted<bool, Flag>>,
    pub ident: Option<Encrypted<uuid::Uuid, Ident>>,
    pub born: Option<Encrypted<chrono::NaiveDate, Born>>,
    pub seen: Option<Encrypted<chrono::DateTime<chrono::Utc>, Seen>>,
    pub notes: Option<Encrypted<AsJson<NoteBody>, Notes>>,
    pub email: Option<Encrypted<String, Email>>,
    pub email_bidx: Option<BlindIndex<EmailIndex>>,
    pub phone: Option<EncryptedText<String, Phone>>,
}

pub fn full(id: i64, email: &str) -> Person {
    Person {
        id,
        name: Encrypted::new("Ada Lovelace".into()),
        photo: Some(Encrypted::new(vec![0, 1, 2, 254, 255])),
        age: Some(Encrypted::new(36)),
        small: Some(Encrypted::new(-7)),
        big: Some(Encrypted::new(i64::MIN)),
        flag: Some(Encrypted::new(true)),
        ident: Some(Encrypted::new(uuid::Uuid::new_v4())),
        born: Some(Encrypted::new(
            chrono::NaiveDate::from_ymd_opt(1815, 12, 10).unwrap(),
        )),
        seen: Some(Encrypted::new(
            chrono::DateTime::from_timestamp(1_700_000_000, 123_456_000).unwrap(),
        )),
        notes: Some(Encrypted::new(AsJson(NoteBody {
            text: "analytical engine".into(),
            tags: vec!["math".into(), "poetry".into()],
        }))),
        email: Some(Encrypted::new(email.into())),
        email_bidx: Some(BlindIndex::of(email).unwrap()),
        phone: Some(EncryptedText::new("+44 20 7946 0000".into())),
    }
}

pub fn empty(id: i64) -> Person {
    Person {
        id,
        name: Encrypted::new(String::new()),
        photo: None,
        age: None,
        small: None,
        big: None,
        flag: None,
        ident: None,
        born: None,
        seen: None,
        notes: None,
        email: None,
        email_bidx: None,
        phone: None,
    }
}

/// One raw column, as stored.
#[derive(QueryableByName)]
pub struct Raw {
    #[diesel(sql_type = Nullable<Binary>)]
    pub v: Option<Vec<u8>>,
}

#[derive(QueryableByName)]
pub struct RawText {
    #[diesel(sql_type = Nullable<Text>)]
    pub v: Option<String>,
}

pub fn the_envelope_error(e: &diesel::result::Error) -> &Error {
    envelope_error(e).unwrap_or_else(|| panic!("not an envelope error: {e:?}"))
}
