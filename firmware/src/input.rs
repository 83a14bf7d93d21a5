//! Digital inputs: limit switches, door contacts, level switches.

use embedded_hal::digital::{ErrorKind, InputPin};

use crate::error::{Error, pin};

/// A switch on an input pin.
pub struct DigitalInput<I> {
    pin: I,
    active_low: bool,
}

impl<I: InputPin> DigitalInput<I> {
    /// Wraps an input; `active_low` for switches that pull the line to ground when closed.
    pub fn new(pin: I, active_low: bool) -> Self {
        DigitalInput { pin, active_low }
    }

    /// True when the switch is active (closed, door shut, level reached).
    pub fn is_active(&mut self) -> Result<bool, Error<ErrorKind>> {
        Ok(self.pin.is_high().map_err(pin)? != self.active_low)
    }

    /// Gives the pin back.
    pub fn release(self) -> I {
        self.pin
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal_mock::eh1::digital::{Mock as PinMock, State, Transaction as T};

    #[test]
    fn active_low_switch() {
        let mut door = DigitalInput::new(PinMock::new(&[T::get(State::Low), T::get(State::High)]), true);
        assert!(door.is_active().unwrap());
        assert!(!door.is_active().unwrap());
        door.release().done();
    }
}
