//! Sizes and rates as people read them.

/// Human-readable size with binary units, e.g. `8.0 GiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A data rate. Operators give MB/s (10^6 bytes per second); the state machines count bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rate {
    bytes_per_sec: u64,
}

impl Rate {
    /// What a sender uses when nobody sets a ceiling: about a 10 GbE link's payload.
    pub const DEFAULT_CEILING: Rate = Rate::from_bytes_per_sec(1_000_000_000);
    /// The lowest rate a session slows down to for a machine that loses most datagrams, unless
    /// set: 10 MB/s, what a 100 Mbit NIC still takes in. A slower machine is dropped rather
    /// than slowing a room of gigabit machines more than about tenfold.
    pub const DEFAULT_FLOOR: Rate = Rate::from_bytes_per_sec(10_000_000);

    pub const fn from_bytes_per_sec(bytes_per_sec: u64) -> Self {
        Self { bytes_per_sec }
    }

    /// `mbps` megabytes (10^6 bytes) per second; negative or NaN is no rate at all.
    pub fn from_mbps(mbps: f64) -> Self {
        Self::from_bytes_per_sec((mbps.max(0.0) * 1e6) as u64)
    }

    pub const fn bytes_per_sec(self) -> u64 {
        self.bytes_per_sec
    }

    pub fn mbps(self) -> f64 {
        self.bytes_per_sec as f64 / 1e6
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.0} MB/s", self.mbps())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rates_read_as_people_write_them() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(Rate::from_mbps(12.5).bytes_per_sec(), 12_500_000);
        assert_eq!(Rate::from_mbps(-3.0).bytes_per_sec(), 0);
        assert_eq!(Rate::from_mbps(1000.0), Rate::DEFAULT_CEILING);
        assert_eq!(Rate::from_mbps(3.0).to_string(), "3 MB/s");
    }
}
