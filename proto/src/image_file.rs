//! The image file: how the image store keeps a disk image, and what a capture uploads.
//!
//! Version 1 layout, written front to back so a capture can stream it without knowing its
//! compressed size in advance:
//!
//! ```text
//!  +----------------------------+---------------+-------------------+--------------------+
//!  | stored chunks              | manifest      | metadata          | footer (68 bytes)  |
//!  | (data chunks in order,     | (DCMF, with   | (UTF-8 lines      |                    |
//!  |  zstd frame or raw bytes)  |  stored lens) |  `key = value`)   |                    |
//!  +----------------------------+---------------+-------------------+--------------------+
//!
//!  footer: magic "DCIMAGE\0" | version u16 = 1 | flags u16 = 0 | data_len u64 | manifest_len u32
//!          | metadata_len u32 | image_hash [32] | crc32 of manifest + metadata u32
//!          | crc32 of the footer's first 64 bytes u32           (integers big-endian)
//! ```
//!
//! Chunk `i`'s stored bytes start at the sum of the stored lengths of the data chunks before it,
//! so a deploy reads each compressed frame with one positioned read and sends it unchanged. Every
//! byte is covered by a check: chunks by their BLAKE3 hash (after decompression), the manifest by
//! the image hash in the footer, manifest and metadata by a CRC, the footer by its own CRC.

use crate::codec::{self, CodecError, Encoded};
use crate::manifest::{ChunkKind, Manifest, ManifestError};
use crate::sender::ChunkSource;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

pub use crate::read_at::{ReadAt, ReadAtError};

/// Why [`ImageWriter::push_from`] failed: the disk, the output, or a compression thread.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Read(ReadAtError),
    #[error("writing the image")]
    Write(#[source] io::Error),
    #[error("a compression thread crashed")]
    Compressor,
}

pub const FOOTER_MAGIC: &[u8; 8] = b"DCIMAGE\0";
pub const FILE_VERSION: u16 = 1;
pub const FOOTER_LEN: usize = 68;
/// The store's file name extension.
pub const EXTENSION: &str = "dcimg";
/// Metadata larger than this is refused (it is a handful of short lines).
const MAX_METADATA: u32 = 64 << 10;
/// A manifest this large describes a 256 TiB disk at 1 MiB chunks; anything larger is damage.
const MAX_MANIFEST: u32 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ImageFileError {
    #[error("{path}: {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a diskcast image file ({why})")]
    NotAnImage { path: PathBuf, why: String },
    #[error("{path}: image file version {version} is not supported (this build reads version {FILE_VERSION})")]
    Version { path: PathBuf, version: u16 },
    #[error("{path}: {what} is damaged ({why})")]
    Damaged {
        path: PathBuf,
        what: &'static str,
        why: String,
    },
    #[error("{path}: bad manifest")]
    Manifest {
        path: PathBuf,
        #[source]
        source: ManifestError,
    },
    #[error("{path}: chunk at image offset {offset} (stored at file offset {file_offset})")]
    Chunk {
        path: PathBuf,
        offset: u64,
        file_offset: u64,
        #[source]
        source: CodecError,
    },
}

/// The fixed-size end of an image file: where the parts are and how to check them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub data_len: u64,
    pub manifest_len: u32,
    pub metadata_len: u32,
    pub image_hash: [u8; 32],
    /// CRC32 of manifest + metadata.
    pub body_crc: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FooterError {
    #[error("no DCIMAGE footer at the end")]
    Magic,
    #[error("the footer's CRC does not match")]
    Crc,
    #[error("image file version {0} is not supported (this build reads version {FILE_VERSION})")]
    Version(u16),
    #[error("manifest ({manifest_len} bytes) or metadata ({metadata_len} bytes) larger than any real image has")]
    Sizes {
        manifest_len: u32,
        metadata_len: u32,
    },
}

