//! Whether a peer master's scan compresses its next batch of chunks. Pure: the scan feeds it
//! what each compressed batch cost (CPU seconds, measured in the encoder threads) and saved
//! (bytes), and it answers from those measurements and a link rate, so both regimes are tested
//! without a disk, threads or a clock.
//!
//! Compressing a batch pays when the link time it saves is more than the wall time it costs on
//! all cores: `saved / link_rate > cpu_seconds / cores`. Per raw byte, with `share` the part of
//! the bytes compression removes and `cost` the CPU seconds per byte: `share / link_rate > cost /
//! cores`. Reading and hashing are not part of the cost: the scan does them anyway.

/// After this many batches left raw because compressing did not pay, one batch compresses again
/// to measure (content and load change along a disk).
pub const PROBE_EVERY: u32 = 16;

/// Weight of the newest batch in the running averages: content changes along a disk (a region
/// of text, then one of media files), so old batches count for little after a few new ones.
const NEWEST_WEIGHT: f64 = 0.3;

/// What compressing one batch cost and saved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchCost {
    /// Raw bytes of the batch's data chunks (zero chunks cost nothing and are not counted).
    pub raw_bytes: u64,
    /// Raw bytes minus the bytes that now travel (frames kept, raw chunks that did not shrink).
    pub saved_bytes: u64,
    /// CPU seconds the encoder threads spent compressing (sampling included), all threads
    /// added up.
    pub cpu_seconds: f64,
}

/// What the scan does with its next batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Compress: it pays, or nothing was measured yet.
    Compress,
    /// Compress to measure again after [`PROBE_EVERY`] raw batches.
    Probe,
    /// Only hash: compressing costs more time than the link saves.
    Raw,
}

#[derive(Debug, Clone)]
pub struct WireJudge {
    cores: f64,
    /// Bytes per second the link carries.
    link_rate: f64,
    /// Running averages over compressed batches: CPU seconds per raw byte, share saved.
    cost_per_byte: Option<f64>,
    saved_share: Option<f64>,
    raw_since_probe: u32,
}

impl WireJudge {
    /// `cores`: threads compressing at once; `link_rate`: bytes per second the link carries.
    pub fn new(cores: usize, link_rate: u64) -> Self {
        Self {
            cores: cores.max(1) as f64,
            link_rate: link_rate.max(1) as f64,
            cost_per_byte: None,
            saved_share: None,
            raw_since_probe: 0,
        }
    }

    /// Another link rate (bytes per second) for what was measured so far. Only tests change it:
    /// the master compresses before its session starts, so no rate the session achieves can
    /// reach the judge yet (that needs each chunk's form in its datagrams).
    #[cfg(test)]
    fn set_link_rate(&mut self, link_rate: u64) {
        self.link_rate = link_rate.max(1) as f64;
    }

    /// Whether compressing pays by what was measured so far (it does until measured otherwise).
    pub fn pays(&self) -> bool {
        match (self.cost_per_byte, self.saved_share) {
            (Some(cost), Some(share)) => share / self.link_rate > cost / self.cores,
            _ => true,
        }
    }

    /// The link rate below which compressing pays, by what was measured so far (bytes per
    /// second of raw data): the rate at which the link time saved equals the time spent.
    pub fn break_even_rate(&self) -> Option<f64> {
        let (cost, share) = (self.cost_per_byte?, self.saved_share?);
        Some(if cost > 0.0 {
            share * self.cores / cost
        } else {
            f64::INFINITY
        })
    }

    /// What to do with the next batch; call once per batch.
    pub fn verdict(&mut self) -> Verdict {
        if self.pays() {
            self.raw_since_probe = 0;
            Verdict::Compress
        } else if self.raw_since_probe >= PROBE_EVERY {
            self.raw_since_probe = 0;
            Verdict::Probe
        } else {
            self.raw_since_probe += 1;
            Verdict::Raw
        }
    }

