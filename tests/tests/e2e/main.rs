//! End-to-end tests: the real `outpost` binary, real redb files, real processes, SIGKILL.

mod bad_input;
mod breaker;
mod chaos;
mod children;
mod console;
mod crash;
mod desired_state;
mod durable_sleep;
mod equipment;
mod examples;
mod first_hour;
mod history;
mod hostile;
mod limits;
mod operators;
mod packaging;
mod patterns;
mod readme;
mod recovery;
mod run_model;
mod saga;
mod schedules;
mod security;
mod signals;
mod sync;
mod triggers;
