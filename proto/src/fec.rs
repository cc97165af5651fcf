//! Forward error correction for repairs: Reed–Solomon parity over the blocks of one chunk.
//!
//! A chunk of `n` blocks has [`recovery_count`]`(n)` parity shards, each one block long (the
//! chunk's short last block is padded with zeros for the code). Any `n` of the `n + R` shards
//! rebuild the chunk, so one parity datagram repairs a *different* lost block at every receiver:
//! the sender sends, per chunk, as many parity shards as the neediest receiver lacks instead of
//! the union of everybody's losses. Receivers missing more than `R` data blocks of a chunk ask
//! for exact blocks instead (see `receiver.rs`), so parity never has to cover a whole chunk.
//!
//! The code is `reed-solomon-simd` (Leopard-style, O(n log n), SIMD): measured on the 2-core
//! development machine for a 1 MiB chunk of 745 blocks with 186 parity shards, about 1 ms to
//! encode and 3 ms to decode 50 lost blocks, against 3 ms each for RaptorQ (`raptorq`) —
//! see the README's "Repairs with parity".

use crate::bits::BitSet;
use std::collections::{BTreeMap, HashMap, VecDeque};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FecError {
    #[error("encoding parity for {blocks} blocks of {block_size} bytes: {why}")]
    Encode {
        blocks: usize,
        block_size: usize,
        why: String,
    },
    #[error("rebuilding {missing} missing blocks from {parity} parity shards: {why}")]
    Decode {
        missing: usize,
        parity: usize,
        why: String,
    },
    #[error("{have} data blocks and {parity} parity shards cannot rebuild {blocks} blocks")]
    TooFew {
        blocks: usize,
        have: usize,
        parity: usize,
    },
}

/// Most data blocks a chunk may have for parity (the code's limit for `n + R` shards).
const MAX_BLOCKS: usize = 32768;

/// Parity shards a chunk of `blocks` blocks has: a quarter of its blocks. At the losses parity
/// is meant for (a few percent per receiver) a round needs far fewer; a receiver missing more
/// than this asks for exact blocks. A larger `R` costs encoding and decoding time for every
/// chunk, a smaller one pushes more receivers to exact repairs.
pub fn recovery_count(blocks: usize) -> usize {
    blocks.div_ceil(4).max(1)
}

/// Whether chunks of `blocks` blocks of `block_size` bytes can carry parity: the code needs an
/// even shard size and at most [`MAX_BLOCKS`] data shards.
pub fn usable(blocks: usize, block_size: usize) -> bool {
    (1..=MAX_BLOCKS).contains(&blocks) && block_size >= 2 && block_size.is_multiple_of(2)
}

/// Block `index` of `bytes` (a chunk as it travels), padded with zeros to `block_size`.
fn padded_block(bytes: &[u8], index: usize, block_size: usize) -> std::borrow::Cow<'_, [u8]> {
    let start = index * block_size;
    let end = (start + block_size).min(bytes.len());
    let block = bytes.get(start..end).unwrap_or(&[]);
    if block.len() == block_size {
        std::borrow::Cow::Borrowed(block)
    } else {
        let mut padded = block.to_vec();
        padded.resize(block_size, 0);
        std::borrow::Cow::Owned(padded)
    }
}

/// Every parity shard of a chunk (`bytes` as it travels), in index order.
pub fn encode(bytes: &[u8], block_size: usize) -> Result<Vec<Vec<u8>>, FecError> {
    Coder::default().encode(bytes, block_size)
}

/// A Reed–Solomon encoder and decoder kept from one chunk to the next, so a writer thread or a
/// sender does not allocate and zero fresh work buffers (1.4 MB for a 1 MiB chunk of 1408-byte
/// blocks) for every chunk. In a micro-measurement on the loaded 2-core machine a kept decoder
/// rebuilt a chunk in 4–8 ms against 11–16 ms for a fresh one; in the benchmark (8 receivers ×
/// 5 %) it changed neither the receivers' CPU nor the speed measurably: the decoding itself,
/// an FFT over the whole chunk whatever the number of lost blocks, is what costs.
#[derive(Default)]
pub struct Coder {
    encoder: Option<reed_solomon_simd::ReedSolomonEncoder>,
    decoder: Option<reed_solomon_simd::ReedSolomonDecoder>,
    /// Encoders and decoders made (not reset): for tests.
    pub made: u32,
}

impl std::fmt::Debug for Coder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coder")
            .field("encoder", &self.encoder.is_some())
            .field("decoder", &self.decoder.is_some())
            .field("made", &self.made)
            .finish()
    }
}

