//! How a chunk is stored and sent: zero chunks not at all, data chunks as one zstd frame when that
//! is smaller, raw otherwise. Decoding checks the raw bytes against the chunk's hash.

use crate::manifest::{classify, ChunkKind};
use std::borrow::Cow;

/// zstd level for captures: level 3 compresses a typical disk to about a third at several hundred
/// MB/s per core; higher levels cost far more CPU than the network time they save.
pub const DEFAULT_LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("chunk {chunk}: the stored zstd frame does not decompress to {raw_len} bytes")]
    Decompress { chunk: u32, raw_len: usize },
    #[error("chunk {chunk}: holds {got} stored bytes, the manifest says {expected}")]
    Length {
        chunk: u32,
        got: usize,
        expected: usize,
    },
    #[error("chunk {chunk}: the bytes do not match the manifest's hash")]
    Hash { chunk: u32 },
    #[error("chunk {chunk}: rebuilding lost blocks from parity")]
    Rebuild {
        chunk: u32,
        #[source]
        source: crate::fec::FecError,
    },
    #[error("chunk {chunk}: a {kind} chunk has no stored bytes")]
    NotStored { chunk: u32, kind: &'static str },
}

/// A chunk ready to store or send: its manifest entry and, for data, the bytes that travel.
#[derive(Debug)]
pub struct Encoded<'a> {
    pub kind: ChunkKind,
    pub stored: Cow<'a, [u8]>,
}

/// Classifies `raw` and compresses it when that saves space.
pub fn encode(raw: &[u8], level: i32) -> Encoded<'_> {
    let kind = classify(raw);
    let ChunkKind::Data(hash) = kind else {
        return Encoded {
            kind,
            stored: Cow::Borrowed(&[]),
        };
    };
    match zstd::bulk::compress(raw, level) {
        Ok(frame) if frame.len() < raw.len() => Encoded {
            kind: ChunkKind::Zstd {
                hash,
                stored_len: frame.len() as u32,
            },
            stored: Cow::Owned(frame),
        },
        // Incompressible (or the compressor failed): raw bytes are always a valid encoding.
        _ => Encoded {
            kind,
            stored: Cow::Borrowed(raw),
        },
    }
}

/// Chunks to encode at once with [`encode_parallel`]: two per core keep every core busy.
pub fn parallel_batch() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get() * 2)
}

/// [`encode`] on every core, results in order; `None` when an encoder thread crashed. Captures
/// and imports are bound by compression, not by the disk or the network.
pub fn encode_parallel(raw: &[Vec<u8>], level: i32) -> Option<Vec<Encoded<'_>>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = raw
            .iter()
            .map(|chunk| scope.spawn(move || encode(chunk, level)))
            .collect();
        handles.into_iter().map(|h| h.join().ok()).collect()
    })
}

/// Like [`decode`], keeping the buffer of a raw chunk instead of copying it.
pub fn decode_owned(
    chunk: u32,
    kind: &ChunkKind,
    stored: Vec<u8>,
    raw_len: usize,
) -> Result<Vec<u8>, CodecError> {
    match decode(chunk, kind, &stored, raw_len)? {
        Cow::Borrowed(_) => Ok(stored),
        Cow::Owned(raw) => Ok(raw),
    }
}

/// The raw bytes of chunk `chunk` from its stored bytes, checked against the manifest entry.
pub fn decode<'a>(
    chunk: u32,
    kind: &ChunkKind,
    stored: &'a [u8],
    raw_len: usize,
) -> Result<Cow<'a, [u8]>, CodecError> {
    let (raw, hash) = match kind {
        ChunkKind::Data(hash) => {
            if stored.len() != raw_len {
                return Err(CodecError::Length {
                    chunk,
                    got: stored.len(),
                    expected: raw_len,
                });
            }
            (Cow::Borrowed(stored), hash)
        }
        ChunkKind::Zstd { hash, stored_len } => {
            if stored.len() != *stored_len as usize {
                return Err(CodecError::Length {
                    chunk,
                    got: stored.len(),
                    expected: *stored_len as usize,
                });
            }
            let raw = zstd::bulk::decompress(stored, raw_len)
                .ok()
                .filter(|raw| raw.len() == raw_len)
                .ok_or(CodecError::Decompress { chunk, raw_len })?;
            (Cow::Owned(raw), hash)
        }
        ChunkKind::Zero => {
            return Err(CodecError::NotStored {
                chunk,
                kind: "zero",
            })
        }
        ChunkKind::Absent => {
            return Err(CodecError::NotStored {
                chunk,
                kind: "absent",
            })
        }
    };
    if blake3::hash(&raw).as_bytes() != hash {
        return Err(CodecError::Hash { chunk });
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_compresses_random_stays_raw_zero_is_not_stored() {
        let text: Vec<u8> = b"filesystem data ".repeat(4096);
        let encoded = encode(&text, DEFAULT_LEVEL);
        assert!(matches!(encoded.kind, ChunkKind::Zstd { .. }));
        assert!(encoded.stored.len() < text.len() / 10);
        assert_eq!(
            decode(0, &encoded.kind, &encoded.stored, text.len()).unwrap(),
            &text[..]
        );

        let mut state = 7u64;
        let random: Vec<u8> = (0..65536)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                (state >> 33) as u8
            })
            .collect();
        let encoded = encode(&random, DEFAULT_LEVEL);
        assert!(matches!(encoded.kind, ChunkKind::Data(_)));
        assert_eq!(&encoded.stored[..], &random[..]);

        let zero = vec![0u8; 8192];
        let encoded = encode(&zero, DEFAULT_LEVEL);
        assert_eq!(encoded.kind, ChunkKind::Zero);
        assert!(decode(3, &encoded.kind, &[], 8192).is_err());
    }

    #[test]
    fn any_flipped_stored_byte_is_caught() {
        let text: Vec<u8> = b"some text, some more text. ".repeat(2000);
        let encoded = encode(&text, DEFAULT_LEVEL);
        for at in 0..encoded.stored.len() {
            let mut damaged = encoded.stored.to_vec();
            damaged[at] ^= 0x10;
            // Some frame-header bits are unused by decoders: such a flip still yields the
            // right bytes. What must never happen is wrong bytes passing.
            if let Ok(raw) = decode(5, &encoded.kind, &damaged, text.len()) {
                assert_eq!(&raw[..], &text[..], "flip at {at} gave wrong bytes");
            }
        }
        let short = &encoded.stored[..encoded.stored.len() - 1];
        assert!(matches!(
            decode(5, &encoded.kind, short, text.len()),
            Err(CodecError::Length { .. })
        ));
    }
}
