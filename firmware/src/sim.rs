//! A simulated plant: the parts the drivers talk to, modelled at the byte and register level,
//! over a small physical model of an oven with a heater, a vent valve and a door switch.
//!
//! The model runs on simulated time: [`Plant::advance`] moves it forward, and with a non-zero
//! `realtime` factor every access also catches up with the wall clock (for demos and the agent).
//! [`Faults`] injects what goes wrong on real buses: NACKs, corrupted CRCs, a stuck feedback
//! contact, a slow bus.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use embedded_hal::digital::{self, ErrorType as PinErrorType, InputPin, OutputPin, StatefulOutputPin};
use embedded_hal::i2c::{self, I2c, NoAcknowledgeSource};
use embedded_hal::spi::{self, Operation, SpiDevice};

use crate::sht3x;

/// Physical state of the simulated oven.
#[derive(Debug, Clone, PartialEq)]
pub struct Oven {
    /// Oven temperature, °C.
    pub celsius: f64,
    /// Relative humidity, %.
    pub humidity: f64,
    /// Temperature outside the oven, °C.
    pub ambient: f64,
    /// Heater commanded on.
    pub heater: bool,
    /// Vent valve commanded open.
    pub vent: bool,
    /// Door switch closed.
    pub door_closed: bool,
    /// Heating while the heater is on, °C per second.
    pub heat_rate: f64,
    /// Fraction of the difference to ambient lost per second with the vent open.
    pub vent_rate: f64,
    /// Fraction of the difference to ambient lost per second through the walls.
    pub leak_rate: f64,
    /// Raw readings of ADC channels 1–7 (channel 0 is the oven temperature, 0–300 °C).
    pub adc: [u16; 8],
}

impl Default for Oven {
    fn default() -> Self {
        Oven {
            celsius: 20.0,
            humidity: 40.0,
            ambient: 20.0,
            heater: false,
            vent: false,
            door_closed: true,
            heat_rate: 1.5,
            vent_rate: 0.05,
            leak_rate: 0.002,
            adc: [0; 8],
        }
    }
}

impl Oven {
    /// Moves the model forward by `secs` simulated seconds.
    pub fn step(&mut self, secs: f64) {
        let mut left = secs.max(0.0);
        while left > 0.0 {
            let dt = left.min(0.1);
            let loss = self.leak_rate + if self.vent { self.vent_rate } else { 0.0 };
            let heat = if self.heater { self.heat_rate } else { 0.0 };
            self.celsius += (heat - loss * (self.celsius - self.ambient)) * dt;
            left -= dt;
        }
    }
}

/// What goes wrong on the buses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// I2C devices do not acknowledge.
    pub nack: bool,
    /// The SHT3x sends a wrong CRC.
    pub corrupt_crc: bool,
    /// The vent feedback contact is stuck in this state.
    pub stuck_feedback: Option<bool>,
    /// Every bus transfer takes this long.
    pub bus_delay: Duration,
}

struct State {
    oven: Oven,
    faults: Faults,
    /// Wall-clock seconds to simulated seconds; 0 freezes the model between `advance` calls.
    realtime: f64,
    last: Instant,
    /// The SHT3x has a measurement ready to read.
    sht_ready: bool,
}

/// The simulated plant; hand out its parts with the methods below.
pub struct Plant {
    state: Mutex<State>,
    sht3x_address: u8,
}

