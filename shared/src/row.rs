//! Versioned rows for the redb stores on both sides (the agent's journal, cloud-sync's store):
//! one envelope and one error mapping, so a row format evolves the same way everywhere.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A stored row. Variants are only appended (a changed row is `V2`), so an old row always
/// decodes; postcard writes the variant index first, so the index is the row's version.
#[derive(Serialize, Deserialize)]
pub enum Row<T> {
    /// The first layout.
    V1(T),
}

/// A value as a `V1` row.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(&Row::V1(value)).unwrap_or_default()
}

/// A row's value; the error says why it does not decode as a `T`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, postcard::Error> {
    match postcard::from_bytes::<Row<T>>(bytes)? {
        Row::V1(v) => Ok(v),
    }
}

/// Implements `From` for each of redb's per-operation error types into one storage variant of a
/// store's error (`redb_errors_into!(JournalError, JournalError::Storage)`), through
/// `redb::Error`. Expands in the calling crate, which is the one that depends on redb.
#[macro_export]
macro_rules! redb_errors_into {
    ($ty:ty, $variant:path) => {
        $crate::redb_errors_into!(@each $ty, $variant,
            DatabaseError, TransactionError, TableError, StorageError, CommitError, SetDurabilityError);
    };
    (@each $ty:ty, $variant:path, $($e:ident),*) => {$(
        impl From<redb::$e> for $ty {
            fn from(e: redb::$e) -> Self {
                $variant(e.into())
            }
        }
    )*};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct R {
        a: u32,
        b: String,
    }

    #[test]
    fn a_row_round_trips_and_its_first_byte_is_the_version() {
        let r = R { a: 7, b: "x".into() };
        let bytes = encode(&r);
        assert_eq!(bytes.first(), Some(&0), "V1 is variant 0");
        assert_eq!(decode::<R>(&bytes).ok(), Some(r));
        assert!(decode::<R>(&[1, 7]).is_err(), "an unknown version does not decode");
        assert!(decode::<R>(&[]).is_err());
    }
}
