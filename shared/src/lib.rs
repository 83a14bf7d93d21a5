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
pub mod signing;
pub mod tls;

pub use definition::{ActionCatalog, Definition, DefinitionError, Problem};
pub use journal::{ErrorInfo, Event, Record};