impl Coder {
    /// Every parity shard of a chunk (`bytes` as it travels), in index order.
    pub fn encode(&mut self, bytes: &[u8], block_size: usize) -> Result<Vec<Vec<u8>>, FecError> {
        let blocks = bytes.len().div_ceil(block_size);
        let fail = |why: String| FecError::Encode {
            blocks,
            block_size,
            why,
        };
        if !usable(blocks, block_size) {
            return Err(fail("unsupported geometry".into()));
        }
        let recovery = recovery_count(blocks);
        let encoder = match &mut self.encoder {
            Some(encoder) => {
                encoder
                    .reset(blocks, recovery, block_size)
                    .map_err(|e| fail(e.to_string()))?;
                encoder
            }
            slot => {
                self.made += 1;
                slot.insert(
                    reed_solomon_simd::ReedSolomonEncoder::new(blocks, recovery, block_size)
                        .map_err(|e| fail(e.to_string()))?,
                )
            }
        };
        for i in 0..blocks {
            encoder
                .add_original_shard(padded_block(bytes, i, block_size))
                .map_err(|e| fail(e.to_string()))?;
        }
        let result = encoder.encode().map_err(|e| fail(e.to_string()))?;
        Ok(result.recovery_iter().map(<[u8]>::to_vec).collect())
    }

    /// A decoder for `blocks` data blocks and their parity, reset or made.
    fn decoder(
        &mut self,
        blocks: usize,
        recovery: usize,
        block_size: usize,
    ) -> Result<&mut reed_solomon_simd::ReedSolomonDecoder, reed_solomon_simd::Error> {
        match &mut self.decoder {
            Some(decoder) => {
                decoder.reset(blocks, recovery, block_size)?;
                Ok(decoder)
            }
            slot => {
                self.made += 1;
                Ok(slot.insert(reed_solomon_simd::ReedSolomonDecoder::new(
                    blocks, recovery, block_size,
                )?))
            }
        }
    }
}

/// What a receiver collected of a chunk besides its data blocks, handed to the disk side with
/// the chunk: the disk thread rebuilds the missing blocks, so the network thread never decodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub block_size: usize,
    /// Data blocks that arrived.
    pub have: BitSet,
    /// Parity shards by index, each `block_size` bytes.
    pub parity: BTreeMap<u16, Vec<u8>>,
}

impl Repair {
    /// Fills the missing blocks of `bytes` (the chunk as it travels, missing blocks zero) from
    /// the parity shards.
    pub fn rebuild(&self, bytes: &mut [u8]) -> Result<(), FecError> {
        self.rebuild_with(bytes, &mut Coder::default())
    }

    /// [`Repair::rebuild`] with a decoder kept between chunks.
    pub fn rebuild_with(&self, bytes: &mut [u8], coder: &mut Coder) -> Result<(), FecError> {
        let block_size = self.block_size;
        let blocks = bytes.len().div_ceil(block_size);
        let have = self.have.count();
        let missing = blocks.saturating_sub(have);
        if missing == 0 {
            return Ok(());
        }
        let fail = |why: String| FecError::Decode {
            missing,
            parity: self.parity.len(),
            why,
        };
        if self.have.len() != blocks || have + self.parity.len() < blocks {
            return Err(FecError::TooFew {
                blocks,
                have,
                parity: self.parity.len(),
            });
        }
        if !usable(blocks, block_size) {
            return Err(fail("unsupported geometry".into()));
        }
        let recovery = recovery_count(blocks);
        let decoder = coder
            .decoder(blocks, recovery, block_size)
            .map_err(|e| fail(e.to_string()))?;
        for index in self.have.iter() {
            decoder
                .add_original_shard(index, padded_block(bytes, index, block_size))
                .map_err(|e| fail(e.to_string()))?;
        }
        for (&index, shard) in self.parity.iter().take(missing) {
            decoder
                .add_recovery_shard(usize::from(index), shard)
                .map_err(|e| fail(e.to_string()))?;
        }
        let result = decoder.decode().map_err(|e| fail(e.to_string()))?;
        for (index, shard) in result.restored_original_iter() {
            let start = index * block_size;
            let end = (start + block_size).min(bytes.len());
            if let (Some(target), Some(source)) =
                (bytes.get_mut(start..end), shard.get(..end - start))
            {
                target.copy_from_slice(source);
            }
        }
        Ok(())
    }
}

