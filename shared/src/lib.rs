//! The model the agent and the cloud agree on: workflow definitions and their validation,
//! the expression language used by conditions and templates, and the journal's event records
//! with their versioned binary codec.

#![warn(missing_docs)]

pub mod broker;
pub mod definition;
pub mod expr;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod journal;
pub mod protocol;
pub mod row;
pub mod run;
pub mod signing;
pub mod tls;

pub use definition::{ActionCatalog, Definition, DefinitionError, Problem};

/// The name of Unix user `uid` from /etc/passwd (`uidN` when it is not listed): how both sides
/// record a local operator (`local:NAME`) from a socket's peer credentials.
pub fn unix_user_name(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.get(2).and_then(|u| u.parse::<u32>().ok()) == Some(uid))
        .and_then(|f| f.first().map(|n| n.to_string()))
        .unwrap_or_else(|| format!("uid{uid}"))
}
pub use journal::{ErrorInfo, Event, Record};

/// `n` and the noun, singular for one: `1 step`, `3 steps` (nouns here take an `s`).
pub fn count(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_is_singular() {
        assert_eq!(super::count(1u32, "step"), "1 step");
        assert_eq!(super::count(0u32, "device"), "0 devices");
        assert_eq!(super::count(2u64, "event"), "2 events");
    }
}