impl Footer {
    pub fn emit(&self) -> [u8; FOOTER_LEN] {
        let mut out = [0u8; FOOTER_LEN];
        out[..8].copy_from_slice(FOOTER_MAGIC);
        out[8..10].copy_from_slice(&FILE_VERSION.to_be_bytes());
        out[12..20].copy_from_slice(&self.data_len.to_be_bytes());
        out[20..24].copy_from_slice(&self.manifest_len.to_be_bytes());
        out[24..28].copy_from_slice(&self.metadata_len.to_be_bytes());
        out[28..60].copy_from_slice(&self.image_hash);
        out[60..64].copy_from_slice(&self.body_crc.to_be_bytes());
        let crc = crc32fast::hash(&out[..64]);
        out[64..].copy_from_slice(&crc.to_be_bytes());
        out
    }

    pub fn parse(bytes: &[u8; FOOTER_LEN]) -> Result<Self, FooterError> {
        if &bytes[..8] != FOOTER_MAGIC {
            return Err(FooterError::Magic);
        }
        if crc32fast::hash(&bytes[..64]) != be_u32(&bytes[64..]) {
            return Err(FooterError::Crc);
        }
        let version = be_u16(&bytes[8..]);
        if version != FILE_VERSION {
            return Err(FooterError::Version(version));
        }
        let mut image_hash = [0u8; 32];
        image_hash.copy_from_slice(&bytes[28..60]);
        let footer = Footer {
            data_len: be_u64(&bytes[12..]),
            manifest_len: be_u32(&bytes[20..]),
            metadata_len: be_u32(&bytes[24..]),
            image_hash,
            body_crc: be_u32(&bytes[60..]),
        };
        if footer.manifest_len > MAX_MANIFEST || footer.metadata_len > MAX_METADATA {
            return Err(FooterError::Sizes {
                manifest_len: footer.manifest_len,
                metadata_len: footer.metadata_len,
            });
        }
        Ok(footer)
    }

    /// The file length this footer describes.
    pub fn file_len(&self) -> Option<u64> {
        self.data_len.checked_add(
            u64::from(self.manifest_len) + u64::from(self.metadata_len) + FOOTER_LEN as u64,
        )
    }
}

/// Who made an image, when, from what. Plain `key = value` lines so an admin can read them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Where the image came from: `capture`, `import`.
    pub origin: String,
    /// The source machine (host name, MAC) and disk (model, serial, device), as known.
    pub source_machine: String,
    pub source_disk: String,
    /// `zstd-3` and the like; `none` when no chunk is compressed.
    pub compression: String,
    /// The tool that wrote the file.
    pub writer: String,
}

impl Metadata {
    pub fn render(&self) -> String {
        let clean = |s: &str| s.replace(['\n', '\r'], " ");
        format!(
            "created = {}\norigin = {}\nsource_machine = {}\nsource_disk = {}\ncompression = {}\nwriter = {}\n",
            self.created,
            clean(&self.origin),
            clean(&self.source_machine),
            clean(&self.source_disk),
            clean(&self.compression),
            clean(&self.writer)
        )
    }

    /// Unknown keys are ignored, so later versions may add some.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut meta = Metadata::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (key, value) = line
                .split_once(" = ")
                .ok_or_else(|| format!("line {line:?} is not `key = value`"))?;
            match key {
                "created" => {
                    meta.created = value
                        .parse()
                        .map_err(|_| format!("created = {value:?} is not a number"))?
                }
                "origin" => meta.origin = value.into(),
                "source_machine" => meta.source_machine = value.into(),
                "source_disk" => meta.source_disk = value.into(),
                "compression" => meta.compression = value.into(),
                "writer" => meta.writer = value.into(),
                _ => {}
            }
        }
        Ok(meta)
    }

    /// Metadata of an image made now (`created`, in Unix seconds) by this build.
    pub fn new(origin: &str, level: i32, created: u64) -> Self {
        Metadata {
            created,
            origin: origin.into(),
            compression: format!("zstd-{level}"),
            writer: format!("diskcast {}", env!("CARGO_PKG_VERSION")),
            ..Metadata::default()
        }
    }
}

