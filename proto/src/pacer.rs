//! The sender's pacing: a token bucket that releases bytes at the current rate, and the rate
//! itself, raised step by step towards the ceiling while nobody complains and cut when a
//! receiver's socket overflows (additive-ish increase, multiplicative decrease).
//!
//! Increases and decreases keep separate clocks. A decrease may follow any increase at once — the
//! signal that the network cannot keep up must never be swallowed because the rate just rose —
//! and after a decrease the rate holds for a while before it climbs again.
//!
//! A receiver that loses most datagrams (a slow NIC drops them before any socket sees them, so
//! no overflow is counted) is congestion too: the rate is cut to what that receiver took in, but
//! never below the floor, and above the rate of that cut it climbs only slowly (5 % per step)
//! until the congested receiver leaves, so it does not overshoot again at once.

use std::time::{Duration, Instant};

/// How often the rate may rise, and how often it may fall.
const STEP: Duration = Duration::from_millis(100);
/// After a decrease the rate stays put this long, so the cut can take effect before it is undone.
const HOLD_AFTER_DECREASE: Duration = Duration::from_millis(300);
/// The lowest rate a cut can reach: 1 MB/s.
pub const MIN_RATE: f64 = 1_000_000.0;
/// Above the rate of the last congestion cut, the rate grows by this factor per step.
const CAREFUL_GROWTH: f64 = 1.05;
/// A congestion cut aims this far below what the congested receiver took in.
const CONGESTION_MARGIN: f64 = 0.9;
/// A receiver's disk falling behind slows the session to this share of the disk's rate, so its
/// queue drains.
const DISK_MARGIN: f64 = 0.95;
/// A disk's limit lapses this long after the last report that named one (the disk caught up).
const DISK_LIMIT_LIFETIME: Duration = Duration::from_secs(1);
/// After a receiver's socket overflowed, the rate climbs fast again only to this fraction of the
/// rate that overflowed it, and carefully above: climbing straight back past it overflows the
/// receiver again and again, and every overflow costs repairs (an unshaped veth path sent 1.18x
/// the data that way).
const OVERFLOW_KNEE: f64 = 0.9;
/// The rate does not climb while the sender sends less than the rate divided by this: a sender
/// held back by its CPU or its disk would otherwise raise a rate it never reaches, and a cut from
/// that rate would not slow it down at all (on a loaded 2-core host the limit stood at 1000 MB/s
/// while 56 MB/s went out, and every overflow cut left it above what was sent).
const APP_LIMITED: f64 = 2.0;

#[derive(Debug, Clone)]
pub struct Pacer {
    rate: f64,
    max_rate: f64,
    /// Congestion cuts stop here (the session's floor).
    floor: f64,
    /// Above this the rate grows carefully: the rate of the last congestion cut, or the ceiling.
    careful_above: f64,
    /// Just below the rate at which a receiver's socket last overflowed: above it the rate grows
    /// carefully too (the ceiling when nothing overflowed).
    overflow_knee: f64,
    tokens: f64,
    burst: f64,
    last_refill: Instant,
    last_increase: Instant,
    last_decrease: Option<Instant>,
    /// Bytes released since `window_start`, for the rate really sent.
    window_bytes: f64,
    window_start: Instant,
    /// Bytes per second really sent over the last full window (0 until one passed with data).
    achieved: f64,
    /// The latest limit a receiver's disk set (see [`Pacer::on_disk_bound`]) and when: above it
    /// the rate grows carefully, until no receiver has said so for [`DISK_LIMIT_LIFETIME`].
    disk_limit: Option<(f64, Instant)>,
}

impl Pacer {
    /// Starts at `initial` bytes per second (at most `max`), with a bucket of `burst` bytes.
    /// Cuts for congestion stop at `floor` (at least [`MIN_RATE`], at most `max`).
    pub fn new(initial: u64, max: u64, floor: u64, burst: usize, now: Instant) -> Self {
        let max_rate = (max as f64).max(MIN_RATE);
        Self {
            rate: (initial as f64).clamp(MIN_RATE, max_rate),
            max_rate,
            floor: (floor as f64).clamp(MIN_RATE, max_rate),
            careful_above: max_rate,
            overflow_knee: max_rate,
            tokens: burst as f64,
            burst: burst as f64,
            last_refill: now,
            last_increase: now,
            last_decrease: None,
            window_bytes: 0.0,
            window_start: now,
            achieved: 0.0,
            disk_limit: None,
        }
    }

