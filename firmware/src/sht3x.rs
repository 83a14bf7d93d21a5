//! Sensirion SHT3x (SHT30/31/35) temperature and humidity sensor on I2C.
//!
//! Single-shot measurement, high repeatability, no clock stretching (command `0x2400`); the part
//! answers with six bytes: temperature MSB, LSB, CRC, humidity MSB, LSB, CRC. The CRC is CRC-8 with
//! polynomial 0x31 and initial value 0xFF (datasheet section 4.12).

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

use crate::error::{Error, i2c};

/// Address with the ADDR pin low.
pub const ADDRESS_LOW: u8 = 0x44;
/// Address with the ADDR pin high.
pub const ADDRESS_HIGH: u8 = 0x45;
/// Single shot, high repeatability, clock stretching disabled.
pub const CMD_MEASURE_HIGH: [u8; 2] = [0x24, 0x00];
/// Longest measurement time at high repeatability (15.5 ms), rounded up.
pub const MEASURE_MS: u32 = 16;

/// One reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measurement {
    /// Temperature in °C.
    pub celsius: f32,
    /// Relative humidity in %.
    pub humidity: f32,
}

/// CRC-8 as the SHT3x computes it (polynomial 0x31, initial 0xFF, no reflection, no final XOR).
pub fn crc8(data: &[u8]) -> u8 {
    let mut crc: u8 = 0xFF;
    for &b in data {
        crc ^= b;
        for _ in 0..8 {
            crc = if crc & 0x80 != 0 { (crc << 1) ^ 0x31 } else { crc << 1 };
        }
    }
    crc
}

/// Raw 16-bit temperature to °C: T = -45 + 175 · raw / 65535.
pub fn celsius(raw: u16) -> f32 {
    -45.0 + 175.0 * raw as f32 / 65535.0
}

/// Raw 16-bit humidity to %RH: RH = 100 · raw / 65535.
pub fn humidity(raw: u16) -> f32 {
    100.0 * raw as f32 / 65535.0
}

/// An SHT3x on an I2C bus.
pub struct Sht3x<I> {
    i2c: I,
    address: u8,
}

impl<I: I2c> Sht3x<I> {
    /// A sensor at `address` ([`ADDRESS_LOW`] or [`ADDRESS_HIGH`]).
    pub fn new(i2c: I, address: u8) -> Self {
        Sht3x { i2c, address }
    }

    /// Takes one measurement (about 16 ms).
    pub fn measure(&mut self, delay: &mut impl DelayNs) -> Result<Measurement, Error<I::Error>> {
        self.i2c.write(self.address, &CMD_MEASURE_HIGH).map_err(i2c)?;
        delay.delay_ms(MEASURE_MS);
        let mut buf = [0u8; 6];
        self.i2c.read(self.address, &mut buf).map_err(i2c)?;
        let t = checked(&buf[0..3])?;
        let h = checked(&buf[3..6])?;
        Ok(Measurement {
            celsius: celsius(t),
            humidity: humidity(h),
        })
    }

    /// Gives the bus back.
    pub fn release(self) -> I {
        self.i2c
    }
}

/// A 16-bit word followed by its CRC.
fn checked<E>(word: &[u8]) -> Result<u16, Error<E>> {
    let expected = crc8(&word[0..2]);
    if expected != word[2] {
        return Err(Error::Crc {
            expected,
            found: word[2],
        });
    }
    Ok(u16::from_be_bytes([word[0], word[1]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal::i2c::{ErrorKind, NoAcknowledgeSource};
    use embedded_hal_mock::eh1::delay::NoopDelay;
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction as T};

    #[test]
    fn datasheet_crc_example() {
        // Datasheet 4.12: CRC(0xBEEF) = 0x92.
        assert_eq!(crc8(&[0xBE, 0xEF]), 0x92);
    }

    #[test]
    fn measures_with_the_datasheet_byte_sequence() {
        // 0x6666 → 25.0 °C; 0x8000 → 50.0 %RH.
        let bytes = vec![0x66, 0x66, crc8(&[0x66, 0x66]), 0x80, 0x00, crc8(&[0x80, 0x00])];
        let mut bus = Mock::new(&[T::write(0x44, vec![0x24, 0x00]), T::read(0x44, bytes)]);
        let mut s = Sht3x::new(bus.clone(), ADDRESS_LOW);
        let m = s.measure(&mut NoopDelay).unwrap();
        assert!((m.celsius - 25.0).abs() < 0.01, "{m:?}");
        assert!((m.humidity - 50.0).abs() < 0.01, "{m:?}");
        bus.done();
    }

    #[test]
    fn corrupted_byte_is_a_crc_error() {
        let bytes = vec![0x66, 0x67, crc8(&[0x66, 0x66]), 0x80, 0x00, crc8(&[0x80, 0x00])];
        let mut bus = Mock::new(&[T::write(0x44, vec![0x24, 0x00]), T::read(0x44, bytes)]);
        let err = Sht3x::new(bus.clone(), ADDRESS_LOW)
            .measure(&mut NoopDelay)
            .unwrap_err();
        assert!(matches!(err, Error::Crc { found, .. } if found == crc8(&[0x66, 0x66])));
        assert!(err.is_transient());
        bus.done();
    }

    #[test]
    fn absent_sensor_is_a_nack() {
        let mut bus = Mock::new(&[
            T::write(0x45, vec![0x24, 0x00]).with_error(ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address))
        ]);
        let err = Sht3x::new(bus.clone(), ADDRESS_HIGH)
            .measure(&mut NoopDelay)
            .unwrap_err();
        assert_eq!(err, Error::Nack);
        bus.done();
    }
}
