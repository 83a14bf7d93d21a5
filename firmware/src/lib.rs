//! Outpost firmware: equipment drivers written against the embedded-hal 1.0 traits, so the same
//! driver runs on a Linux gateway (linux-embedded-hal) and on a microcontroller.
//!
//! Each driver implements its part's datasheet protocol and reports typed errors ([`Error`]):
//! a missing device (NACK), a corrupted transfer (CRC), a value out of range, an output that does
//! not read back as written. With the `sim` feature, [`sim`] provides a simulated plant: the same
//! traits implemented at the byte level over a small physical model, with injectable faults.
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]

#[cfg(all(feature = "std", not(test)))]
extern crate std;

pub mod error;
pub mod input;
pub mod mcp3008;
pub mod output;
pub mod sht3x;
#[cfg(feature = "sim")]
pub mod sim;

pub use error::Error;
