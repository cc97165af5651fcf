//! The sender's pacing: a token bucket that releases bytes at the current rate, and the rate
//! itself, raised step by step towards the ceiling while nobody complains and cut when a
//! receiver's socket overflows (additive-ish increase, multiplicative decrease).
//!
//! Increases and decreases keep separate clocks. A decrease may follow any increase at once — the
//! signal that the network cannot keep up must never be swallowed because the rate just rose —
//! and after a decrease the rate holds for a while before it climbs again.

use std::time::{Duration, Instant};

/// How often the rate may rise, and how often it may fall.
const STEP: Duration = Duration::from_millis(100);
/// After a decrease the rate stays put this long, so the cut can take effect before it is undone.
const HOLD_AFTER_DECREASE: Duration = Duration::from_millis(300);
/// The lowest rate a cut can reach: 1 MB/s.
const MIN_RATE: f64 = 1_000_000.0;

#[derive(Debug, Clone)]
pub struct Pacer {
    rate: f64,
    max_rate: f64,
    tokens: f64,
    burst: f64,
    last_refill: Instant,
    last_increase: Instant,
    last_decrease: Option<Instant>,
}

impl Pacer {
    /// Starts at `initial` bytes per second (at most `max`), with a bucket of `burst` bytes.
    pub fn new(initial: u64, max: u64, burst: usize, now: Instant) -> Self {
        let max_rate = (max as f64).max(MIN_RATE);
        Self {
            rate: (initial as f64).clamp(MIN_RATE, max_rate),
            max_rate,
            tokens: burst as f64,
            burst: burst as f64,
            last_refill: now,
            last_increase: now,
            last_decrease: None,
        }
    }

    /// The current rate in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    pub fn max_rate(&self) -> u64 {
        self.max_rate as u64
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now
            .saturating_duration_since(self.last_refill)
            .as_secs_f64();
        self.last_refill = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        let held = self
            .last_decrease
            .is_some_and(|at| now.saturating_duration_since(at) < HOLD_AFTER_DECREASE);
        if !held && now.saturating_duration_since(self.last_increase) >= STEP {
            // A quarter more, and at least a fiftieth of the ceiling: from any start the ceiling
            // is reached within about a second.
            self.rate = (self.rate * 1.25)
                .max(self.rate + self.max_rate / 50.0)
                .min(self.max_rate);
            self.last_increase = now;
        }
    }

    /// Takes `len` bytes from the bucket if they are there now.
    pub fn try_send(&mut self, len: usize, now: Instant) -> bool {
        self.refill(now);
        if self.tokens < len as f64 {
            return false;
        }
        self.tokens -= len as f64;
        true
    }

    /// When `len` bytes will be in the bucket (now or in the past if they already are).
    pub fn ready_at(&self, len: usize) -> Instant {
        let missing = len as f64 - self.tokens;
        if missing <= 0.0 {
            return self.last_refill;
        }
        self.last_refill + Duration::from_secs_f64(missing / self.rate)
    }

    /// A receiver lost data for lack of buffer space: cut the rate by a quarter, at most once per
    /// step.
    pub fn on_overflow(&mut self, now: Instant) {
        if self
            .last_decrease
            .is_some_and(|at| now.saturating_duration_since(at) < STEP)
        {
            return;
        }
        self.rate = (self.rate * 0.75).max(MIN_RATE);
        self.last_decrease = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    #[test]
    fn releases_bytes_at_the_rate_and_no_faster() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(10 * MB, 10 * MB, 15_000, t0);
        let mut sent = 0usize;
        let mut now = t0;
        for _ in 0..100_000 {
            now += Duration::from_micros(10);
            while pacer.try_send(1500, now) {
                sent += 1500;
            }
        }
        // One second at 10 MB/s plus the initial burst.
        assert!((10_000_000..=10_020_000).contains(&sent), "{sent}");
        let ready = pacer.ready_at(1500);
        assert!(ready >= now && ready <= now + Duration::from_micros(160));
    }

    #[test]
    fn climbs_to_the_ceiling_within_about_a_second() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(10 * MB, 100 * MB, 1500, t0);
        for ms in (0..=1200).step_by(10) {
            pacer.try_send(0, t0 + Duration::from_millis(ms));
        }
        assert_eq!(pacer.rate(), 100 * MB);
    }

    #[test]
    fn an_overflow_right_after_an_increase_still_cuts_the_rate() {
        // The rate rises every 100 ms while sending. A report of overflows that lands just after a
        // rise must cut it; an earlier version shared one clock and dropped such reports.
        let t0 = Instant::now();
        let mut pacer = Pacer::new(100 * MB, 100 * MB, 1500, t0);
        let mut now = t0;
        for _ in 0..40 {
            now += Duration::from_millis(100);
            pacer.try_send(1500, now);
            pacer.on_overflow(now + Duration::from_millis(1));
            now += Duration::from_millis(1);
        }
        assert!(
            pacer.rate() < 5 * MB,
            "rate {} after 40 overflow reports",
            pacer.rate()
        );
        assert!(pacer.rate() >= MIN_RATE as u64);
    }

    #[test]
    fn cuts_at_most_once_per_step_and_holds_before_rising_again() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(80 * MB, 80 * MB, 1500, t0);
        pacer.on_overflow(t0);
        pacer.on_overflow(t0 + Duration::from_millis(50));
        assert_eq!(
            pacer.rate(),
            60 * MB,
            "two reports within one step cut once"
        );
        pacer.try_send(0, t0 + Duration::from_millis(200));
        assert_eq!(pacer.rate(), 60 * MB, "held after the cut");
        pacer.try_send(0, t0 + Duration::from_millis(400));
        assert!(pacer.rate() > 60 * MB, "rises again after the hold");
    }
}