impl Plant {
    /// A plant with this oven; `realtime` is how many simulated seconds pass per wall second.
    pub fn new(oven: Oven, realtime: f64) -> Arc<Plant> {
        Arc::new(Plant {
            state: Mutex::new(State {
                oven,
                faults: Faults::default(),
                realtime,
                last: Instant::now(),
                sht_ready: false,
            }),
            sht3x_address: sht3x::ADDRESS_LOW,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let elapsed = now.duration_since(s.last).as_secs_f64() * s.realtime;
        s.last = now;
        if elapsed > 0.0 {
            s.oven.step(elapsed);
        }
        s
    }

    /// Moves simulated time forward.
    pub fn advance(&self, secs: f64) {
        self.lock().oven.step(secs);
    }

    /// The oven's current state.
    pub fn oven(&self) -> Oven {
        self.lock().oven.clone()
    }

    /// Changes the oven (e.g. opens the door or sets the temperature).
    pub fn update(&self, f: impl FnOnce(&mut Oven)) {
        f(&mut self.lock().oven);
    }

    /// Sets the injected faults.
    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    fn delay(&self) {
        let d = self.lock().faults.bus_delay;
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }

    /// The heater relay output.
    pub fn heater(self: &Arc<Self>) -> SimOutput {
        SimOutput {
            plant: self.clone(),
            which: Actuator::Heater,
        }
    }

    /// The vent valve output.
    pub fn vent(self: &Arc<Self>) -> SimOutput {
        SimOutput {
            plant: self.clone(),
            which: Actuator::Vent,
        }
    }

    /// The vent valve's position feedback (high = open).
    pub fn vent_feedback(self: &Arc<Self>) -> SimInput {
        SimInput {
            plant: self.clone(),
            which: Sensor::VentFeedback,
        }
    }

    /// The door switch (high = closed).
    pub fn door(self: &Arc<Self>) -> SimInput {
        SimInput {
            plant: self.clone(),
            which: Sensor::Door,
        }
    }

    /// The I2C bus with the SHT3x on it.
    pub fn i2c(self: &Arc<Self>) -> SimI2c {
        SimI2c { plant: self.clone() }
    }

    /// The SPI device of the MCP3008.
    pub fn spi(self: &Arc<Self>) -> SimSpi {
        SimSpi { plant: self.clone() }
    }
}

/// A simulated bus or pin error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimError {
    /// No acknowledge from the addressed device.
    Nack,
    /// A transfer the simulated part does not understand.
    Protocol,
}

impl i2c::Error for SimError {
    fn kind(&self) -> i2c::ErrorKind {
        match self {
            SimError::Nack => i2c::ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address),
            SimError::Protocol => i2c::ErrorKind::Other,
        }
    }
}

impl spi::Error for SimError {
    fn kind(&self) -> spi::ErrorKind {
        spi::ErrorKind::Other
    }
}

impl digital::Error for SimError {
    fn kind(&self) -> digital::ErrorKind {
        digital::ErrorKind::Other
    }
}

#[derive(Clone, Copy)]
enum Actuator {
    Heater,
    Vent,
}

/// A simulated output pin driving an actuator.
pub struct SimOutput {
    plant: Arc<Plant>,
    which: Actuator,
}

impl PinErrorType for SimOutput {
    type Error = SimError;
}

impl OutputPin for SimOutput {
    fn set_low(&mut self) -> Result<(), SimError> {
        self.set(false);
        Ok(())
    }
    fn set_high(&mut self) -> Result<(), SimError> {
        self.set(true);
        Ok(())
    }
}

impl StatefulOutputPin for SimOutput {
    fn is_set_high(&mut self) -> Result<bool, SimError> {
        let s = self.plant.lock();
        Ok(match self.which {
            Actuator::Heater => s.oven.heater,
            Actuator::Vent => s.oven.vent,
        })
    }
    fn is_set_low(&mut self) -> Result<bool, SimError> {
        self.is_set_high().map(|h| !h)
    }
}

impl SimOutput {
    fn set(&mut self, on: bool) {
        let mut s = self.plant.lock();
        match self.which {
            Actuator::Heater => s.oven.heater = on,
            Actuator::Vent => s.oven.vent = on,
        }
    }
}

#[derive(Clone, Copy)]
enum Sensor {
    VentFeedback,
    Door,
}

/// A simulated input pin.
pub struct SimInput {
    plant: Arc<Plant>,
    which: Sensor,
}

impl PinErrorType for SimInput {
    type Error = SimError;
}

impl InputPin for SimInput {
    fn is_high(&mut self) -> Result<bool, SimError> {
        let s = self.plant.lock();
        Ok(match self.which {
            Sensor::VentFeedback => s.faults.stuck_feedback.unwrap_or(s.oven.vent),
            Sensor::Door => s.oven.door_closed,
        })
    }
    fn is_low(&mut self) -> Result<bool, SimError> {
        self.is_high().map(|h| !h)
    }
}

/// The simulated I2C bus: an SHT3x at 0x44 answering single-shot measurements.
pub struct SimI2c {
    plant: Arc<Plant>,
}

impl i2c::ErrorType for SimI2c {
    type Error = SimError;
}