/// Writes an image file front to back (to a file, or a network stream).
#[derive(Debug)]
pub struct ImageWriter<W: Write> {
    out: W,
    image_size: u64,
    chunk_size: u32,
    chunks: Vec<ChunkKind>,
    data_len: u64,
}

impl<W: Write> ImageWriter<W> {
    pub fn new(out: W, chunk_size: u32) -> Self {
        Self {
            out,
            image_size: 0,
            chunk_size,
            chunks: Vec::new(),
            data_len: 0,
        }
    }

    /// Appends the next chunk of the image (`raw_len` bytes of the disk).
    pub fn push(&mut self, encoded: &Encoded<'_>, raw_len: usize) -> io::Result<()> {
        if encoded.kind.is_data() {
            self.out.write_all(&encoded.stored)?;
            self.data_len += encoded.stored.len() as u64;
        }
        self.chunks.push(encoded.kind);
        self.image_size += raw_len as u64;
        Ok(())
    }

    /// Appends the first `image_size` bytes of `disk`, reading and compressing (on every core)
    /// only the chunks `used` marks (every chunk when `None`); the others are recorded absent.
    /// `progress` gets the position reached and the bytes stored so far.
    pub fn push_from(
        &mut self,
        disk: &(impl ReadAt + ?Sized),
        image_size: u64,
        used: Option<&[bool]>,
        level: i32,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<(), PushError> {
        let chunk_size = u64::from(self.chunk_size);
        let count = crate::manifest::chunk_count(image_size, self.chunk_size) as u32;
        let batch_len = codec::parallel_batch();
        let mut index = 0u32;
        while index < count {
            // Up to `batch_len` used chunks (and the absent ones between them) per round.
            let mut batch = Vec::with_capacity(batch_len);
            let mut kinds = Vec::new();
            while index < count && batch.len() < batch_len {
                let offset = u64::from(index) * chunk_size;
                let len = (image_size - offset).min(chunk_size) as usize;
                if crate::manifest::chunk_is_used(used, index) {
                    let mut buf = vec![0u8; len];
                    disk.read_exact_at(&mut buf, offset)
                        .map_err(|source| PushError::Read(ReadAtError { offset, source }))?;
                    batch.push(buf);
                    kinds.push(None);
                } else {
                    kinds.push(Some(len));
                }
                index += 1;
            }
            let encoded = codec::encode_parallel(&batch, level).ok_or(PushError::Compressor)?;
            let mut encoded = encoded.iter().zip(&batch);
            for absent in kinds {
                match absent {
                    Some(len) => self.push_absent(len),
                    None => {
                        if let Some((encoded, raw)) = encoded.next() {
                            self.push(encoded, raw.len()).map_err(PushError::Write)?;
                        }
                    }
                }
            }
            progress(self.image_size, self.data_len);
        }
        Ok(())
    }

    /// Appends a chunk of `raw_len` bytes that is not part of the image.
    pub fn push_absent(&mut self, raw_len: usize) {
        self.chunks.push(ChunkKind::Absent);
        self.image_size += raw_len as u64;
    }

    /// Reads `reader` to its end in chunks, compressing them on every core; returns the bytes
    /// read.
    pub fn push_all(
        &mut self,
        reader: &mut (impl Read + ?Sized),
        level: i32,
        mut progress: impl FnMut(u64),
    ) -> io::Result<u64> {
        let chunk_size = self.chunk_size as usize;
        let batch_len = codec::parallel_batch();
        loop {
            let mut batch = Vec::with_capacity(batch_len);
            let mut at_end = false;
            while batch.len() < batch_len && !at_end {
                let mut buf = vec![0u8; chunk_size];
                let filled = read_full(reader, &mut buf)?;
                at_end = filled < chunk_size;
                buf.truncate(filled);
                if filled > 0 {
                    batch.push(buf);
                }
            }
            let encoded = codec::encode_parallel(&batch, level)
                .ok_or_else(|| io::Error::other("a compression thread crashed"))?;
            for (encoded, raw) in encoded.iter().zip(&batch) {
                self.push(encoded, raw.len())?;
            }
            progress(self.image_size);
            if at_end {
                return Ok(self.image_size);
            }
        }
    }

    /// Writes manifest, metadata and footer; returns the manifest and the output.
    pub fn finish(mut self, meta: &Metadata) -> io::Result<(Manifest, W)> {
        let manifest = Manifest {
            image_size: self.image_size,
            chunk_size: self.chunk_size,
            chunks: std::mem::take(&mut self.chunks),
            signature: Vec::new(),
        };
        write_tail(&mut self.out, &manifest, meta, self.data_len)?;
        self.out.flush()?;
        Ok((manifest, self.out))
    }
}

/// Writes what follows the stored chunks (`data_len` bytes of them): manifest, metadata and
/// footer. Signing a stored image rewrites its tail with this; the chunks stay as they are.
pub fn write_tail(
    out: &mut impl Write,
    manifest: &Manifest,
    meta: &Metadata,
    data_len: u64,
) -> io::Result<()> {
    let manifest_bytes = manifest.encode();
    let meta_bytes = meta.render().into_bytes();
    let mut body_crc = crc32fast::Hasher::new();
    body_crc.update(&manifest_bytes);
    body_crc.update(&meta_bytes);
    let footer = Footer {
        data_len,
        manifest_len: manifest_bytes.len() as u32,
        metadata_len: meta_bytes.len() as u32,
        image_hash: manifest.image_hash(),
        body_crc: body_crc.finalize(),
    }
    .emit();
    out.write_all(&manifest_bytes)?;
    out.write_all(&meta_bytes)?;
    out.write_all(&footer)
}

/// An image file opened for reading: manifest, metadata and where each chunk is stored.
#[derive(Debug)]
pub struct ImageFile<R: ReadAt = std::fs::File> {
    path: PathBuf,
    file: R,
    pub manifest: Manifest,
    pub metadata: Metadata,
    /// File offset of each chunk's stored bytes (meaningful for data chunks).
    offsets: Vec<u64>,
    pub file_len: u64,
    cached: Option<(u32, Vec<u8>)>,
}

/// Fills `buf` unless the reader ends first; returns the bytes read.
fn read_full(reader: &mut (impl Read + ?Sized), buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl<R: ReadAt> ImageFile<R> {
    /// Checks the structure (footer, manifest, metadata) of the `file_len` bytes `file` holds;
    /// chunks are checked by [`ImageFile::verify`]. `path` names the file in errors.
    pub fn read(file: R, file_len: u64, path: &Path) -> Result<Self, ImageFileError> {
        let io_err = |op: &'static str| {
            let path = path.to_path_buf();
            move |source| ImageFileError::Io { path, op, source }
        };
        let damaged = |what: &'static str, why: String| ImageFileError::Damaged {
            path: path.to_path_buf(),
            what,
            why,
        };
        if file_len < FOOTER_LEN as u64 {
            return Err(ImageFileError::NotAnImage {
                path: path.into(),
                why: format!("{file_len} bytes, shorter than a footer"),
            });
        }
        let mut footer = [0u8; FOOTER_LEN];
        file.read_exact_at(&mut footer, file_len - FOOTER_LEN as u64)
            .map_err(io_err("reading the footer"))?;
        let footer = Footer::parse(&footer).map_err(|e| match e {
            FooterError::Magic => ImageFileError::NotAnImage {
                path: path.into(),
                why: e.to_string(),
            },
            FooterError::Version(version) => ImageFileError::Version {
                path: path.into(),
                version,
            },
            _ => damaged("the footer", e.to_string()),
        })?;
        let Footer {
            data_len,
            manifest_len,
            metadata_len: meta_len,
            image_hash,
            body_crc,
        } = footer.clone();
        if footer.file_len() != Some(file_len) {
            return Err(damaged(
                "the file",
                format!(
                    "{file_len} bytes, the footer describes {data_len} + {manifest_len} + {meta_len} + {FOOTER_LEN} (truncated or appended to?)"
                ),
            ));
        }
        let mut body = vec![0u8; manifest_len as usize + meta_len as usize];
        file.read_exact_at(&mut body, data_len)
            .map_err(io_err("reading the manifest"))?;
        if crc32fast::hash(&body) != body_crc {
            return Err(damaged("manifest or metadata", "CRC mismatch".into()));
        }
        let (manifest_bytes, meta_bytes) = body.split_at(manifest_len as usize);
        let manifest =
            Manifest::decode(manifest_bytes).map_err(|source| ImageFileError::Manifest {
                path: path.into(),
                source,
            })?;
        if manifest.image_hash() != image_hash {
            return Err(damaged(
                "the manifest",
                "its hash differs from the footer's".into(),
            ));
        }
        if manifest.stored_bytes() != data_len {
            return Err(damaged(
                "the manifest",
                format!(
                    "it lists {} stored bytes, the file holds {data_len}",
                    manifest.stored_bytes()
                ),
            ));
        }
        let metadata = std::str::from_utf8(meta_bytes)
            .map_err(|e| e.to_string())
            .and_then(Metadata::parse)
            .map_err(|why| damaged("the metadata", why))?;
        let mut offsets = Vec::with_capacity(manifest.chunks.len());
        let mut at = 0u64;
        for index in 0..manifest.chunk_count() {
            offsets.push(at);
            if manifest.chunks[index as usize].is_data() {
                at += manifest.wire_len(index) as u64;
            }
        }
        Ok(Self {
            path: path.into(),
            file,
            manifest,
            metadata,
            offsets,
            file_len,
            cached: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored bytes of data chunk `index` (a zstd frame or raw bytes), as they travel.
    pub fn stored_chunk(&self, index: u32) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; self.manifest.wire_len(index)];
        self.file
            .read_exact_at(&mut buf, self.offsets[index as usize])?;
        Ok(buf)
    }

    /// The raw bytes of data chunk `index`, checked against its hash.
    pub fn raw_chunk(&self, index: u32) -> Result<Vec<u8>, ImageFileError> {
        let file_offset = self.offsets[index as usize];
        let stored = self
            .stored_chunk(index)
            .map_err(|source| ImageFileError::Io {
                path: self.path.clone(),
                op: "reading a chunk",
                source,
            })?;
        let (offset, raw_len) = self.manifest.chunk_range(index);
        codec::decode(
            index,
            &self.manifest.chunks[index as usize],
            &stored,
            raw_len,
        )
        .map(|raw| raw.into_owned())
        .map_err(|source| ImageFileError::Chunk {
            path: self.path.clone(),
            offset,
            file_offset,
            source,
        })
    }
}

impl<R: ReadAt + Sync> ImageFile<R> {
    /// Decompresses and hashes every chunk on every core; the first bad chunk (by position) is
    /// the error.
    pub fn verify(&self) -> Result<(), ImageFileError> {
        let chunks: Vec<u32> = self.manifest.data_chunks().collect();
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let per_thread = chunks.len().div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            let workers: Vec<_> = chunks
                .chunks(per_thread)
                .map(|share| {
                    scope.spawn(move || share.iter().try_for_each(|&i| self.raw_chunk(i).map(drop)))
                })
                .collect();
            // Joined in order, so the error reported is the first in the image.
            workers.into_iter().try_for_each(|w| {
                w.join().unwrap_or_else(|_| {
                    Err(ImageFileError::Damaged {
                        path: self.path.clone(),
                        what: "a chunk",
                        why: "checking it crashed a thread".into(),
                    })
                })
            })
        })
    }

    /// Writes the raw disk image to `out`, zero chunks as zeros.
    pub fn export(&self, out: &mut dyn Write) -> Result<(), ImageFileError> {
        let zeros = vec![0u8; self.manifest.chunk_size as usize];
        let write_err = |source| ImageFileError::Io {
            path: self.path.clone(),
            op: "writing the exported image",
            source,
        };
        for index in 0..self.manifest.chunk_count() {
            let (_, len) = self.manifest.chunk_range(index);
            if self.manifest.chunks[index as usize].is_data() {
                out.write_all(&self.raw_chunk(index)?).map_err(write_err)?;
            } else {
                out.write_all(&zeros[..len]).map_err(write_err)?;
            }
        }
        out.flush().map_err(write_err)
    }
}

