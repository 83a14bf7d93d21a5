//! Outpost cloud-sync: the fleet-side service.
//!
//! Devices talk to it over MQTT (the protocol is `outpost_shared::protocol`, documented in
//! `docs/protocol.md`); operators and the console use its HTTP JSON API. It stores everything in
//! redb: devices and their presence, a mirror of every run with its full history (idempotent by
//! device and sequence), commands waiting for their device, deployments, desired and reported
//! state; or, for several replicas, in Postgres. With no broker given it starts an embedded one (rumqttd) on loopback.

#![warn(missing_docs)]

pub mod access;
pub mod acl;
pub mod admin_socket;
pub mod api;
#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod console;
pub mod https;
pub mod lineage;
pub mod operators;
pub mod pki;
pub mod rollout;
pub mod service;
pub mod store;
pub mod testing;

pub use service::{Link, Security, Service};
pub use store::Store;
