//! The Outpost edge agent: a durable workflow engine on a redb journal.
//!
//! `engine` decides (pure), `journal` remembers (redb, group commit), `runtime` acts (runs
//! activities, timers, resumes after a crash), `actions` are what steps can do, `api` and
//! `client` are the local HTTP-over-Unix-socket API, and `cli` is the `outpost` command.

#![warn(missing_docs)]

pub mod actions;
pub mod api;
pub mod bench;
pub mod breaker;
pub mod cli;
pub mod client;
pub mod clock;
pub mod daemon;
pub mod desired;
pub mod engine;
pub mod equipment;
pub mod histogram;
pub mod identity;
pub mod journal;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod offline;
pub mod outbox;
pub mod policy;
pub mod retention;
pub mod runtime;
pub mod schedule;
pub mod sync;
pub mod sync_state;
pub mod tasks;
pub mod trigger;
