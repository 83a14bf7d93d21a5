//! The `linux` backend: the gateway's own buses through linux-embedded-hal — GPIO lines of a
//! character device, `/dev/i2c-N`, `/dev/spidevB.C` — driven by the same firmware drivers.

use linux_embedded_hal::gpio_cdev::{Chip, LineRequestFlags};
use linux_embedded_hal::spidev::{SpiModeFlags, SpidevOptions};
use linux_embedded_hal::{CdevPin, I2cdev, SpidevDevice};
use outpost_firmware::input::DigitalInput;
use outpost_firmware::mcp3008::Mcp3008;
use outpost_firmware::output::{FeedbackOutput, LatchedOutput, ReadBackPin};
use outpost_firmware::sht3x::{self, Sht3x};

use super::{DeviceSpec, Driver, PinRef};
use outpost_shared::definition::parse_duration;

const CONSUMER: &str = "outpost";

fn line(p: &Option<PinRef>, field: &str, output: bool) -> Result<(CdevPin, String), String> {
    let Some(PinRef::Line { chip, line }) = p else {
        return Err(format!("{field}: a linux pin is {{chip: /dev/gpiochipN, line: N}}"));
    };
    let mut c = Chip::new(chip).map_err(|e| format!("{field}: cannot open {chip}: {e}"))?;
    let l = c
        .get_line(*line)
        .map_err(|e| format!("{field}: {chip} line {line}: {e}"))?;
    let flags = if output {
        LineRequestFlags::OUTPUT
    } else {
        LineRequestFlags::INPUT
    };
    let handle = l
        .request(flags, 0, CONSUMER)
        .map_err(|e| format!("{field}: {chip} line {line} is not available: {e}"))?;
    let pin = CdevPin::new(handle).map_err(|e| format!("{field}: {chip} line {line}: {e}"))?;
    Ok((pin, chip.clone()))
}

/// Opens a device; returns its driver and the key of the bus it shares.
pub(super) fn driver(kind: &str, d: &DeviceSpec) -> Result<(Driver, String), String> {
    Ok(match kind {
        "output" => {
            let (out, chip) = line(&d.pin, "pin", true)?;
            match &d.feedback {
                Some(_) => {
                    let (fb, _) = line(&d.feedback, "feedback", false)?;
                    let settle = match &d.settle {
                        Some(s) => parse_duration(&s.0).map_err(|e| format!("settle: {e}"))?,
                        None => std::time::Duration::ZERO,
                    };
                    let ms = u32::try_from(settle.as_millis()).map_err(|_| "settle: too long".to_string())?;
                    (
                        Driver::Output(Box::new(FeedbackOutput::new(out, fb, d.active_low, ms))),
                        chip,
                    )
                }
                // Without a feedback contact the line itself is read back.
                None => (Driver::Output(Box::new(LatchedOutput::new(ReadBackPin(out)))), chip),
            }
        }
        "input" => {
            let (pin, chip) = line(&d.pin, "pin", false)?;
            (Driver::Input(Box::new(DigitalInput::new(pin, d.active_low))), chip)
        }
        "sht3x" => {
            let bus = d.bus.as_deref().ok_or("bus: a linux sht3x needs bus: /dev/i2c-N")?;
            let dev = I2cdev::new(bus).map_err(|e| format!("bus: cannot open {bus}: {e}"))?;
            let address = d.address.unwrap_or(sht3x::ADDRESS_LOW);
            if address != sht3x::ADDRESS_LOW && address != sht3x::ADDRESS_HIGH {
                return Err(format!(
                    "address: {address:#04x} is not an SHT3x address (0x44 or 0x45)"
                ));
            }
            (Driver::Sht3x(Box::new(Sht3x::new(dev, address))), bus.to_string())
        }
        _ => {
            let path = d
                .spi
                .as_deref()
                .ok_or("spi: a linux mcp3008 needs spi: /dev/spidevB.C")?;
            let mut dev = SpidevDevice::open(path).map_err(|e| format!("spi: cannot open {path}: {e}"))?;
            let opts = SpidevOptions::new()
                .bits_per_word(8)
                .max_speed_hz(1_000_000)
                .mode(SpiModeFlags::SPI_MODE_0)
                .build();
            dev.configure(&opts)
                .map_err(|e| format!("spi: configuring {path}: {e}"))?;
            // Devices on one SPI bus (spidevB.*) share it.
            let bus = path.rsplit_once('.').map_or(path, |(b, _)| b).to_string();
            (Driver::Mcp3008(Box::new(Mcp3008::new(dev)), d.vref.unwrap_or(3.3)), bus)
        }
    })
}
