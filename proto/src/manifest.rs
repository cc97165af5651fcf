//! The image manifest: geometry plus one entry per chunk — data (with its BLAKE3 hash), zero, or
//! absent — so that only chunks holding data travel, and every chunk can be checked on its own.
//!
//! Encoding (all integers big-endian):
//!
//! ```text
//!  0      4       6       8               16       20            24          26
//!  +------+-------+-------+---------------+--------+-------------+-----------+-----------+--------
//!  |"DCMF"|version| flags |  image_size   | chunk  | chunk_count | sig_len   | signature | entries
//!  |      |  =1   |  =0   |     (u64)     | size   |    (u32)    |  (u16)    | (sig_len) |
//!  +------+-------+-------+---------------+--------+-------------+-----------+-----------+--------
//!  entry: kind (u8: 0 absent, 1 zero, 2 data, 3 zstd data)
//!         [+ 32-byte BLAKE3 hash of the raw bytes for data and zstd data]
//!         [+ u32 compressed length for zstd data]
//! ```
//!
//! A zstd data chunk travels (and is stored) as one zstd frame of `compressed length` bytes, which
//! is always smaller than the raw chunk: a chunk that does not shrink is kept as plain data.
//!
//! The image hash is BLAKE3 over the encoding with an empty signature and every zstd entry
//! written as plain data, so neither signing a manifest later nor how its chunks are stored
//! changes the hash an image is known by: a copy read back from a disk has the same hash.

use crate::read_at::{ReadAt, ReadAtError};
use std::io::{self, Read};

pub const MAGIC: &[u8; 4] = b"DCMF";
pub const VERSION: u16 = 1;
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Chunks must be whole multiples of this, so chunk writes are aligned for O_DIRECT on any disk.
pub const CHUNK_ALIGN: u32 = 4096;
/// Largest chunk: receivers hold several chunks in memory while they assemble them.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;

/// The one rule for chunk sizes, applied to what we scan and to what the network announces.
pub fn valid_chunk_size(chunk_size: u32) -> bool {
    chunk_size != 0 && chunk_size.is_multiple_of(CHUNK_ALIGN) && chunk_size <= MAX_CHUNK_SIZE
}
pub type Hash = [u8; 32];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// Not part of the image: the receiver leaves the target untouched there.
    Absent,
    /// All zero bytes: not sent, the receiver zeroes the range.
    Zero,
    /// Sent; the hash of its bytes.
    Data(Hash),
    /// Sent as one zstd frame of `stored_len` bytes; `hash` is the hash of the raw bytes.
    Zstd { hash: Hash, stored_len: u32 },
}

impl ChunkKind {
    /// The hash of the raw bytes, for chunks that travel.
    pub fn hash(&self) -> Option<&Hash> {
        match self {
            ChunkKind::Data(hash) | ChunkKind::Zstd { hash, .. } => Some(hash),
            ChunkKind::Absent | ChunkKind::Zero => None,
        }
    }

    pub fn is_data(&self) -> bool {
        self.hash().is_some()
    }

