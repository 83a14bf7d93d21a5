//! Outpost firmware: `#![no_std]` equipment drivers written against embedded-hal 1.0.
//!
//! No drivers yet: they arrive with the equipment issue. The crate already builds without `std`
//! so nothing added later can quietly depend on it.
#![no_std]