    /// The current rate in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    pub fn max_rate(&self) -> u64 {
        self.max_rate as u64
    }

    /// The lowest rate a congested receiver can bring the session to.
    pub fn floor(&self) -> u64 {
        self.floor as u64
    }

    /// Whether a congestion cut reached the floor (and the receivers that caused it are still
    /// there): the rate probes upwards from there, but cutting cannot help any more.
    pub fn floor_reached(&self) -> bool {
        self.careful_above <= self.floor
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now
            .saturating_duration_since(self.last_refill)
            .as_secs_f64();
        self.last_refill = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        let window = now.saturating_duration_since(self.window_start);
        if window >= STEP {
            self.achieved = self.window_bytes / window.as_secs_f64();
            self.window_bytes = 0.0;
            self.window_start = now;
        }
        // Held back by something else than the rate (CPU, disk, nothing to send): no climbing.
        let limited = self.achieved > 0.0 && self.rate > APP_LIMITED * self.achieved;
        let held = self
            .last_decrease
            .is_some_and(|at| now.saturating_duration_since(at) < HOLD_AFTER_DECREASE);
        if self
            .disk_limit
            .is_some_and(|(_, at)| now.saturating_duration_since(at) >= DISK_LIMIT_LIFETIME)
        {
            self.disk_limit = None;
        }
        if !held && !limited && now.saturating_duration_since(self.last_increase) >= STEP {
            let careful_above = self
                .careful_above
                .min(self.overflow_knee)
                .min(self.disk_limit.map_or(f64::MAX, |(limit, _)| limit));
            self.rate = if self.rate >= careful_above {
                // Past the rate a congested receiver took, or near the one that overflowed a
                // receiver: probe upwards gently.
                self.rate * CAREFUL_GROWTH
            } else {
                // A quarter more, and at least a fiftieth of the ceiling: from any start the
                // ceiling is reached within about a second.
                (self.rate * 1.25)
                    .max(self.rate + self.max_rate / 50.0)
                    .min(careful_above)
            }
            .min(self.max_rate);
            self.last_increase = now;
        }
    }

    /// The bucket's size in bytes: what may go out back to back.
    pub fn burst(&self) -> usize {
        self.burst as usize
    }

    /// Takes `len` bytes from the bucket if they are there now.
    pub fn try_send(&mut self, len: usize, now: Instant) -> bool {
        self.refill(now);
        if self.tokens < len as f64 {
            return false;
        }
        self.tokens -= len as f64;
        self.window_bytes += len as f64;
        true
    }

    /// The sender has nothing to send (between passes, waiting for requests): the time until
    /// it has again does not count towards the rate really sent. A window with idle time in it
    /// measures a trickle, and an overflow cut from that would drop the session to the minimum.
    pub fn idle(&mut self, now: Instant) {
        self.window_bytes = 0.0;
        self.window_start = now;
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
        // Cut from what was really sent when that was less than the rate: a cut of a rate the
        // sender does not reach would not slow it down.
        let base = if self.achieved > 0.0 {
            self.rate.min(self.achieved)
        } else {
            self.rate
        };
        self.overflow_knee = (base * OVERFLOW_KNEE).max(MIN_RATE);
        self.rate = (base * 0.75).max(MIN_RATE);
        self.last_decrease = Some(now);
    }

    /// A receiver lost most of what was sent while taking in `delivered` bytes per second: cut
    /// the rate to a little below that (by a quarter at least), not below the floor, at most
    /// once per step; then grow carefully above the new rate.
    pub fn on_congestion(&mut self, delivered: f64, now: Instant) {
        if self
            .last_decrease
            .is_some_and(|at| now.saturating_duration_since(at) < STEP)
        {
            return;
        }
        let target = (self.rate * 0.75).min(delivered * CONGESTION_MARGIN);
        self.rate = target.max(self.floor).min(self.rate);
        self.careful_above = self.rate;
        self.last_decrease = Some(now);
    }

    /// A receiver's disk writes only `disk_rate` bytes per second and its write queue is
    /// filling: go a little below that, and above it only carefully. Nothing was lost, so this
    /// is no quarter cut: the point is that the receiver never has to stop reading its socket
    /// (a receiver waiting for its disk overflows it, and every overflow costs repairs).
    ///
    /// Never below the session's floor: a disk slower than that is not waited for (its receiver's
    /// network loop then waits for it, its socket overflows and the usual cuts and drops apply).
    /// Trims keep their own clock and state: a receiver's disk hovering near its limit must not
    /// hold back the cuts another receiver's overflow or losses call for, nor make the floor
    /// look reached to the congestion rules.
    pub fn on_disk_bound(&mut self, disk_rate: f64, now: Instant) {
        let target = (disk_rate * DISK_MARGIN).max(self.floor);
        self.rate = self.rate.min(target);
        self.disk_limit = Some((target, now));
    }

    /// The congested receivers left: the rate may climb at full speed again.
    pub fn forget_congestion(&mut self) {
        self.careful_above = self.max_rate;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    #[test]
    fn releases_bytes_at_the_rate_and_no_faster() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(10 * MB, 10 * MB, MB, 15_000, t0);
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
        let mut pacer = Pacer::new(10 * MB, 100 * MB, MB, 1500, t0);
        for ms in (0..=1200).step_by(10) {
            pacer.try_send(0, t0 + Duration::from_millis(ms));
        }
        assert_eq!(pacer.rate(), 100 * MB);
    }

    #[test]
    fn a_disk_falling_behind_holds_the_rate_just_below_it_and_a_faster_one_changes_nothing() {
        let t0 = Instant::now();
        // A bucket that holds what 10 ms at the ceiling send, so the loops below are not what
        // holds the rate back.
        let mut pacer = Pacer::new(100 * MB, 100 * MB, 10 * MB, 2_000_000, t0);
        pacer.on_disk_bound(200e6, t0);
        assert_eq!(
            pacer.rate(),
            100 * MB,
            "a disk faster than the rate is no limit"
        );
        pacer.on_disk_bound(30e6, t0);
        assert_eq!(pacer.rate(), 28_500_000);
        // Sending on at the new rate while the limit stands (it lapses after a second without a
        // report): it may probe above the disk's rate only carefully, 5 % per step.
        let mut now = t0;
        for _ in 0..90 {
            now += Duration::from_millis(10);
            while pacer.try_send(1500, now) {}
        }
        assert!(
            pacer.rate() < 46 * MB,
            "climbed to {} B/s within 0.9 s",
            pacer.rate()
        );
        assert!(pacer.rate() >= 28_500_000);
        // A disk that says 1 kB/s holds the session at its floor, not below, and the trim
        // leaves the congestion rules alone: the floor is not "reached" for them, and an
        // overflow elsewhere right after a trim still cuts.
        pacer.on_disk_bound(1000.0, now);
        assert_eq!(pacer.rate(), 10 * MB);
        assert!(!pacer.floor_reached());
        pacer.on_overflow(now);
        assert!(pacer.rate() < 10 * MB, "the overflow's cut was swallowed");
    }

    #[test]
    fn a_disk_limit_lapses_once_no_receiver_repeats_it() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(100 * MB, 100 * MB, 10 * MB, 2_000_000, t0);
        pacer.on_disk_bound(20e6, t0);
        let mut now = t0;
        for _ in 0..300 {
            now += Duration::from_millis(10);
            while pacer.try_send(1500, now) {}
        }
        assert_eq!(pacer.rate(), 100 * MB, "the disk's limit never lapsed");
    }

    #[test]
    fn an_overflow_right_after_an_increase_still_cuts_the_rate() {
        // The rate rises every 100 ms while sending. A report of overflows that lands just after a
        // rise must cut it; an earlier version shared one clock and dropped such reports.
        let t0 = Instant::now();
        let mut pacer = Pacer::new(100 * MB, 100 * MB, MB, 1500, t0);
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
    fn after_an_overflow_the_rate_climbs_fast_to_just_below_it_then_gently() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(400 * MB, 1000 * MB, MB, 1500, t0);
        pacer.on_overflow(t0);
        assert_eq!(pacer.rate(), 300 * MB);
        // After the hold, fast (a quarter per step) up to 90 % of the rate that overflowed...
        for ms in (0..=300).step_by(10) {
            pacer.try_send(0, t0 + Duration::from_millis(ms));
        }
        assert_eq!(pacer.rate(), 360 * MB);
        // ...then 5 % per step: past the old rate within a few steps, not at once.
        pacer.try_send(0, t0 + Duration::from_millis(400));
        assert_eq!(pacer.rate(), 378 * MB);
        for ms in (400..=1300).step_by(10) {
            pacer.try_send(0, t0 + Duration::from_millis(ms));
        }
        let later = pacer.rate();
        assert!(
            (400 * MB..600 * MB).contains(&later),
            "{later} B/s a second after the overflow"
        );
    }

    #[test]
    fn a_sender_held_back_below_the_rate_neither_raises_it_nor_cuts_from_it() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(100 * MB, 1000 * MB, MB, 10_000_000, t0);
        // The sender's CPU lets out only 20 MB/s (2 MB per 100 ms step).
        let mut now = t0;
        for _ in 0..20 {
            now += Duration::from_millis(100);
            for _ in 0..20 {
                assert!(pacer.try_send(100_000, now));
            }
        }
        assert!(
            pacer.rate() <= 200 * MB,
            "the rate climbed to {} B/s while 20 MB/s went out",
            pacer.rate()
        );
        // A receiver overflows: the cut is from the 20 MB/s really sent.
        pacer.on_overflow(now);
        let cut = pacer.rate();
        assert!((14 * MB..=15 * MB).contains(&cut), "cut to {cut} B/s");
    }

    #[test]
    fn an_overflow_after_an_idle_spell_cuts_from_the_rate_not_from_a_trickle() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(100 * MB, 100 * MB, MB, 1_000_000, t0);
        // One datagram, then nothing to send for half a second (the sender waits for
        // requests), then one repair: 3 kB in 500 ms is not what this sender can send.
        assert!(pacer.try_send(1500, t0));
        pacer.idle(t0 + Duration::from_millis(1));
        pacer.idle(t0 + Duration::from_millis(499));
        assert!(pacer.try_send(1500, t0 + Duration::from_millis(500)));
        pacer.on_overflow(t0 + Duration::from_millis(500));
        let cut = pacer.rate();
        assert!((70 * MB..=80 * MB).contains(&cut), "cut to {cut} B/s");
    }

    #[test]
    fn cuts_at_most_once_per_step_and_holds_before_rising_again() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(80 * MB, 80 * MB, MB, 1500, t0);
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

    #[test]
    fn congestion_cuts_to_what_the_receiver_took_but_not_below_the_floor() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(100 * MB, 100 * MB, 5 * MB, 1500, t0);
        // The receiver took in 20 MB/s of the 100 sent: the rate goes just below that.
        pacer.on_congestion(20e6, t0);
        assert_eq!(pacer.rate(), 18 * MB);
        assert!(!pacer.floor_reached());
        // Far below the floor: the floor.
        pacer.on_congestion(1e6, t0 + Duration::from_millis(100));
        assert_eq!(pacer.rate(), 5 * MB);
        assert!(pacer.floor_reached());
        pacer.on_congestion(1e6, t0 + Duration::from_millis(200));
        assert_eq!(pacer.rate(), 5 * MB);
    }

    #[test]
    fn after_congestion_the_rate_grows_carefully_until_the_receiver_leaves() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(100 * MB, 100 * MB, MB, 1500, t0);
        pacer.on_congestion(10e6, t0);
        assert_eq!(pacer.rate(), 9 * MB);
        // One second after the hold: 5 % per step, not a quarter.
        for ms in (0..=1300).step_by(10) {
            pacer.try_send(0, t0 + Duration::from_millis(ms));
        }
        let careful = pacer.rate();
        assert!(
            (14 * MB..16 * MB).contains(&careful),
            "{careful} B/s after a second of careful growth"
        );
        pacer.forget_congestion();
        for ms in (1300..=2600).step_by(10) {
            pacer.try_send(0, t0 + Duration::from_millis(ms));
        }
        assert_eq!(pacer.rate(), 100 * MB);
    }
}