/// The sender's parity repairs: how many shards each chunk still gets, which index comes next,
/// and the encoded parity of the last few chunks.
#[derive(Debug, Default)]
pub struct ParityQueue {
    /// Shards still to send, per chunk: the largest count any receiver asked for, not the sum.
    queued: BTreeMap<u32, u32>,
    /// The next parity index per chunk; indexes cycle, so a receiver that lost one shard gets
    /// it again once every other was sent.
    next_index: HashMap<u32, u16>,
    cache: VecDeque<(u32, Vec<Vec<u8>>)>,
    coder: Coder,
}

/// Chunks whose parity stays encoded: repairs drain one chunk at a time.
const CACHED_CHUNKS: usize = 8;

impl ParityQueue {
    /// A receiver lacks `needed` shards of `chunk`: returns how many shards that adds to the
    /// queue (none when as many are already queued).
    pub fn request(&mut self, chunk: u32, needed: u32) -> u32 {
        let queued = self.queued.entry(chunk).or_insert(0);
        let added = needed.saturating_sub(*queued);
        *queued = (*queued).max(needed);
        if *queued == 0 {
            self.queued.remove(&chunk);
        }
        added
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// The next (chunk, parity index) to send, lowest chunk first.
    pub fn next(&mut self, recovery_of: impl Fn(u32) -> usize) -> Option<(u32, u16)> {
        let mut entry = self.queued.first_entry()?;
        let chunk = *entry.key();
        *entry.get_mut() -= 1;
        if *entry.get() == 0 {
            entry.remove();
        }
        Some((chunk, self.take_index(chunk, recovery_of(chunk))))
    }

    /// Reserves the next parity index of `chunk` (for the first pass's proactive parity too).
    pub fn take_index(&mut self, chunk: u32, recovery: usize) -> u16 {
        let next = self.next_index.entry(chunk).or_insert(0);
        let index = *next;
        *next = if usize::from(index) + 1 >= recovery {
            0
        } else {
            index + 1
        };
        index
    }

    /// Parity shard `index` of `chunk`, encoding the chunk's `bytes` when it is not cached.
    pub fn shard(
        &mut self,
        chunk: u32,
        index: u16,
        bytes: &[u8],
        block_size: usize,
    ) -> Result<&[u8], FecError> {
        let position = match self.cache.iter().position(|(c, _)| *c == chunk) {
            Some(position) => position,
            None => {
                if self.cache.len() >= CACHED_CHUNKS {
                    self.cache.pop_front();
                }
                let parity = self.coder.encode(bytes, block_size)?;
                self.cache.push_back((chunk, parity));
                self.cache.len() - 1
            }
        };
        let blocks = bytes.len().div_ceil(block_size);
        self.cache[position]
            .1
            .get(usize::from(index))
            .map(Vec::as_slice)
            .ok_or(FecError::Encode {
                blocks,
                block_size,
                why: format!("no parity shard {index}"),
            })
    }

    pub fn clear(&mut self) {
        self.queued.clear();
        self.cache.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(len: usize, seed: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        crate::rng::XorShift::new(seed).fill(&mut bytes);
        bytes
    }

    fn lose(bytes: &[u8], block_size: usize, lost: &[usize]) -> (Vec<u8>, BitSet) {
        let blocks = bytes.len().div_ceil(block_size);
        let mut damaged = bytes.to_vec();
        let mut have = BitSet::full(blocks);
        for &b in lost {
            let end = ((b + 1) * block_size).min(bytes.len());
            damaged[b * block_size..end].fill(0);
            have.remove(b);
        }
        (damaged, have)
    }

    #[test]
    fn any_blocks_lost_up_to_the_parity_count_are_rebuilt() {
        // A short last block, as the last chunk of an image or a compressed chunk has.
        let block_size = 1408;
        let bytes = chunk(100 * block_size + 321, 1);
        let parity = encode(&bytes, block_size).unwrap();
        assert_eq!(parity.len(), recovery_count(101));
        let lost = [0usize, 7, 50, 99, 100];
        let (mut damaged, have) = lose(&bytes, block_size, &lost);
        // Any parity shards will do, not the first ones.
        let repair = Repair {
            block_size,
            have,
            parity: [3u16, 9, 11, 20, 24]
                .iter()
                .map(|&i| (i, parity[usize::from(i)].clone()))
                .collect(),
        };
        repair.rebuild(&mut damaged).unwrap();
        assert!(damaged == bytes);
    }

    #[test]
    fn too_few_or_wrong_shards_never_pass_for_the_chunk() {
        let block_size = 64;
        let bytes = chunk(40 * block_size, 2);
        let parity = encode(&bytes, block_size).unwrap();
        let (damaged, have) = lose(&bytes, block_size, &[1, 2, 3]);
        let two = Repair {
            block_size,
            have: have.clone(),
            parity: [(0u16, parity[0].clone()), (1, parity[1].clone())].into(),
        };
        assert!(matches!(
            two.rebuild(&mut damaged.clone()),
            Err(FecError::TooFew { .. })
        ));
        // A damaged shard rebuilds wrong bytes: the chunk hash (checked after) catches it.
        let mut bad = parity[2].clone();
        bad[0] ^= 1;
        let wrong = Repair {
            block_size,
            have,
            parity: [(0u16, parity[0].clone()), (1, parity[1].clone()), (2, bad)].into(),
        };
        let mut rebuilt = damaged.clone();
        wrong.rebuild(&mut rebuilt).unwrap();
        assert!(rebuilt != bytes);
        // An index beyond the code is an error, not a panic.
        let beyond = Repair {
            block_size,
            have: BitSet::new(40),
            parity: (0..40u16)
                .map(|i| (i + 1000, vec![0; block_size]))
                .collect(),
        };
        assert!(beyond.rebuild(&mut damaged.clone()).is_err());
    }

    #[test]
    fn one_block_chunks_and_odd_sizes() {
        let bytes = chunk(1000, 3);
        let parity = encode(&bytes, 1408).unwrap();
        assert_eq!(parity.len(), 1);
        let repair = Repair {
            block_size: 1408,
            have: BitSet::new(1),
            parity: [(0u16, parity[0].clone())].into(),
        };
        let mut lost = vec![0u8; 1000];
        repair.rebuild(&mut lost).unwrap();
        assert_eq!(lost, bytes);
        assert!(!usable(10, 1407));
        assert!(encode(&bytes, 999).is_err());
    }

    #[test]
    fn the_queue_keeps_the_largest_request_and_cycles_indexes() {
        let mut queue = ParityQueue::default();
        assert_eq!(queue.request(5, 3), 3);
        assert_eq!(queue.request(5, 2), 0, "a smaller need is already covered");
        assert_eq!(queue.request(5, 4), 1);
        assert_eq!(queue.request(2, 1), 1);
        let sent: Vec<_> = std::iter::from_fn(|| queue.next(|_| 3)).collect();
        assert_eq!(sent, [(2, 0), (5, 0), (5, 1), (5, 2), (5, 0)]);
        assert!(queue.is_empty());
    }
}

#[cfg(test)]
mod coder_tests {
    use super::*;

    #[test]
    fn a_kept_coder_encodes_and_rebuilds_like_fresh_ones_across_chunks() {
        let block_size = 1408;
        let mut coder = Coder::default();
        // Chunks of different lengths (a short last chunk, a compressed one), and a failed
        // rebuild in between: the kept decoder must not carry anything over.
        for (seed, len) in [(1u64, 1 << 20), (2, 100 * block_size + 321), (3, 1 << 20)] {
            let mut bytes = vec![0u8; len];
            crate::rng::XorShift::new(seed).fill(&mut bytes);
            let parity = coder.encode(&bytes, block_size).unwrap();
            assert_eq!(parity, encode(&bytes, block_size).unwrap());
            let blocks = len.div_ceil(block_size);
            let lost: Vec<usize> = (0..blocks)
                .step_by(9)
                .take(recovery_count(blocks))
                .collect();
            let mut damaged = bytes.clone();
            let mut have = BitSet::full(blocks);
            for &b in &lost {
                let end = ((b + 1) * block_size).min(len);
                damaged[b * block_size..end].fill(0);
                have.remove(b);
            }
            let too_few = Repair {
                block_size,
                have: have.clone(),
                parity: [(0u16, parity[0].clone())].into(),
            };
            assert!(too_few
                .rebuild_with(&mut damaged.clone(), &mut coder)
                .is_err());
            let repair = Repair {
                block_size,
                have,
                parity: (0..lost.len() as u16)
                    .map(|i| (i + 1, parity[usize::from(i) + 1].clone()))
                    .collect(),
            };
            repair.rebuild_with(&mut damaged, &mut coder).unwrap();
            assert!(damaged == bytes, "chunk {seed} rebuilt wrong");
        }
        assert_eq!(coder.made, 2, "one encoder and one decoder: {coder:?}");
    }
}
