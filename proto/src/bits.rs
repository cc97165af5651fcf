//! A fixed-size bit set for block maps.

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BitSet {
    words: Vec<u64>,
    len: usize,
}

impl BitSet {
    pub fn new(len: usize) -> Self {
        Self {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }

    pub fn full(len: usize) -> Self {
        let mut set = Self::new(len);
        for i in 0..len {
            set.insert(i);
        }
        set
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    pub fn contains(&self, i: usize) -> bool {
        i < self.len && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; returns whether it was newly set. Out-of-range bits are ignored.
    pub fn insert(&mut self, i: usize) -> bool {
        if i >= self.len {
            return false;
        }
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        let new = self.words[word] & bit == 0;
        self.words[word] |= bit;
        new
    }

    pub fn remove(&mut self, i: usize) {
        if i < self.len {
            self.words[i / 64] &= !(1 << (i % 64));
        }
    }

    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.len).filter(|&i| self.contains(i))
    }

    pub fn first(&self) -> Option<usize> {
        self.words
            .iter()
            .enumerate()
            .find(|(_, &w)| w != 0)
            .map(|(i, w)| i * 64 + w.trailing_zeros() as usize)
            .filter(|&i| i < self.len)
    }

    /// Adds `other`'s bits; returns how many were not set before.
    pub fn union_with(&mut self, other: &BitSet) -> usize {
        let mut added = 0;
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            added += (b & !*a).count_ones() as usize;
            *a |= b;
        }
        added
    }

    /// Little-endian bit order within bytes: bit i is byte i/8, bit i%8.
    pub fn to_bytes(&self) -> Vec<u8> {
        (0..self.len.div_ceil(8))
            .map(|byte| (self.words[byte / 8] >> ((byte % 8) * 8)) as u8)
            .collect()
    }

    /// The inverse of [`BitSet::to_bytes`]; bits beyond `len` are dropped.
    pub fn from_bytes(bytes: &[u8], len: usize) -> Self {
        let mut set = Self::new(len);
        for (byte_index, byte) in bytes.iter().enumerate().take(len.div_ceil(8)) {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    set.insert(byte_index * 8 + bit);
                }
            }
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_operations_and_byte_round_trip() {
        let mut set = BitSet::new(745);
        assert!(set.is_empty());
        assert!(set.insert(0) && set.insert(64) && set.insert(744));
        assert!(!set.insert(64));
        assert!(!set.insert(745), "out of range");
        assert_eq!(set.count(), 3);
        assert_eq!(set.first(), Some(0));
        assert_eq!(set.iter().collect::<Vec<_>>(), [0, 64, 744]);
        let bytes = set.to_bytes();
        assert_eq!(bytes.len(), 94);
        assert_eq!(BitSet::from_bytes(&bytes, 745), set);
        set.remove(0);
        assert_eq!(set.first(), Some(64));
        let mut other = BitSet::new(745);
        other.insert(1);
        set.union_with(&other);
        assert_eq!(set.count(), 3);
        assert_eq!(BitSet::full(70).count(), 70);
    }
}