impl<R: ReadAt> ChunkSource for ImageFile<R> {
    /// The stored bytes: compressed chunks travel compressed.
    fn chunk(&mut self, index: u32) -> io::Result<&[u8]> {
        // The sender asks for one block at a time: keep the chunk it is on.
        if self.cached.as_ref().is_none_or(|(i, _)| *i != index) {
            let bytes = self.stored_chunk(index)?;
            self.cached = Some((index, bytes));
        }
        Ok(self.cached.as_ref().map_or(&[][..], |(_, b)| &b[..]))
    }
}

/// Image names: what the store, the config and the kernel command line accept.
pub fn valid_image_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

pub const IMAGE_NAME_RULE: &str =
    "1 to 64 characters of letters, digits, `.`, `_` and `-`, starting with a letter or digit";

#[cfg(test)]
mod tests {
    use super::*;

    fn disk_like(size: usize) -> Vec<u8> {
        let mut image = vec![0u8; size];
        let mut state = 99u64;
        for (i, block) in image.chunks_mut(4096).enumerate() {
            match i % 5 {
                0 | 1 => {}
                2 => block
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = b"/usr/lib/x86_64 "[j % 16]),
                _ => block.iter_mut().for_each(|b| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                    *b = (state >> 33) as u8
                }),
            }
        }
        image
    }

    fn write_image(raw: &[u8], chunk_size: u32) -> Vec<u8> {
        let mut writer = ImageWriter::new(Vec::new(), chunk_size);
        writer.push_all(&mut &raw[..], 3, |_| {}).unwrap();
        writer.finish(&Metadata::new("test", 3, 1)).unwrap().1
    }

    fn open(bytes: Vec<u8>) -> Result<ImageFile<Vec<u8>>, ImageFileError> {
        let len = bytes.len() as u64;
        ImageFile::read(bytes, len, Path::new("test.dcimg"))
    }

    #[test]
    fn write_open_export_round_trips_and_compresses() {
        for size in [64 * 1024 * 5 + 777, 64 * 1024 * 3, 10] {
            let raw = disk_like(size);
            let image = open(write_image(&raw, 64 * 1024)).unwrap();
            assert_eq!(image.manifest.image_size, raw.len() as u64);
            image.verify().unwrap();
            let mut out = Vec::new();
            image.export(&mut out).unwrap();
            assert!(out == raw, "export of {size} bytes differs");
            if size > 100_000 {
                assert!(image.file_len < raw.len() as u64 * 7 / 10);
            }
        }
    }

    #[test]
    fn push_from_stores_only_used_chunks_and_exports_zeros_for_the_rest() {
        let chunk = 64 * 1024;
        let raw = disk_like(chunk * 6 + 500);
        let used = [true, false, false, true, false];
        let mut writer = ImageWriter::new(Vec::new(), chunk as u32);
        let mut last = (0, 0);
        writer
            .push_from(&raw[..], raw.len() as u64, Some(&used), 3, |at, stored| {
                last = (at, stored)
            })
            .unwrap();
        let (manifest, bytes) = writer.finish(&Metadata::new("test", 3, 1)).unwrap();
        assert_eq!(last.0, raw.len() as u64);
        let scanned = Manifest::scan_at(
            &raw[..],
            raw.len() as u64,
            chunk as u32,
            Some(&used),
            |_| {},
        )
        .unwrap();
        // Stored chunks may be compressed; what they hold is what the scan found.
        let content = |m: &Manifest| m.chunks.iter().map(ChunkKind::content).collect::<Vec<_>>();
        assert_eq!(content(&manifest), content(&scanned));
        let image = open(bytes).unwrap();
        image.verify().unwrap();
        assert_eq!(image.manifest.absent_bytes(), 3 * chunk as u64);
        let mut out = Vec::new();
        image.export(&mut out).unwrap();
        let mut expected = raw.clone();
        for (index, &used) in used.iter().enumerate() {
            if !used {
                expected[index * chunk..(index + 1) * chunk].fill(0);
            }
        }
        assert!(out == expected);
        // A failing read names its offset and is not a write error.
        let mut writer = ImageWriter::new(Vec::new(), chunk as u32);
        let err = writer
            .push_from(&raw[..chunk * 2], raw.len() as u64, None, 3, |_, _| {})
            .unwrap_err();
        assert!(
            matches!(err, PushError::Read(ReadAtError { offset, .. }) if offset == 2 * chunk as u64)
        );
    }

    #[test]
    fn every_flipped_byte_is_detected_by_open_or_verify() {
        let raw = disk_like(4 * 16 * 1024 + 100);
        let good = write_image(&raw, 16 * 1024);
        let mut undetected = Vec::new();
        for at in 0..good.len() {
            let mut bytes = good.clone();
            bytes[at] ^= 0x04;
            let outcome = open(bytes).and_then(|image| {
                image.verify()?;
                let mut out = Vec::new();
                image.export(&mut out)?;
                Ok(out)
            });
            // A flip in a bit that zstd ignores still exports the right bytes: harmless. What
            // must never happen is a damaged file that verifies and exports wrong bytes.
            if let Ok(out) = outcome {
                assert!(out == raw, "flip at byte {at} exported wrong bytes");
                undetected.push(at);
            }
        }
        assert!(
            undetected.len() < 8,
            "flips at {undetected:?} went unnoticed"
        );
        // Truncation and appended bytes are caught too.
        assert!(open(good[..good.len() - 1].to_vec()).is_err());
        let mut longer = good.clone();
        longer.push(0);
        assert!(open(longer).is_err());
        assert!(matches!(
            open(b"hello".to_vec()),
            Err(ImageFileError::NotAnImage { .. })
        ));
    }

    #[test]
    fn footer_round_trips_and_refuses_damage() {
        let footer = Footer {
            data_len: 123_456_789,
            manifest_len: 4242,
            metadata_len: 200,
            image_hash: [7; 32],
            body_crc: 0xdead_beef,
        };
        let bytes = footer.emit();
        assert_eq!(Footer::parse(&bytes), Ok(footer.clone()));
        for at in 0..FOOTER_LEN {
            let mut damaged = bytes;
            damaged[at] ^= 1;
            assert!(Footer::parse(&damaged).is_err(), "flip at {at}");
        }
        let huge = Footer {
            manifest_len: u32::MAX,
            ..footer
        };
        assert!(matches!(
            Footer::parse(&huge.emit()),
            Err(FooterError::Sizes { .. })
        ));
    }

    #[test]
    fn metadata_round_trips_and_ignores_unknown_keys() {
        let meta = Metadata {
            created: 1_790_000_000,
            origin: "capture".into(),
            source_machine: "lab-12 52:54:00:12:34:56".into(),
            source_disk: "vda QEMU HARDDISK serial REF-1\nx".into(),
            compression: "zstd-3".into(),
            writer: "diskcast 0.1.0".into(),
        };
        let text = meta.render();
        let parsed = Metadata::parse(&format!("{text}future_key = 1\n")).unwrap();
        assert_eq!(parsed.source_disk, "vda QEMU HARDDISK serial REF-1 x");
        assert_eq!(
            Metadata {
                source_disk: meta.source_disk.replace('\n', " "),
                ..meta
            },
            parsed
        );
        assert!(Metadata::parse("created = soon").is_err());
    }

    #[test]
    fn image_names() {
        for good in ["golden", "win11-2026.11", "a", "lab_3"] {
            assert!(valid_image_name(good), "{good}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "../x", "a b", &"x".repeat(65)] {
            assert!(!valid_image_name(bad), "{bad}");
        }
    }
}