    /// What a compressed batch cost and saved. A batch of zero chunks tells nothing.
    pub fn observe(&mut self, batch: BatchCost) {
        if batch.raw_bytes == 0 {
            return;
        }
        let raw = batch.raw_bytes as f64;
        let cost = batch.cpu_seconds.max(0.0) / raw;
        let share = (batch.saved_bytes.min(batch.raw_bytes)) as f64 / raw;
        let blend = |old: Option<f64>, new: f64| {
            Some(old.map_or(new, |old| old + NEWEST_WEIGHT * (new - old)))
        };
        self.cost_per_byte = blend(self.cost_per_byte, cost);
        self.saved_share = blend(self.saved_share, share);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Text-like content: compressing removes 90 % at 400 MB/s per core.
    fn text(batch_mib: u64) -> BatchCost {
        BatchCost {
            raw_bytes: batch_mib * MIB,
            saved_bytes: batch_mib * MIB * 9 / 10,
            cpu_seconds: (batch_mib * MIB) as f64 / 400e6,
        }
    }

    /// Random content: nothing saved, only the sampling spent.
    fn random(batch_mib: u64) -> BatchCost {
        BatchCost {
            raw_bytes: batch_mib * MIB,
            saved_bytes: 0,
            cpu_seconds: (batch_mib * MIB) as f64 / 8e9,
        }
    }

    fn run(judge: &mut WireJudge, batches: usize, content: fn(u64) -> BatchCost) -> Vec<Verdict> {
        (0..batches)
            .map(|_| {
                let verdict = judge.verdict();
                if verdict != Verdict::Raw {
                    judge.observe(content(4));
                }
                verdict
            })
            .collect()
    }

    #[test]
    fn when_the_link_is_the_limit_every_batch_compresses() {
        // 2 cores at 400 MB/s saving 90 %: break-even at 720 MB/s; a 1 Gbit/s link is far below.
        let mut judge = WireJudge::new(2, 125_000_000);
        let verdicts = run(&mut judge, 100, text);
        assert!(
            verdicts.iter().all(|v| *v == Verdict::Compress),
            "{verdicts:?}"
        );
        let break_even = judge.break_even_rate().unwrap();
        assert!((700e6..740e6).contains(&break_even), "{break_even}");
    }

    #[test]
    fn when_the_cpu_is_the_limit_batches_go_raw_and_probe_now_and_then() {
        // A 10 Gbit/s link the session fills: one core compressing loses time.
        let mut judge = WireJudge::new(1, 1_250_000_000);
        let verdicts = run(&mut judge, 1 + 3 * (PROBE_EVERY as usize + 1), text);
        assert_eq!(verdicts[0], Verdict::Compress, "nothing measured yet");
        let raw = verdicts.iter().filter(|v| **v == Verdict::Raw).count();
        let probes = verdicts.iter().filter(|v| **v == Verdict::Probe).count();
        assert_eq!(raw, 3 * PROBE_EVERY as usize, "{verdicts:?}");
        assert_eq!(probes, 3, "{verdicts:?}");
    }

    #[test]
    fn the_same_content_flips_regime_with_the_link_rate() {
        let mut judge = WireJudge::new(2, 125_000_000);
        judge.observe(text(4));
        assert!(judge.pays());
        judge.set_link_rate(10_000_000_000);
        assert!(!judge.pays());
        assert_eq!(judge.verdict(), Verdict::Raw);
        judge.set_link_rate(125_000_000);
        assert_eq!(judge.verdict(), Verdict::Compress);
    }

    #[test]
    fn random_content_goes_raw_and_text_after_it_compresses_again_at_a_probe() {
        let mut judge = WireJudge::new(2, 125_000_000);
        let verdicts = run(&mut judge, 10, random);
        assert_eq!(verdicts[0], Verdict::Compress);
        assert!(
            verdicts[1..].iter().all(|v| *v == Verdict::Raw),
            "{verdicts:?}"
        );
        // Text begins: the probe due after PROBE_EVERY raw batches measures it and compression
        // goes on from there.
        let verdicts = run(&mut judge, 2 * PROBE_EVERY as usize, text);
        let probe = verdicts.iter().position(|v| *v == Verdict::Probe).unwrap();
        assert!(
            verdicts[probe + 1..]
                .iter()
                .all(|v| *v == Verdict::Compress),
            "{verdicts:?}"
        );
    }

    #[test]
    fn a_mixed_disk_compresses_on_a_gigabit_link() {
        // The bench's disk-like content: every batch holds text and random chunks.
        let mut judge = WireJudge::new(2, 125_000_000);
        for _ in 0..50 {
            assert_eq!(judge.verdict(), Verdict::Compress);
            let (t, r) = (text(2), random(2));
            judge.observe(BatchCost {
                raw_bytes: t.raw_bytes + r.raw_bytes,
                saved_bytes: t.saved_bytes,
                cpu_seconds: t.cpu_seconds + r.cpu_seconds,
            });
        }
    }

    #[test]
    fn batches_of_zeros_or_nonsense_measure_nothing() {
        let mut judge = WireJudge::new(0, 0);
        judge.observe(BatchCost {
            raw_bytes: 0,
            saved_bytes: 5,
            cpu_seconds: 1.0,
        });
        assert!(judge.pays());
        assert_eq!(judge.break_even_rate(), None);
        // More saved than raw, negative time: clamped, no panic, no NaN.
        judge.observe(BatchCost {
            raw_bytes: 10,
            saved_bytes: 20,
            cpu_seconds: -1.0,
        });
        assert!(judge.pays());
        assert_eq!(judge.break_even_rate(), Some(f64::INFINITY));
    }
}