impl I2c for SimI2c {
    fn transaction(&mut self, address: u8, operations: &mut [i2c::Operation<'_>]) -> Result<(), SimError> {
        self.plant.delay();
        let mut s = self.plant.lock();
        if s.faults.nack || address != self.plant.sht3x_address {
            return Err(SimError::Nack);
        }
        for op in operations {
            match op {
                i2c::Operation::Write(bytes) if *bytes == sht3x::CMD_MEASURE_HIGH => s.sht_ready = true,
                i2c::Operation::Write(_) => return Err(SimError::Protocol),
                // Reading before a measurement was started is NACKed by the real part.
                i2c::Operation::Read(_) if !s.sht_ready => return Err(SimError::Nack),
                i2c::Operation::Read(buf) => {
                    let t = ((s.oven.celsius + 45.0) / 175.0 * 65535.0).round().clamp(0.0, 65535.0) as u16;
                    let h = (s.oven.humidity / 100.0 * 65535.0).round().clamp(0.0, 65535.0) as u16;
                    let (t, h) = (t.to_be_bytes(), h.to_be_bytes());
                    let mut frame = [t[0], t[1], sht3x::crc8(&t), h[0], h[1], sht3x::crc8(&h)];
                    if s.faults.corrupt_crc {
                        frame[2] ^= 0x5A;
                    }
                    for (dst, src) in buf.iter_mut().zip(frame) {
                        *dst = src;
                    }
                    s.sht_ready = false;
                }
            }
        }
        Ok(())
    }
}

/// The simulated SPI device: an MCP3008; channel 0 reads the oven temperature (0–300 °C).
pub struct SimSpi {
    plant: Arc<Plant>,
}

impl spi::ErrorType for SimSpi {
    type Error = SimError;
}

impl SpiDevice for SimSpi {
    fn transaction(&mut self, operations: &mut [Operation<'_, u8>]) -> Result<(), SimError> {
        self.plant.delay();
        let s = self.plant.lock();
        for op in operations {
            let Operation::TransferInPlace(buf) = op else {
                return Err(SimError::Protocol);
            };
            if buf.len() != 3 || buf[0] != 0x01 || buf[1] & 0x80 == 0 {
                return Err(SimError::Protocol);
            }
            let ch = usize::from((buf[1] >> 4) & 0x07);
            let value = if ch == 0 {
                (s.oven.celsius / 300.0 * 1023.0).round().clamp(0.0, 1023.0) as u16
            } else {
                s.oven.adc[ch].min(1023)
            };
            buf.copy_from_slice(&[0x00, (value >> 8) as u8 & 0x03, value as u8]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::mcp3008::Mcp3008;
    use crate::output::FeedbackOutput;
    use crate::sht3x::Sht3x;
    use embedded_hal::delay::DelayNs;

    struct NoDelay;
    impl DelayNs for NoDelay {
        fn delay_ns(&mut self, _: u32) {}
    }

    #[test]
    fn oven_heats_and_vents_through_the_drivers() {
        let plant = Plant::new(Oven::default(), 0.0);
        let mut heater = crate::output::LatchedOutput::new(plant.heater());
        let mut sensor = Sht3x::new(plant.i2c(), sht3x::ADDRESS_LOW);
        heater.set(true).unwrap();
        plant.advance(60.0);
        let hot = sensor.measure(&mut NoDelay).unwrap().celsius;
        assert!(hot > 90.0, "heated to {hot}");
        heater.set(false).unwrap();
        let mut vent = FeedbackOutput::new(plant.vent(), plant.vent_feedback(), false, 0);
        vent.set(true, &mut NoDelay).unwrap();
        plant.advance(60.0);
        let cooled = sensor.measure(&mut NoDelay).unwrap().celsius;
        assert!(cooled < hot - 20.0, "vented from {hot} to {cooled}");
        let adc = Mcp3008::new(plant.spi()).read(0).unwrap();
        let adc_celsius = f64::from(adc) * 300.0 / 1023.0;
        assert!(
            (adc_celsius - f64::from(cooled)).abs() < 0.5,
            "ADC {adc_celsius} vs SHT3x {cooled}"
        );
    }

    #[test]
    fn injected_faults_surface_as_typed_errors() {
        let plant = Plant::new(Oven::default(), 0.0);
        let mut sensor = Sht3x::new(plant.i2c(), sht3x::ADDRESS_LOW);
        plant.set_faults(Faults {
            corrupt_crc: true,
            ..Faults::default()
        });
        assert!(matches!(sensor.measure(&mut NoDelay), Err(Error::Crc { .. })));
        plant.set_faults(Faults {
            nack: true,
            ..Faults::default()
        });
        assert_eq!(sensor.measure(&mut NoDelay), Err(Error::Nack));
        plant.set_faults(Faults {
            stuck_feedback: Some(false),
            ..Faults::default()
        });
        let mut vent = FeedbackOutput::new(plant.vent(), plant.vent_feedback(), false, 0);
        assert_eq!(
            vent.set(true, &mut NoDelay),
            Err(Error::Readback {
                wanted: true,
                found: false
            })
        );
        plant.set_faults(Faults::default());
        assert!(Sht3x::new(plant.i2c(), sht3x::ADDRESS_HIGH).measure(&mut NoDelay) == Err(Error::Nack));
    }
}
