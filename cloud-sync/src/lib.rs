//! Outpost cloud-sync: the fleet-side service.
//!
//! Nothing is implemented here yet: ingest over MQTT, the fleet store, deployments, commands and
//! the console arrive with the sync issue. The crate exists so the workspace layout is fixed.