    /// What the chunk holds, forgetting how it is stored.
    pub fn content(&self) -> ChunkKind {
        match self {
            ChunkKind::Zstd { hash, .. } => ChunkKind::Data(*hash),
            other => *other,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest truncated at byte {at}")]
    Truncated { at: usize },
    #[error("not a diskcast manifest (bad magic)")]
    BadMagic,
    #[error("manifest version {0} is not supported (this agent reads version {VERSION})")]
    Version(u16),
    #[error("chunk size {0} is not a non-zero multiple of {CHUNK_ALIGN} up to {MAX_CHUNK_SIZE}")]
    ChunkSize(u32),
    #[error("manifest lists {listed} chunks but an image of {image_size} bytes in chunks of {chunk_size} has {expected}")]
    ChunkCount {
        listed: u32,
        expected: u64,
        image_size: u64,
        chunk_size: u32,
    },
    #[error("unknown chunk kind {kind} for chunk {chunk}")]
    Kind { chunk: u32, kind: u8 },
    #[error("chunk {chunk} claims {stored_len} compressed bytes; it must be between 1 and its raw length {raw_len}")]
    StoredLen {
        chunk: u32,
        stored_len: u32,
        raw_len: usize,
    },
    #[error("{0} bytes after the last chunk entry")]
    Trailing(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub image_size: u64,
    pub chunk_size: u32,
    pub chunks: Vec<ChunkKind>,
    /// Reserved for a signature over the image hash; empty until signing exists.
    pub signature: Vec<u8>,
}

pub fn chunk_count(image_size: u64, chunk_size: u32) -> u64 {
    image_size.div_ceil(u64::from(chunk_size))
}

/// How a chunk's bytes are classified: the sender when scanning, the receiver when verifying.
pub fn classify(bytes: &[u8]) -> ChunkKind {
    if is_zero(bytes) {
        ChunkKind::Zero
    } else {
        ChunkKind::Data(*blake3::hash(bytes).as_bytes())
    }
}

/// Whether chunk `index` must be read, given a used-chunk map (`None`: every chunk). A map
/// too short for the image counts the rest as used.
pub fn chunk_is_used(used: Option<&[bool]>, index: u32) -> bool {
    used.is_none_or(|used| used.get(index as usize).copied().unwrap_or(true))
}

pub fn is_zero(bytes: &[u8]) -> bool {
    // Comparing u64-sized words is an order of magnitude faster than byte by byte.
    let mut words = bytes.chunks_exact(8);
    words.all(|w| w == [0u8; 8]) && words.remainder().iter().all(|&b| b == 0)
}

impl Manifest {
    /// Offset and length of chunk `index` (the last chunk may be short).
    pub fn chunk_range(&self, index: u32) -> (u64, usize) {
        let offset = u64::from(index) * u64::from(self.chunk_size);
        let len = (self.image_size - offset).min(u64::from(self.chunk_size));
        (offset, len as usize)
    }

    pub fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }

    pub fn data_chunks(&self) -> impl Iterator<Item = u32> + '_ {
        self.chunks
            .iter()
            .enumerate()
            .filter(|(_, k)| k.is_data())
            .map(|(i, _)| i as u32)
    }

    /// Bytes chunk `index` occupies on the wire and in a store: its compressed length for zstd
    /// chunks, its raw length otherwise.
    pub fn wire_len(&self, index: u32) -> usize {
        match self.chunks.get(index as usize) {
            Some(ChunkKind::Zstd { stored_len, .. }) => *stored_len as usize,
            _ => self.chunk_range(index).1,
        }
    }

    /// True when any chunk travels compressed.
    pub fn is_compressed(&self) -> bool {
        self.chunks
            .iter()
            .any(|k| matches!(k, ChunkKind::Zstd { .. }))
    }

    /// Bytes the data chunks occupy on the wire and in a store.
    pub fn stored_bytes(&self) -> u64 {
        self.data_chunks().map(|i| self.wire_len(i) as u64).sum()
    }

    /// Bytes that travel: the data chunks.
    pub fn data_bytes(&self) -> u64 {
        self.data_chunks()
            .map(|i| self.chunk_range(i).1 as u64)
            .sum()
    }

    /// Reads a whole image and builds its manifest. `progress` gets the bytes scanned so far.
    pub fn scan(
        reader: &mut impl Read,
        image_size: u64,
        chunk_size: u32,
        mut progress: impl FnMut(u64),
    ) -> io::Result<Self> {
        if !valid_chunk_size(chunk_size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                ManifestError::ChunkSize(chunk_size),
            ));
        }
        let count = chunk_count(image_size, chunk_size);
        let mut buf = vec![0u8; chunk_size as usize];
        let mut chunks = Vec::with_capacity(count as usize);
        let mut scanned = 0u64;
        for _ in 0..count {
            let len = (image_size - scanned).min(u64::from(chunk_size)) as usize;
            reader.read_exact(&mut buf[..len])?;
            chunks.push(classify(&buf[..len]));
            scanned += len as u64;
            progress(scanned);
        }
        Ok(Self {
            image_size,
            chunk_size,
            chunks,
            signature: Vec::new(),
        })
    }

    /// Builds the manifest of the first `image_size` bytes of `disk`, reading only the chunks
    /// `used` marks (every chunk when `None`, and any chunk past the end of `used`); the others
    /// are absent: never read, sent or written, left as they are on a target. `progress` gets
    /// the position reached.
    pub fn scan_at(
        disk: &(impl ReadAt + ?Sized),
        image_size: u64,
        chunk_size: u32,
        used: Option<&[bool]>,
        mut progress: impl FnMut(u64),
    ) -> Result<Self, ReadAtError> {
        if !valid_chunk_size(chunk_size) {
            return Err(ReadAtError {
                offset: 0,
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    ManifestError::ChunkSize(chunk_size),
                ),
            });
        }
        let mut manifest = Self {
            image_size,
            chunk_size,
            chunks: Vec::new(),
            signature: Vec::new(),
        };
        let count = chunk_count(image_size, chunk_size) as u32;
        manifest.chunks.reserve(count as usize);
        let mut buf = vec![0u8; chunk_size as usize];
        for index in 0..count {
            let (offset, len) = manifest.chunk_range(index);
            let kind = if chunk_is_used(used, index) {
                disk.read_exact_at(&mut buf[..len], offset)
                    .map_err(|source| ReadAtError { offset, source })?;
                classify(&buf[..len])
            } else {
                ChunkKind::Absent
            };
            manifest.chunks.push(kind);
            progress(offset + len as u64);
        }
        Ok(manifest)
    }

    /// Bytes of the image in absent chunks (skipped as unused).
    pub fn absent_bytes(&self) -> u64 {
        (0..self.chunk_count())
            .filter(|&i| self.chunks[i as usize] == ChunkKind::Absent)
            .map(|i| self.chunk_range(i).1 as u64)
            .sum()
    }

    /// Re-reads an image written from this manifest and builds the manifest of what is really there
    /// (absent chunks stay absent, unread). Its [`Manifest::image_hash`] equals this one's exactly
    /// when the copy is byte-exact.
    pub fn read_back(&self, reader: &mut (impl Read + io::Seek)) -> io::Result<Self> {
        let mut buf = vec![0u8; self.chunk_size as usize];
        let mut chunks = Vec::with_capacity(self.chunks.len());
        for (index, kind) in self.chunks.iter().enumerate() {
            if *kind == ChunkKind::Absent {
                chunks.push(ChunkKind::Absent);
                continue;
            }
            let (offset, len) = self.chunk_range(index as u32);
            reader.seek(io::SeekFrom::Start(offset))?;
            reader.read_exact(&mut buf[..len])?;
            chunks.push(classify(&buf[..len]));
        }
        Ok(Self {
            image_size: self.image_size,
            chunk_size: self.chunk_size,
            chunks,
            signature: Vec::new(),
        })
    }

    /// The first chunk whose entry differs from `other`'s, for error messages.
    pub fn first_difference(&self, other: &Manifest) -> Option<u32> {
        self.chunks
            .iter()
            .zip(&other.chunks)
            .position(|(a, b)| a.content() != b.content())
            .map(|i| i as u32)
    }

    fn encode_with(&self, signature: &[u8], storage: bool) -> Vec<u8> {
        let data = self.data_chunks().count();
        let mut out = Vec::with_capacity(26 + signature.len() + self.chunks.len() + data * 36);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&self.image_size.to_be_bytes());
        out.extend_from_slice(&self.chunk_size.to_be_bytes());
        out.extend_from_slice(&self.chunk_count().to_be_bytes());
        out.extend_from_slice(&(signature.len() as u16).to_be_bytes());
        out.extend_from_slice(signature);
        for chunk in &self.chunks {
            match chunk {
                ChunkKind::Absent => out.push(0),
                ChunkKind::Zero => out.push(1),
                ChunkKind::Zstd { hash, stored_len } if storage => {
                    out.push(3);
                    out.extend_from_slice(hash);
                    out.extend_from_slice(&stored_len.to_be_bytes());
                }
                ChunkKind::Data(hash) | ChunkKind::Zstd { hash, .. } => {
                    out.push(2);
                    out.extend_from_slice(hash);
                }
            }
        }
        out
    }

    pub fn encode(&self) -> Vec<u8> {
        self.encode_with(&self.signature, true)
    }

    /// The image's identity: BLAKE3 of the unsigned encoding of its content.
    pub fn image_hash(&self) -> Hash {
        *blake3::hash(&self.encode_with(&[], false)).as_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], ManifestError> {
            let slice = bytes
                .get(at..at + n)
                .ok_or(ManifestError::Truncated { at })?;
            at += n;
            Ok(slice)
        };
        if take(4)? != MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let version = u16::from_be_bytes(take(2)?.try_into().unwrap_or_default());
        if version != VERSION {
            return Err(ManifestError::Version(version));
        }
        take(2)?;
        let image_size = u64::from_be_bytes(take(8)?.try_into().unwrap_or_default());
        let chunk_size = u32::from_be_bytes(take(4)?.try_into().unwrap_or_default());
        if !valid_chunk_size(chunk_size) {
            return Err(ManifestError::ChunkSize(chunk_size));
        }
        let listed = u32::from_be_bytes(take(4)?.try_into().unwrap_or_default());
        let expected = chunk_count(image_size, chunk_size);
        if u64::from(listed) != expected {
            return Err(ManifestError::ChunkCount {
                listed,
                expected,
                image_size,
                chunk_size,
            });
        }
        let sig_len = u16::from_be_bytes(take(2)?.try_into().unwrap_or_default());
        let signature = take(usize::from(sig_len))?.to_vec();
        let mut chunks = Vec::with_capacity(listed.min(1 << 24) as usize);
        for chunk in 0..listed {
            let kind = take(1)?[0];
            chunks.push(match kind {
                0 => ChunkKind::Absent,
                1 => ChunkKind::Zero,
                2 => ChunkKind::Data(take(32)?.try_into().unwrap_or_default()),
                3 => {
                    let hash = take(32)?.try_into().unwrap_or_default();
                    let stored_len = u32::from_be_bytes(take(4)?.try_into().unwrap_or_default());
                    let offset = u64::from(chunk) * u64::from(chunk_size);
                    let raw_len = (image_size - offset).min(u64::from(chunk_size)) as usize;
                    if stored_len == 0 || stored_len as usize >= raw_len {
                        return Err(ManifestError::StoredLen {
                            chunk,
                            stored_len,
                            raw_len,
                        });
                    }
                    ChunkKind::Zstd { hash, stored_len }
                }
                kind => return Err(ManifestError::Kind { chunk, kind }),
            });
        }
        if at != bytes.len() {
            return Err(ManifestError::Trailing(bytes.len() - at));
        }
        Ok(Self {
            image_size,
            chunk_size,
            chunks,
            signature,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_image() -> Vec<u8> {
        let mut image = vec![0u8; 4 * 8192 + 100];
        image[8192..16384].fill(7);
        image[4 * 8192 + 50] = 1;
        image
    }

    #[test]
    fn scan_classifies_chunks_and_round_trips() {
        let image = sample_image();
        let manifest = Manifest::scan(&mut &image[..], image.len() as u64, 8192, |_| {}).unwrap();
        assert_eq!(manifest.chunk_count(), 5);
        assert_eq!(manifest.chunks[0], ChunkKind::Zero);
        assert_eq!(
            manifest.chunks[1],
            ChunkKind::Data(*blake3::hash(&image[8192..16384]).as_bytes())
        );
        assert_eq!(
            manifest.chunks[4],
            ChunkKind::Data(*blake3::hash(&image[32768..]).as_bytes())
        );
        assert_eq!(manifest.chunk_range(4), (32768, 100));
        assert_eq!(manifest.data_bytes(), 8192 + 100);
        let encoded = manifest.encode();
        assert_eq!(Manifest::decode(&encoded), Ok(manifest.clone()));
        // The signature does not change the image hash, but is carried.
        let mut signed = manifest.clone();
        signed.signature = vec![9; 64];
        assert_eq!(signed.image_hash(), manifest.image_hash());
        assert_eq!(Manifest::decode(&signed.encode()), Ok(signed));
    }

    #[test]
    fn scan_at_reads_only_used_chunks_and_matches_scan() {
        struct Counting<'a>(&'a [u8], std::cell::RefCell<Vec<u64>>);
        impl ReadAt for Counting<'_> {
            fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
                self.1.borrow_mut().push(offset);
                self.0.read_exact_at(buf, offset)
            }
            fn size(&self) -> io::Result<u64> {
                Ok(self.0.len() as u64)
            }
        }
        let image = sample_image();
        let size = image.len() as u64;
        let all = Manifest::scan(&mut &image[..], size, 8192, |_| {}).unwrap();
        assert_eq!(
            Manifest::scan_at(&image[..], size, 8192, None, |_| {}).unwrap(),
            all
        );
        let disk = Counting(&image, Default::default());
        // Chunk 4 lies past the end of the map: used.
        let used = [false, true, false, true];
        let mut reached = 0;
        let some = Manifest::scan_at(&disk, size, 8192, Some(&used), |at| reached = at).unwrap();
        assert_eq!(reached, size);
        assert_eq!(*disk.1.borrow(), [8192, 3 * 8192, 4 * 8192]);
        assert_eq!(some.chunks[0], ChunkKind::Absent);
        assert_eq!(some.chunks[1], all.chunks[1]);
        assert_eq!(some.chunks[2], ChunkKind::Absent);
        assert_eq!(some.chunks[3], ChunkKind::Zero);
        assert_eq!(some.chunks[4], all.chunks[4]);
        assert_eq!(some.absent_bytes(), 2 * 8192);
        assert_eq!(Manifest::decode(&some.encode()), Ok(some.clone()));
        // A read failure names where.
        let short = &image[..3 * 8192];
        let err = Manifest::scan_at(short, size, 8192, None, |_| {}).unwrap_err();
        assert_eq!(err.offset, 3 * 8192);
    }

    #[test]
    fn decode_rejects_damage_without_panicking() {
        let image = sample_image();
        let encoded = Manifest::scan(&mut &image[..], image.len() as u64, 8192, |_| {})
            .unwrap()
            .encode();
        for len in 0..encoded.len() {
            assert!(
                Manifest::decode(&encoded[..len]).is_err(),
                "truncated to {len}"
            );
        }
        let mut bad = encoded.clone();
        bad[26] = 9;
        assert_eq!(
            Manifest::decode(&bad),
            Err(ManifestError::Kind { chunk: 0, kind: 9 })
        );
        let mut bad = encoded.clone();
        bad[19] = 1; // chunk size no longer aligned
        assert!(matches!(
            Manifest::decode(&bad),
            Err(ManifestError::ChunkSize(_))
        ));
        let mut long = encoded.clone();
        long.push(0);
        assert_eq!(Manifest::decode(&long), Err(ManifestError::Trailing(1)));
        let mut state = 1u32;
        for _ in 0..5000 {
            let mut mutated = encoded.clone();
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let i = (state >> 8) as usize % mutated.len();
            mutated[i] = (state >> 16) as u8;
            let _ = Manifest::decode(&mutated);
        }
    }

    #[test]
    fn zero_detection_handles_every_tail_length() {
        for len in 0..40 {
            let mut bytes = vec![0u8; len];
            assert!(is_zero(&bytes));
            if len > 0 {
                bytes[len - 1] = 1;
                assert!(!is_zero(&bytes), "len {len}");
            }
        }
    }
}

