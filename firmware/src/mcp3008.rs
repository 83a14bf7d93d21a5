//! Microchip MCP3008: 8-channel 10-bit ADC on SPI.
//!
//! One conversion is three bytes in each direction (datasheet figure 6-1): send a start bit
//! (`0x01`), then single-ended mode and the channel in the high nibble (`0x80 | ch << 4`), then a
//! don't-care byte; the result's two high bits end the second received byte and the low eight
//! bits are the third.

use embedded_hal::spi::SpiDevice;

use crate::error::Error;

/// Number of channels.
pub const CHANNELS: u8 = 8;
/// Largest reading (10 bits).
pub const MAX: u16 = 1023;

/// An MCP3008 on an SPI device (bus plus chip select).
pub struct Mcp3008<S> {
    spi: S,
}

impl<S: SpiDevice> Mcp3008<S> {
    /// Wraps the SPI device.
    pub fn new(spi: S) -> Self {
        Mcp3008 { spi }
    }

    /// Reads one single-ended channel (0–7): 0..=1023 of the reference voltage.
    pub fn read(&mut self, channel: u8) -> Result<u16, Error<S::Error>> {
        if channel >= CHANNELS {
            return Err(Error::OutOfRange);
        }
        let mut buf = [0x01, 0x80 | (channel << 4), 0x00];
        self.spi.transfer_in_place(&mut buf).map_err(Error::Bus)?;
        Ok((u16::from(buf[1] & 0x03) << 8) | u16::from(buf[2]))
    }

    /// Gives the SPI device back.
    pub fn release(self) -> S {
        self.spi
    }
}

/// A reading scaled to volts against `vref`.
pub fn volts(reading: u16, vref: f32) -> f32 {
    vref * f32::from(reading.min(MAX)) / f32::from(MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal_mock::eh1::spi::{Mock, Transaction as T};

    #[test]
    fn reads_channel_with_the_datasheet_frame() {
        let mut spi = Mock::new(&[
            T::transaction_start(),
            T::transfer_in_place(vec![0x01, 0xB0, 0x00], vec![0x00, 0x02, 0x9A]),
            T::transaction_end(),
        ]);
        let mut adc = Mcp3008::new(spi.clone());
        assert_eq!(adc.read(3).unwrap(), 0x29A);
        spi.done();
    }

    #[test]
    fn channel_out_of_range_touches_no_bus() {
        let mut spi = Mock::new(&[]);
        assert_eq!(Mcp3008::new(spi.clone()).read(8), Err(Error::OutOfRange));
        spi.done();
        assert!((volts(1023, 3.3) - 3.3).abs() < 1e-6);
    }
}
