//! The used map: sorted, merged byte ranges.

use std::ops::Range;

/// The byte ranges of a disk that must be copied: sorted, non-overlapping, non-adjacent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsedMap {
    ranges: Vec<Range<u64>>,
}

impl UsedMap {
    /// The used ranges, sorted and merged.
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }

    /// The number of used bytes.
    pub fn used_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// Whether any byte of `range` is used.
    pub fn overlaps(&self, range: Range<u64>) -> bool {
        // The first used range ending after range.start.
        let i = self.ranges.partition_point(|r| r.end <= range.start);
        self.ranges.get(i).is_some_and(|r| r.start < range.end)
    }

    /// For each chunk of `chunk_size` bytes of a disk of `disk_size` bytes (the last one may be
    /// short), whether it overlaps a used range. A `chunk_size` of 0 gives an empty vector.
    pub fn chunks(&self, disk_size: u64, chunk_size: u32) -> Vec<bool> {
        let chunk = u64::from(chunk_size);
        if chunk == 0 {
            return Vec::new();
        }
        let count = disk_size.div_ceil(chunk);
        let mut out = vec![false; usize::try_from(count).unwrap_or(usize::MAX)];
        for r in &self.ranges {
            let end = r.end.min(disk_size);
            if r.start >= end {
                continue;
            }
            let first = r.start / chunk;
            let last = (end - 1) / chunk;
            for i in first..=last {
                if let Some(c) = usize::try_from(i).ok().and_then(|i| out.get_mut(i)) {
                    *c = true;
                }
            }
        }
        out
    }

    /// The map of the whole disk.
    pub(crate) fn whole(disk_size: u64) -> Self {
        let mut b = RangeBuilder::new(0);
        b.add(0, disk_size);
        b.finish()
    }
}

/// Collects ranges, merging as it goes: ranges that overlap, touch, or are separated by less than
/// `merge_gap` bytes become one. Adding in ascending order keeps memory at the merged size.
#[derive(Debug)]
pub(crate) struct RangeBuilder {
    ranges: Vec<Range<u64>>,
    merge_gap: u64,
    sorted: bool,
}

impl RangeBuilder {
    pub(crate) fn new(merge_gap: u64) -> Self {
        RangeBuilder {
            ranges: Vec::new(),
            merge_gap,
            sorted: true,
        }
    }

    /// Adds `start..end` (empty ranges are ignored).
    pub(crate) fn add(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        if let Some(last) = self.ranges.last_mut() {
            if start >= last.start && start <= last.end.saturating_add(self.merge_gap) {
                last.end = last.end.max(end);
                return;
            }
            if start < last.start {
                self.sorted = false;
            }
        }
        self.ranges.push(start..end);
    }

    pub(crate) fn extend(&mut self, ranges: &[Range<u64>]) {
        for r in ranges {
            self.add(r.start, r.end);
        }
    }

    pub(crate) fn finish(mut self) -> UsedMap {
        if !self.sorted {
            self.ranges.sort_unstable_by_key(|r| r.start);
            let mut merged: Vec<Range<u64>> = Vec::with_capacity(self.ranges.len());
            for r in self.ranges {
                match merged.last_mut() {
                    Some(last) if r.start <= last.end.saturating_add(self.merge_gap) => {
                        last.end = last.end.max(r.end);
                    }
                    _ => merged.push(r),
                }
            }
            self.ranges = merged;
        }
        UsedMap {
            ranges: self.ranges,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_and_sorts() {
        let mut b = RangeBuilder::new(0);
        b.add(10, 20);
        b.add(20, 30);
        b.add(5, 8);
        b.add(7, 12);
        b.add(40, 40);
        b.add(50, 60);
        let m = b.finish();
        assert_eq!(m.ranges(), &[5..30, 50..60]);
        assert_eq!(m.used_bytes(), 35);
        assert!(m.overlaps(29..31));
        assert!(!m.overlaps(30..50));
        assert!(m.overlaps(0..6));
    }

    #[test]
    fn merge_gap() {
        let mut b = RangeBuilder::new(10);
        b.add(0, 10);
        b.add(20, 30);
        b.add(41, 50);
        assert_eq!(b.finish().ranges(), &[0..30, 41..50]);
    }

    #[test]
    fn chunks() {
        let mut b = RangeBuilder::new(0);
        b.add(0, 1);
        b.add(2048, 2049);
        b.add(5000, 9000);
        let m = b.finish();
        assert_eq!(m.chunks(5000, 1024), vec![true, false, true, false, false]);
        assert_eq!(m.chunks(0, 1024), Vec::<bool>::new());
        assert_eq!(m.chunks(10, 0), Vec::<bool>::new());
        assert_eq!(m.chunks(10_000, 4096), vec![true, true, true]);
    }
}

/// Adds the runs of set bits among the first `nbits` bits of `bitmap` (least significant bit
/// first), bit `i` standing for the `unit` bytes at `base + i * unit`. Bits past the end of a
/// too-short bitmap count as set (used).
pub(crate) fn add_bitmap(bitmap: &[u8], nbits: u64, base: u64, unit: u64, out: &mut RangeBuilder) {
    let at = |bit: u64| base.saturating_add(bit.saturating_mul(unit));
    let mut run: Option<u64> = None;
    let mut bit = 0u64;
    for &byte in bitmap {
        if bit >= nbits {
            break;
        }
        let n = (nbits - bit).min(8);
        if n == 8 && (byte == 0 || byte == 0xFF) {
            match (byte, run) {
                (0, Some(s)) => {
                    out.add(at(s), at(bit));
                    run = None;
                }
                (0xFF, None) => run = Some(bit),
                _ => {}
            }
        } else {
            for j in 0..n {
                let set = byte >> j & 1 == 1;
                match (set, run) {
                    (true, None) => run = Some(bit + j),
                    (false, Some(s)) => {
                        out.add(at(s), at(bit + j));
                        run = None;
                    }
                    _ => {}
                }
            }
        }
        bit += n;
    }
    if bit < nbits {
        // Missing bits: used.
        run = run.or(Some(bit));
        bit = nbits;
    }
    if let Some(s) = run {
        out.add(at(s), at(bit));
    }
}

#[cfg(test)]
mod bitmap_tests {
    use super::*;

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn bitmap_runs() {
        let mut b = RangeBuilder::new(0);
        // bits 0,1, 8..16, 17; 20 bits only.
        add_bitmap(&[0b0000_0011, 0xFF, 0b1111_0010], 20, 1000, 10, &mut b);
        assert_eq!(b.finish().ranges(), &[1000..1020, 1080..1160, 1170..1180]);
        let mut b = RangeBuilder::new(0);
        add_bitmap(&[0xFF], 12, 0, 1, &mut b);
        assert_eq!(b.finish().ranges(), [0..12].as_slice());
        let mut b = RangeBuilder::new(0);
        add_bitmap(&[0x00, 0x80], 16, 0, 1, &mut b);
        assert_eq!(b.finish().ranges(), [15..16].as_slice());
    }
}
