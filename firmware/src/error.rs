//! Driver errors.

use core::fmt;

/// What went wrong talking to a part. `E` is the bus or pin error of the HAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error<E> {
    /// The device did not acknowledge (absent, unpowered, wrong address).
    Nack,
    /// The bus or pin reported another error.
    Bus(E),
    /// A checksum did not match: the data was corrupted on the wire.
    Crc {
        /// CRC computed over the received data.
        expected: u8,
        /// CRC the device sent.
        found: u8,
    },
    /// An argument the part does not support (e.g. ADC channel 9 on an 8-channel part).
    OutOfRange,
    /// An output does not read back as written (welded relay contact, broken wire, stuck valve).
    Readback {
        /// The state written.
        wanted: bool,
        /// The state read back.
        found: bool,
    },
}

impl<E: fmt::Debug> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Nack => f.write_str("device did not acknowledge (absent, unpowered or wrong address)"),
            Error::Bus(e) => write!(f, "bus error: {e:?}"),
            Error::Crc { expected, found } => {
                write!(f, "CRC mismatch: computed {expected:#04x}, device sent {found:#04x}")
            }
            Error::OutOfRange => f.write_str("argument out of range for this part"),
            Error::Readback { wanted, found } => {
                write!(
                    f,
                    "output reads back {} after writing {}",
                    on_off(*found),
                    on_off(*wanted)
                )
            }
        }
    }
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

impl<E> Error<E> {
    /// True when retrying may help (a glitch on the wire), false for a fault that needs a person.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Nack | Error::Bus(_) | Error::Crc { .. })
    }
}

/// Maps an I2C error, keeping NACKs apart from other bus errors.
pub(crate) fn i2c<E: embedded_hal::i2c::Error>(e: E) -> Error<E> {
    match e.kind() {
        embedded_hal::i2c::ErrorKind::NoAcknowledge(_) => Error::Nack,
        _ => Error::Bus(e),
    }
}

/// Maps a pin error to its kind, so drivers with two pins of different types share one error.
pub(crate) fn pin<E: embedded_hal::digital::Error>(e: E) -> Error<embedded_hal::digital::ErrorKind> {
    Error::Bus(e.kind())
}