#[cfg(test)]
mod stored_tests {
    use super::*;

    #[test]
    fn zstd_entries_round_trip_and_keep_the_image_hash_of_the_content() {
        let image = vec![9u8; 3 * 8192];
        let raw = Manifest::scan(&mut &image[..], image.len() as u64, 8192, |_| {}).unwrap();
        let mut stored = raw.clone();
        let hash = *raw.chunks[1].hash().unwrap();
        stored.chunks[1] = ChunkKind::Zstd {
            hash,
            stored_len: 40,
        };
        let encoded = stored.encode();
        assert_eq!(Manifest::decode(&encoded), Ok(stored.clone()));
        assert_eq!(stored.image_hash(), raw.image_hash());
        assert_ne!(encoded, raw.encode());
        assert_eq!(stored.wire_len(1), 40);
        assert_eq!(stored.wire_len(0), 8192);
        assert_eq!(stored.stored_bytes(), 2 * 8192 + 40);
        assert_eq!(stored.first_difference(&raw), None);

        // A compressed length that is not smaller than the chunk is refused (receivers size
        // their buffers from it).
        for bad_len in [0u32, 8192, u32::MAX] {
            stored.chunks[1] = ChunkKind::Zstd {
                hash,
                stored_len: bad_len,
            };
            assert!(matches!(
                Manifest::decode(&stored.encode()),
                Err(ManifestError::StoredLen { chunk: 1, .. })
            ));
        }
    }
}
