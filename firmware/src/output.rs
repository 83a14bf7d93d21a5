//! Digital outputs with read-back: relays, valves, contactors.

use embedded_hal::delay::DelayNs;
use embedded_hal::digital::{ErrorKind, InputPin, OutputPin, StatefulOutputPin};

use crate::error::{Error, pin};

/// An output verified through its own output latch (`StatefulOutputPin`): catches a driver that
/// did not take the write, not a welded contact.
pub struct LatchedOutput<O> {
    out: O,
}

impl<O: StatefulOutputPin> LatchedOutput<O> {
    /// Wraps an output pin.
    pub fn new(out: O) -> Self {
        LatchedOutput { out }
    }

    /// Switches on or off and verifies the latch.
    pub fn set(&mut self, on: bool) -> Result<(), Error<ErrorKind>> {
        if on { self.out.set_high() } else { self.out.set_low() }.map_err(pin)?;
        let found = self.out.is_set_high().map_err(pin)?;
        if found != on {
            return Err(Error::Readback { wanted: on, found });
        }
        Ok(())
    }

    /// The state last written.
    pub fn get(&mut self) -> Result<bool, Error<ErrorKind>> {
        self.out.is_set_high().map_err(pin)
    }

    /// Gives the pin back.
    pub fn release(self) -> O {
        self.out
    }
}

/// A pin that is both output and input (a Linux GPIO line can be read while driven), read back
/// through its input side: the level actually on the line, not a remembered value.
pub struct ReadBackPin<P>(pub P);

impl<P: embedded_hal::digital::ErrorType> embedded_hal::digital::ErrorType for ReadBackPin<P> {
    type Error = P::Error;
}

impl<P: OutputPin> OutputPin for ReadBackPin<P> {
    fn set_low(&mut self) -> Result<(), P::Error> {
        self.0.set_low()
    }
    fn set_high(&mut self) -> Result<(), P::Error> {
        self.0.set_high()
    }
}

impl<P: OutputPin + InputPin> StatefulOutputPin for ReadBackPin<P> {
    fn is_set_high(&mut self) -> Result<bool, P::Error> {
        self.0.is_high()
    }
    fn is_set_low(&mut self) -> Result<bool, P::Error> {
        self.0.is_low()
    }
}

/// An output verified through a separate feedback input (an auxiliary contact or a position
/// switch): catches welded contacts, broken coils and stuck valves.
pub struct FeedbackOutput<O, F> {
    out: O,
    feedback: F,
    /// Feedback reads low when the output is on.
    inverted: bool,
    /// Time the actuator needs to move before its feedback is valid.
    settle_ms: u32,
}

impl<O: OutputPin, F: InputPin> FeedbackOutput<O, F> {
    /// Wraps an output and its feedback input.
    pub fn new(out: O, feedback: F, inverted: bool, settle_ms: u32) -> Self {
        FeedbackOutput {
            out,
            feedback,
            inverted,
            settle_ms,
        }
    }

    /// Switches on or off, waits for the actuator to settle, and verifies the feedback.
    pub fn set(&mut self, on: bool, delay: &mut impl DelayNs) -> Result<(), Error<ErrorKind>> {
        if on { self.out.set_high() } else { self.out.set_low() }.map_err(pin)?;
        delay.delay_ms(self.settle_ms);
        let found = self.get()?;
        if found != on {
            return Err(Error::Readback { wanted: on, found });
        }
        Ok(())
    }

    /// The state the feedback reports.
    pub fn get(&mut self) -> Result<bool, Error<ErrorKind>> {
        let high = self.feedback.is_high().map_err(pin)?;
        Ok(high != self.inverted)
    }

    /// Gives the pins back.
    pub fn release(self) -> (O, F) {
        (self.out, self.feedback)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal_mock::eh1::delay::NoopDelay;
    use embedded_hal_mock::eh1::digital::{Mock as PinMock, State, Transaction as T};

    #[test]
    fn feedback_confirms_the_write() {
        let out = PinMock::new(&[T::set(State::High)]);
        let fb = PinMock::new(&[T::get(State::High)]);
        let mut valve = FeedbackOutput::new(out, fb, false, 50);
        valve.set(true, &mut NoopDelay).unwrap();
        let (mut out, mut fb) = valve.release();
        out.done();
        fb.done();
    }

    #[test]
    fn welded_contact_is_a_readback_error() {
        let out = PinMock::new(&[T::set(State::Low)]);
        // Inverted feedback: low means on, so a low read after switching off means still on.
        let fb = PinMock::new(&[T::get(State::Low)]);
        let mut relay = FeedbackOutput::new(out, fb, true, 0);
        assert_eq!(
            relay.set(false, &mut NoopDelay),
            Err(Error::Readback {
                wanted: false,
                found: true
            })
        );
        let (mut out, mut fb) = relay.release();
        out.done();
        fb.done();
    }

    #[test]
    fn latch_readback() {
        let out = PinMock::new(&[T::set(State::High), T::get_state(State::High)]);
        let mut o = LatchedOutput::new(out);
        o.set(true).unwrap();
        o.release().done();
    }
}
