//! Disk side of imaging: sources and targets that are block devices or image files, an O_DIRECT
//! writer thread fed through a bounded queue, zeroing, the final flush and the read-back check.

use super::fit::{finish_copy, FinishOptions};
use super::judge::{BatchCost, Verdict, WireJudge};
use crate::sys::{self, AlignedBuf};
use diskcast_proto::manifest::{classify, ChunkKind, Hash, Manifest};
use diskcast_proto::receiver::{ChunkWrite, DiskDone};
use diskcast_proto::sender::ChunkSource;
use diskcast_proto::units::human_size;
use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("opening {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is neither a block device nor a regular file")]
    NotADisk { path: PathBuf },
    #[error("reading the size of {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading {path} at offset {offset}")]
    Read {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    BlockDevice,
    File,
}

/// Alignment used for O_DIRECT buffers: safe for 512-byte and 4 KiB devices.
pub const DIRECT_ALIGN: usize = 4096;

fn open_err(path: &Path) -> impl FnOnce(io::Error) -> DiskError + '_ {
    move |source| DiskError::Open {
        path: path.into(),
        source,
    }
}

fn kind_of(path: &Path, file: &File) -> Result<Kind, DiskError> {
    let meta = file.metadata().map_err(open_err(path))?;
    if meta.file_type().is_block_device() {
        Ok(Kind::BlockDevice)
    } else if meta.is_file() {
        Ok(Kind::File)
    } else {
        Err(DiskError::NotADisk { path: path.into() })
    }
}

/// The disk or image file an image is read from.
#[derive(Debug)]
pub struct Source {
    pub path: PathBuf,
    pub kind: Kind,
    pub size: u64,
    file: Arc<File>,
    chunk_size: usize,
    cache: VecDeque<(u32, Vec<u8>)>,
    /// The data chunks sent as read from the source (not as stored frames), ascending, with the
    /// hash each had at the scan: a source that changes while it is sent must stop the send,
    /// not reach the receivers as "damaged".
    expected: Arc<[(u32, Hash)]>,
    /// Per entry of `expected`: read again since the scan and found the same.
    checked: Vec<bool>,
    /// zstd frames of the chunks compressed at the scan: they travel as they are.
    stored: HashMap<u32, Vec<u8>>,
    ahead: Ahead,
}

/// The first pass's reader (see [`ReadAhead`]).
#[derive(Debug)]
enum Ahead {
    /// Starts at the first chunk asked for.
    Idle,
    Running(ReadAhead),
    /// It stopped (an error, or no thread could start): chunks are read when asked.
    Ended,
}

/// A thread that reads the data chunks in order, each checked against its hash from the scan,
/// into a small queue: the first pass asks for them in that order, and the send thread then
/// neither waits for the disk nor hashes.
#[derive(Debug)]
struct ReadAhead {
    /// The position in `Source::expected` of the chunk the queue delivers next.
    next: usize,
    chunks: Option<Receiver<io::Result<Vec<u8>>>>,
    /// Buffers of chunks the cache let go, for the thread to read into again.
    spare: mpsc::Sender<Vec<u8>>,
    thread: Option<JoinHandle<()>>,
}

/// Bytes of chunks the read-ahead queue holds at most (at least one chunk): enough to cover a
/// slow read, little next to the cache.
const READ_AHEAD_BYTES: usize = 4 << 20;

impl Drop for ReadAhead {
    fn drop(&mut self) {
        // Hanging up fails the thread's next send (also one waiting on a full queue): it ends
        // within one chunk's read.
        self.chunks.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn changed_since_scan(path: &Path) -> io::Error {
    io::Error::other(format!(
        "its bytes changed since {} was scanned: something writes to it while it is sent (a mounted disk?); nothing sent from it can verify",
        path.display()
    ))
}

/// Offset and length of chunk `index` of a source of `size` bytes.
fn chunk_range(size: u64, chunk_size: usize, index: u32) -> (u64, usize) {
    let offset = u64::from(index) * chunk_size as u64;
    let len = (size.saturating_sub(offset)).min(chunk_size as u64) as usize;
    (offset, len)
}

/// How a scan for the wire compresses (see [`Source::scan_for_wire`]).
#[derive(Debug, Clone, Copy)]
pub struct WireCompression {
    pub level: i32,
    /// Bytes per second the link carries: compressing pays while it saves more link time than
    /// it costs.
    pub link_rate: u64,
    /// Most bytes of frames kept in memory.
    pub budget: usize,
}

/// What a scan for the wire did, for the log.
#[derive(Debug, Default, Clone, Copy)]
pub struct ScanReport {
    pub compressed_chunks: u32,
    pub stored_bytes: u64,
    /// Raw bytes of the chunks compressed.
    pub raw_bytes: u64,
    /// Batches that skipped compression because the CPU, not the link, was the limit.
    pub batches_raw_for_cpu: u32,
    pub batches_raw_for_memory: u32,
    /// The link rate (bytes per second) below which compressing paid, by the scan's last
    /// measurements; `None` when nothing was compressed to measure.
    pub break_even_rate: Option<f64>,
}

/// A frame is kept only when it is at most this share of the chunk (7/8): below that the link
/// time saved is not worth the receivers' decompression.
fn frame_pays(stored: usize, raw: usize) -> bool {
    stored * 8 <= raw * 7
}

const SOURCE_CACHE_CHUNKS: usize = 8;

impl Source {
    pub fn open(path: &Path, chunk_size: u32) -> Result<Self, DiskError> {
        let file = File::open(path).map_err(open_err(path))?;
        let kind = kind_of(path, &file)?;
        let size = match kind {
            Kind::BlockDevice => sys::block_device_size(&file),
            Kind::File => file.metadata().map(|m| m.len()),
        }
        .map_err(|source| DiskError::Size {
            path: path.into(),
            source,
        })?;
        Ok(Self {
            path: path.into(),
            kind,
            size,
            file: Arc::new(file),
            chunk_size: chunk_size as usize,
            cache: VecDeque::new(),
            expected: Arc::from([]),
            checked: Vec::new(),
            stored: HashMap::new(),
            ahead: Ahead::Idle,
        })
    }

    /// Sets what the data chunks held at the scan (those not stored as frames).
    fn expect(&mut self, manifest: &Manifest) {
        self.expected = manifest
            .chunks
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.stored.contains_key(&(*i as u32)))
            .filter_map(|(i, kind)| Some((i as u32, *kind.hash()?)))
            .collect();
        self.checked = vec![false; self.expected.len()];
        self.ahead = Ahead::Idle;
    }

    /// Reads the source once to build its manifest: the chunks `used` marks (every chunk when
    /// `None`); the others become absent.
    pub fn scan(
        &mut self,
        used: Option<&[bool]>,
        progress: impl FnMut(u64),
    ) -> Result<Manifest, DiskError> {
        let manifest = Manifest::scan_at(
            &*self.file,
            self.size,
            self.chunk_size as u32,
            used,
            progress,
        )
        .map_err(|e| DiskError::Read {
            path: self.path.clone(),
            offset: e.offset,
            source: e.source,
        })?;
        self.stored.clear();
        self.expect(&manifest);
        Ok(manifest)
    }
}

impl Source {
    /// Reads the source once to build its manifest for the wire: a reader thread reads the next
    /// batch while every core hashes the current one and, while [`WireJudge`] says compressing
    /// pays, compresses it, keeping the frames in memory (up to the budget) to send as they are.
    /// A chunk is compressed only when a sample of it shrinks, and its frame kept only when it
    /// is at most 7/8 of the chunk: random data costs a sample, not a full compression.
    pub fn scan_for_wire(
        &mut self,
        used: Option<&[bool]>,
        compression: WireCompression,
    ) -> Result<(Manifest, ScanReport), DiskError> {
        let chunk_size = self.chunk_size as u32;
        let count = diskcast_proto::manifest::chunk_count(self.size, chunk_size) as u32;
        let mut chunks = vec![ChunkKind::Absent; count as usize];
        let mut report = ScanReport::default();
        let mut stored = HashMap::new();
        let mut stored_total = 0usize;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let batch = diskcast_proto::codec::parallel_batch();
        let wanted: Vec<u32> = (0..count)
            .filter(|&i| used.is_none_or(|u| u.get(i as usize).copied().unwrap_or(true)))
            .collect();
        let mut judge = WireJudge::new(cores, compression.link_rate);
        let (file, path, size, wanted) = (&*self.file, &self.path, self.size, wanted.as_slice());
        std::thread::scope(|scope| -> Result<(), DiskError> {
            // One batch read ahead: the disk reads while the cores work.
            let (batches, read) =
                mpsc::sync_channel::<Result<(&[u32], Vec<Vec<u8>>), DiskError>>(1);
            scope.spawn(move || {
                for indexes in wanted.chunks(batch) {
                    let raw = indexes
                        .iter()
                        .map(|&i| {
                            let (offset, len) = chunk_range(size, chunk_size as usize, i);
                            let mut data = vec![0; len];
                            file.read_exact_at(&mut data, offset)
                                .map(|()| data)
                                .map_err(|source| DiskError::Read {
                                    path: path.clone(),
                                    offset,
                                    source,
                                })
                        })
                        .collect::<Result<Vec<_>, _>>();
                    let failed = raw.is_err();
                    if batches.send(raw.map(|raw| (indexes, raw))).is_err() || failed {
                        return;
                    }
                }
            });
            for next in read {
                let (indexes, raw) = next?;
                let verdict = (stored_total < compression.budget).then(|| judge.verdict());
                let compress = matches!(verdict, Some(Verdict::Compress | Verdict::Probe));
                let encoded: Vec<WireChunk> = std::thread::scope(|scope| {
                    let handles: Vec<_> = raw
                        .iter()
                        .map(|chunk| {
                            scope.spawn(move || encode_for_wire(chunk, compress, compression.level))
                        })
                        .collect();
                    handles
                        .into_iter()
                        .zip(&raw)
                        // A crashed encoder thread leaves its chunk raw, hashed here.
                        .map(|(h, chunk)| {
                            h.join()
                                .unwrap_or_else(|_| encode_for_wire(chunk, false, 0))
                        })
                        .collect()
                });
                let mut cost = BatchCost {
                    raw_bytes: 0,
                    saved_bytes: 0,
                    cpu_seconds: 0.0,
                };
                for ((&index, encoded), chunk) in indexes.iter().zip(encoded).zip(&raw) {
                    if encoded.kind.is_data() {
                        cost.raw_bytes += chunk.len() as u64;
                    }
                    cost.cpu_seconds += encoded.seconds;
                    let kind = match (encoded.kind, encoded.frame) {
                        (ChunkKind::Zstd { hash, .. }, Some(_))
                            if stored_total >= compression.budget =>
                        {
                            ChunkKind::Data(hash)
                        }
                        (kind, Some(frame)) => {
                            cost.saved_bytes += (chunk.len() - frame.len()) as u64;
                            stored_total += frame.len();
                            report.compressed_chunks += 1;
                            report.stored_bytes += frame.len() as u64;
                            report.raw_bytes += chunk.len() as u64;
                            stored.insert(index, frame);
                            kind
                        }
                        (kind, None) => kind,
                    };
                    chunks[index as usize] = kind;
                }
                match verdict {
                    Some(Verdict::Compress | Verdict::Probe) => judge.observe(cost),
                    Some(Verdict::Raw) => report.batches_raw_for_cpu += 1,
                    None => report.batches_raw_for_memory += 1,
                }
            }
            Ok(())
        })?;
        report.break_even_rate = judge.break_even_rate();
        self.stored = stored;
        let manifest = Manifest {
            image_size: self.size,
            chunk_size,
            chunks,
            signature: Vec::new(),
        };
        self.expect(&manifest);
        Ok((manifest, report))
    }
}

/// One chunk as the scan for the wire leaves it.
struct WireChunk {
    kind: ChunkKind,
    /// The zstd frame that travels instead of the chunk.
    frame: Option<Vec<u8>>,
    /// Time spent compressing (sample and frame), not hashing: what compressing costs.
    seconds: f64,
}

/// Bytes of the sample that decides whether a chunk is worth compressing whole: four slices
/// spread over the chunk.
const SAMPLE_SLICE: usize = 16 << 10;
const SAMPLE_SLICES: usize = 4;

/// Hashes `chunk` and, when `compress`, compresses it if a sample shrinks and keeps the frame if
/// it pays (see [`frame_pays`]).
fn encode_for_wire(chunk: &[u8], compress: bool, level: i32) -> WireChunk {
    // Not `codec::encode`: that compresses every data chunk whole; here a sample decides first,
    // and the CPU time is measured for the judge.
    let kind = classify(chunk);
    let (ChunkKind::Data(hash), true) = (kind, compress) else {
        return WireChunk {
            kind,
            frame: None,
            seconds: 0.0,
        };
    };
    let started = thread_cpu_seconds();
    let frame = sample_shrinks(chunk, level)
        .then(|| zstd::bulk::compress(chunk, level).ok())
        .flatten()
        .filter(|frame| frame_pays(frame.len(), chunk.len()));
    let seconds = (thread_cpu_seconds() - started).max(0.0);
    match frame {
        Some(frame) => WireChunk {
            kind: ChunkKind::Zstd {
                hash,
                stored_len: frame.len() as u32,
            },
            frame: Some(frame),
            seconds,
        },
        None => WireChunk {
            kind,
            frame: None,
            seconds,
        },
    }
}

/// CPU seconds this thread used: what compressing costs on a core, whatever else the machine
/// runs (wall time would count the time other processes had the core).
fn thread_cpu_seconds() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_THREAD).map_or(0.0, |u| {
        let seconds = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        seconds(u.user_time()) + seconds(u.system_time())
    })
}

/// Whether slices spread over `chunk` compress enough to pay: incompressible chunks (media,
/// archives, encrypted or random data) then cost a sixteenth of a 1 MiB chunk's compression.
/// A chunk too small to sample is compressed whole.
fn sample_shrinks(chunk: &[u8], level: i32) -> bool {
    if chunk.len() < 4 * SAMPLE_SLICE * SAMPLE_SLICES {
        return true;
    }
    let step = chunk.len() / SAMPLE_SLICES;
    let sample: Vec<u8> = (0..SAMPLE_SLICES)
        .flat_map(|i| &chunk[i * step..i * step + SAMPLE_SLICE])
        .copied()
        .collect();
    zstd::bulk::compress(&sample, level).is_ok_and(|frame| frame_pays(frame.len(), sample.len()))
}

/// Positioned reads of the source as it was opened (its size is the one measured then).
impl diskcast_proto::read_at::ReadAt for Source {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(&*self.file, buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }
}

impl Source {
    fn chunk_range(&self, index: u32) -> (u64, usize) {
        chunk_range(self.size, self.chunk_size, index)
    }

    /// Chunk `index` in a buffer of its own (a capture hands it to a compression thread).
    pub fn read_chunk(&self, index: u32) -> io::Result<Vec<u8>> {
        let (offset, len) = self.chunk_range(index);
        let mut data = vec![0; len];
        self.file.read_exact_at(&mut data, offset)?;
        Ok(data)
    }

    /// Reads chunk `index` into `data` now, checked against the scan the first time.
    fn read_now(&mut self, index: u32, mut data: Vec<u8>) -> io::Result<Vec<u8>> {
        let (offset, len) = self.chunk_range(index);
        data.resize(len, 0);
        self.file.read_exact_at(&mut data, offset)?;
        if let Ok(pos) = self.expected.binary_search_by_key(&index, |(i, _)| *i) {
            if !self.checked[pos] {
                self.checked[pos] = true;
                if *blake3::hash(&data).as_bytes() != self.expected[pos].1 {
                    return Err(changed_since_scan(&self.path));
                }
            }
        }
        Ok(data)
    }

    /// Chunk `index` from the read-ahead queue when it is the next one there (the first pass);
    /// `None` for any other chunk (a repair of an older one), read now instead. Chunks the queue
    /// holds before `index` are let go: they are read again if asked for.
    fn take_ahead(&mut self, index: u32) -> io::Result<Option<Vec<u8>>> {
        let Ok(pos) = self.expected.binary_search_by_key(&index, |(i, _)| *i) else {
            return Ok(None);
        };
        if matches!(self.ahead, Ahead::Idle) {
            self.ahead = self.start_ahead(pos);
        }
        let Ahead::Running(ahead) = &mut self.ahead else {
            return Ok(None);
        };
        if pos < ahead.next {
            return Ok(None);
        }
        let Some(chunks) = &ahead.chunks else {
            return Ok(None);
        };
        loop {
            let taken = chunks.recv();
            let at = ahead.next;
            ahead.next += 1;
            match taken {
                Ok(Ok(data)) if at == pos => {
                    self.checked[pos] = true;
                    return Ok(Some(data));
                }
                Ok(Ok(data)) => {
                    let _ = ahead.spare.send(data);
                }
                Ok(Err(e)) if at == pos => {
                    self.ahead = Ahead::Ended;
                    return Err(e);
                }
                // An error for a chunk skipped: it is found again if that chunk is asked for.
                Ok(Err(_)) | Err(_) => {
                    self.ahead = Ahead::Ended;
                    return Ok(None);
                }
            }
        }
    }

    /// Starts reading ahead from position `pos` of `expected`.
    fn start_ahead(&self, pos: usize) -> Ahead {
        let depth = (READ_AHEAD_BYTES / self.chunk_size.max(1)).clamp(1, 4);
        let (chunks_tx, chunks_rx) = mpsc::sync_channel(depth);
        let (spare_tx, spare_rx) = mpsc::channel::<Vec<u8>>();
        let (file, expected, path) = (self.file.clone(), self.expected.clone(), self.path.clone());
        let (size, chunk_size) = (self.size, self.chunk_size);
        let thread = std::thread::Builder::new()
            .name("source-read".into())
            .spawn(move || {
                for &(index, hash) in expected.get(pos..).unwrap_or_default() {
                    let (offset, len) = chunk_range(size, chunk_size, index);
                    let mut data = spare_rx.try_recv().unwrap_or_default();
                    data.resize(len, 0);
                    let read = file.read_exact_at(&mut data, offset).and_then(|()| {
                        if *blake3::hash(&data).as_bytes() == hash {
                            Ok(data)
                        } else {
                            Err(changed_since_scan(&path))
                        }
                    });
                    let failed = read.is_err();
                    if chunks_tx.send(read).is_err() || failed {
                        return;
                    }
                }
            });
        match thread {
            Ok(thread) => Ahead::Running(ReadAhead {
                next: pos,
                chunks: Some(chunks_rx),
                spare: spare_tx,
                thread: Some(thread),
            }),
            // No thread: chunks are read when asked, as they would be without one.
            Err(e) => {
                log::warn!("reading {} without read-ahead: {e}", self.path.display());
                Ahead::Ended
            }
        }
    }
}

impl ChunkSource for Source {
    fn chunk(&mut self, index: u32) -> io::Result<&[u8]> {
        if self.stored.contains_key(&index) {
            return Ok(self.stored.get(&index).map_or(&[][..], Vec::as_slice));
        }
        if let Some(pos) = self.cache.iter().position(|(i, _)| *i == index) {
            return Ok(&self.cache[pos].1);
        }
        let evicted = if self.cache.len() >= SOURCE_CACHE_CHUNKS {
            self.cache.pop_front().map(|(_, v)| v)
        } else {
            None
        };
        let data = match self.take_ahead(index)? {
            Some(data) => {
                if let (Some(old), Ahead::Running(ahead)) = (evicted, &self.ahead) {
                    let _ = ahead.spare.send(old);
                }
                data
            }
            None => self.read_now(index, evicted.unwrap_or_default())?,
        };
        self.cache.push_back((index, data));
        Ok(self.cache.back().map_or(&[][..], |(_, v)| v.as_slice()))
    }
}

/// The disk or image file an image is written to.
#[derive(Debug)]
pub struct Target {
    pub path: PathBuf,
    pub kind: Kind,
    /// Bytes available; regular files grow, so they have no limit.
    pub size: u64,
    pub logical_block: u32,
    /// Whether writes bypass the page cache.
    pub direct: bool,
    direct_file: File,
    buffered_file: File,
}

impl Target {
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let buffered_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(false)
            .open(path)
            .or_else(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(path)
                } else {
                    Err(e)
                }
            });
        let buffered_file = buffered_file.map_err(open_err(path))?;
        let kind = kind_of(path, &buffered_file)?;
        let (size, logical_block) = match kind {
            Kind::BlockDevice => {
                let size =
                    sys::block_device_size(&buffered_file).map_err(|source| DiskError::Size {
                        path: path.into(),
                        source,
                    })?;
                let lbs = sys::logical_block_size(&buffered_file).unwrap_or(512);
                (size, lbs)
            }
            Kind::File => (u64::MAX, 512),
        };
        // O_DIRECT where the file system supports it (tmpfs does not).
        let direct = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        let (direct_file, direct) = match direct {
            Ok(file) => (file, true),
            Err(_) => (buffered_file.try_clone().map_err(open_err(path))?, false),
        };
        Ok(Self {
            path: path.into(),
            kind,
            size,
            logical_block,
            direct,
            direct_file,
            buffered_file,
        })
    }

    /// Prepares a regular file for an image of `image_size` bytes.
    pub fn prepare(&self, image_size: u64) -> io::Result<()> {
        if self.kind == Kind::File {
            self.buffered_file.set_len(image_size)?;
        }
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64, staging: &mut AlignedBuf) -> io::Result<()> {
        let align = (self.logical_block as usize).max(512);
        let aligned_len = data.len() - data.len() % align;
        if self.direct && offset.is_multiple_of(align as u64) && aligned_len > 0 {
            if staging.len() < aligned_len {
                *staging = AlignedBuf::new(aligned_len, DIRECT_ALIGN);
            }
            staging.as_mut_slice()[..aligned_len].copy_from_slice(&data[..aligned_len]);
            self.direct_file
                .write_all_at(&staging.as_slice()[..aligned_len], offset)?;
            if aligned_len < data.len() {
                // A tail shorter than a logical block (the image's last bytes) cannot go direct.
                self.buffered_file
                    .write_all_at(&data[aligned_len..], offset + aligned_len as u64)?;
            }
            Ok(())
        } else {
            self.buffered_file.write_all_at(data, offset)
        }
    }

    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.kind {
            Kind::BlockDevice => {
                if offset.is_multiple_of(512)
                    && len.is_multiple_of(512)
                    && sys::block_zero_out(&self.buffered_file, offset, len).is_ok()
                {
                    return Ok(());
                }
            }
            Kind::File => {
                let flags = nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
                if nix::fcntl::fallocate(
                    std::os::fd::AsRawFd::as_raw_fd(&self.buffered_file),
                    flags,
                    offset as i64,
                    len as i64,
                )
                .is_ok()
                {
                    return Ok(());
                }
            }
        }
        // Neither the device nor the file system can zero ranges: write zeros.
        let zeros = vec![0u8; 1 << 20];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.buffered_file
                .write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.buffered_file.sync_data()?;
        if self.direct {
            self.direct_file.sync_data()?;
        }
        Ok(())
    }

    /// Re-reads what was written (bypassing the page cache where possible) and returns the image
    /// hash of what is really on the target.
    /// Reads one range back from the device (O_DIRECT where possible, so what is checked is what
    /// the disk holds, not the page cache) and classifies it like the sender did.
    fn read_chunk(&self, offset: u64, len: usize, buf: &mut AlignedBuf) -> io::Result<ChunkKind> {
        if buf.len() < len {
            *buf = AlignedBuf::new(len, DIRECT_ALIGN);
        }
        let align = (self.logical_block as usize).max(512);
        let aligned_len = len - len % align;
        let slice = &mut buf.as_mut_slice()[..len];
        if self.direct && aligned_len > 0 && offset.is_multiple_of(align as u64) {
            self.direct_file
                .read_exact_at(&mut slice[..aligned_len], offset)?;
            if aligned_len < len {
                self.buffered_file
                    .read_exact_at(&mut slice[aligned_len..], offset + aligned_len as u64)?;
            }
        } else {
            self.buffered_file.read_exact_at(slice, offset)?;
        }
        Ok(classify(&buf.as_slice()[..len]))
    }

    /// Builds the manifest of what the target really holds: chunks already read back after an
    /// earlier flush are taken from `checked`, the rest are read now. Returns its image hash and
    /// the first chunk that differs from `manifest`.
    fn read_back(
        &self,
        manifest: &Manifest,
        checked: &HashMap<u32, ChunkKind>,
    ) -> io::Result<(Hash, Option<u32>)> {
        let mut buf = AlignedBuf::new(manifest.chunk_size as usize, DIRECT_ALIGN);
        let mut chunks = Vec::with_capacity(manifest.chunks.len());
        for (index, kind) in manifest.chunks.iter().enumerate() {
            if *kind == ChunkKind::Absent {
                chunks.push(ChunkKind::Absent);
                continue;
            }
            let known = checked.get(&(index as u32)).copied();
            let read = match known {
                Some(kind) => kind,
                None => {
                    let (offset, len) = manifest.chunk_range(index as u32);
                    self.read_chunk(offset, len, &mut buf)?
                }
            };
            chunks.push(read);
        }
        let read = Manifest {
            image_size: manifest.image_size,
            chunk_size: manifest.chunk_size,
            chunks,
            signature: Vec::new(),
        };
        Ok((read.image_hash(), manifest.first_difference(&read)))
    }
}

/// Chunks written since the last flush that are checked together: flush, then read each back.
/// Checking during the transfer leaves only the last few chunks to read after the final flush.
const CHECK_BATCH: usize = 32;

/// Work for the writer thread.
#[derive(Debug)]
pub enum DiskOp {
    /// Size an image file for the image (block devices need nothing).
    Prepare {
        image_size: u64,
    },
    /// Decode (decompress, check the hash), then write.
    Write(ChunkWrite),
    Zero {
        offset: u64,
        len: u64,
    },
    FlushAndVerify {
        manifest: Box<Manifest>,
    },
}

/// The receiver's side of the writer thread: work goes in, completions come out, and `wake`
/// becomes readable whenever a completion is waiting, so the network loop can sleep on its
/// socket and this one descriptor instead of polling.
#[derive(Debug)]
pub struct WriterHandle {
    pub ops: SyncSender<DiskOp>,
    pub done: Receiver<DiskDone>,
    pub wake: UnixDatagram,
}

impl WriterHandle {
    /// The next completion, if one is waiting (and the wake-up that announced it consumed).
    pub fn try_done(&self) -> Option<DiskDone> {
        let mut byte = [0u8; 1];
        while self.wake.recv(&mut byte).is_ok() {}
        self.done.try_recv().ok()
    }
}

/// Starts the writer thread. The op queue is bounded so a slow disk slows the receiver (and,
/// through socket overflows, the sender) instead of filling memory.
pub fn spawn_writer(
    target: Target,
    depth: usize,
    finish: FinishOptions,
) -> io::Result<WriterHandle> {
    let (op_tx, op_rx) = mpsc::sync_channel::<DiskOp>(depth);
    let (done_tx, done_rx) = mpsc::channel::<DiskDone>();
    let (wake_tx, wake_rx) = UnixDatagram::pair()?;
    wake_tx.set_nonblocking(true)?;
    wake_rx.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("disk-writer".into())
        .spawn(move || {
            let mut writer = Writer::new(Arc::new(target), 1 << 20, finish);
            for op in op_rx {
                let done = match op {
                    DiskOp::Prepare { image_size } => match writer.target.prepare(image_size) {
                        Ok(()) => continue,
                        Err(e) => DiskDone::Failed(format!(
                            "sizing {} to {image_size} bytes: {e}",
                            writer.path
                        )),
                    },
                    DiskOp::Write(write) => writer.write(write),
                    DiskOp::Zero { offset, len } => writer.zero(offset, len),
                    DiskOp::FlushAndVerify { manifest } => {
                        DiskDone::Verified(writer.flush_and_verify(&manifest))
                    }
                };
                if done_tx.send(done).is_err() {
                    break;
                }
                // A full wake-up buffer already holds a wake-up: nothing is lost.
                let _ = wake_tx.send(&[1]);
            }
        })?;
    Ok(WriterHandle {
        ops: op_tx,
        done: done_rx,
        wake: wake_rx,
    })
}

/// The writer thread's state.
struct Writer {
    target: Arc<Target>,
    path: String,
    staging: AlignedBuf,
    /// Written since the last batch went to the verifier: (chunk, offset, length).
    unchecked: Vec<(u32, u64, usize)>,
    /// What chunks read back as after a flush; a chunk read back stays valid, since nothing
    /// writes it again.
    checked: HashMap<u32, ChunkKind>,
    verifier: Verifier,
    /// What follows a verified read-back, before the copy counts as done.
    finish: FinishOptions,
    /// Rebuilds chunks from parity; kept between chunks (no work buffers allocated per chunk).
    coder: diskcast_proto::fec::Coder,
}

impl Writer {
    /// A writer of `target` (with its verifier thread) whose staging buffer fits `chunk` bytes.
    fn new(target: Arc<Target>, chunk: usize, finish: FinishOptions) -> Self {
        Self {
            path: target.path.display().to_string(),
            verifier: Verifier::spawn(target.clone()),
            target,
            staging: AlignedBuf::new(chunk, DIRECT_ALIGN),
            unchecked: Vec::new(),
            checked: HashMap::new(),
            finish,
            coder: diskcast_proto::fec::Coder::default(),
        }
    }

    fn write(&mut self, write: ChunkWrite) -> DiskDone {
        let (chunk, offset) = (write.chunk, write.offset);
        let data = match write.decode_with(&mut self.coder) {
            Ok(data) => data,
            Err(e) => {
                return DiskDone::Rejected {
                    chunk,
                    why: format!("{e} (offset {offset})"),
                }
            }
        };
        if let Err(e) = self.target.write_at(&data, offset, &mut self.staging) {
            return DiskDone::Failed(format!(
                "writing {} bytes at offset {offset} of {}: {e}",
                data.len(),
                self.path
            ));
        }
        self.unchecked.push((chunk, offset, data.len()));
        if self.unchecked.len() >= CHECK_BATCH {
            self.verifier.check(std::mem::take(&mut self.unchecked));
        }
        self.verifier.collect(&mut self.checked, false);
        if let Some(e) = &self.verifier.failed {
            return DiskDone::Failed(format!("flushing and reading back {}: {e}", self.path));
        }
        DiskDone::Written { chunk }
    }

    fn zero(&mut self, offset: u64, len: u64) -> DiskDone {
        match self.target.zero(offset, len) {
            Ok(()) => DiskDone::Zeroed { len },
            Err(e) => DiskDone::Failed(format!(
                "zeroing {len} bytes at offset {offset} of {}: {e}",
                self.path
            )),
        }
    }

    fn flush_and_verify(&mut self, manifest: &Manifest) -> Result<Hash, String> {
        let path = &self.path;
        self.verifier.collect(&mut self.checked, true);
        if let Some(e) = &self.verifier.failed {
            return Err(format!("flushing and reading back {path}: {e}"));
        }
        self.target
            .flush()
            .map_err(|e| format!("flushing {path}: {e}"))?;
        let (hash, difference) = self
            .target
            .read_back(manifest, &self.checked)
            .map_err(|e| format!("reading back {path}: {e}"))?;
        match difference {
            None => {
                log::info!(
                    "copy verified: {} written and read back, {} skipped as unused",
                    human_size(manifest.image_size - manifest.absent_bytes()),
                    human_size(manifest.absent_bytes())
                );
                // The sender hears "verified" only once the disk is finished too.
                finish_copy(&self.target.path, manifest, self.finish)
                    .map_err(|e| diskcast_proto::error_chain(&e))?;
                Ok(hash)
            }
            Some(chunk) => {
                let (offset, _) = manifest.chunk_range(chunk);
                Err(format!(
                    "read back: chunk {chunk} at offset {offset} differs from the image"
                ))
            }
        }
    }
}

/// The read-back checks of written batches, on a thread of their own: the writer keeps writing
/// while the last batch is flushed and read back (reads do not slow the writes much, the disk's
/// write rate is what the transfer waits for).
struct Verifier {
    batches: Option<SyncSender<Vec<(u32, u64, usize)>>>,
    /// Per batch, what its chunks read back as, or why they could not be.
    results: Receiver<io::Result<Vec<(u32, ChunkKind)>>>,
    /// Batches handed over whose results were not collected yet.
    outstanding: usize,
    /// The first check that failed: the copy cannot verify.
    failed: Option<io::Error>,
    thread: Option<JoinHandle<()>>,
}

impl Verifier {
    fn spawn(target: Arc<Target>) -> Self {
        // One batch waiting while one is checked: the writer is never more than that ahead.
        let (batches_tx, batches_rx) = mpsc::sync_channel::<Vec<(u32, u64, usize)>>(1);
        let (results_tx, results_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("disk-verify".into())
            .spawn(move || {
                let mut buf = AlignedBuf::new(1 << 20, DIRECT_ALIGN);
                for batch in batches_rx {
                    // The flush comes after every write of the batch (they completed before it
                    // was handed over), so what is read back is what the disk keeps.
                    let checked = target.flush().and_then(|()| {
                        batch
                            .into_iter()
                            .map(|(chunk, offset, len)| {
                                Ok((chunk, target.read_chunk(offset, len, &mut buf)?))
                            })
                            .collect()
                    });
                    if results_tx.send(checked).is_err() {
                        return;
                    }
                }
            });
        // Without the thread, batches are not checked during the transfer: the final read-back
        // reads every chunk not checked, so nothing is left out.
        let (batches, thread) = match thread {
            Ok(thread) => (Some(batches_tx), Some(thread)),
            Err(e) => {
                log::warn!("reading back only at the end: {e}");
                (None, None)
            }
        };
        Self {
            batches,
            results: results_rx,
            outstanding: 0,
            failed: None,
            thread,
        }
    }

    /// Hands `batch` (written, not flushed yet) over to be flushed and read back.
    fn check(&mut self, batch: Vec<(u32, u64, usize)>) {
        if let Some(batches) = &self.batches {
            if batches.send(batch).is_ok() {
                self.outstanding += 1;
            }
        }
    }

    /// Moves the results in to `checked`; with `all`, waits for every batch handed over. A
    /// batch whose result never comes (the thread is gone) leaves its chunks out of `checked`:
    /// the final read-back reads them.
    fn collect(&mut self, checked: &mut HashMap<u32, ChunkKind>, all: bool) {
        while self.outstanding > 0 {
            let result = if all {
                self.results.recv().map_err(|_| TryRecvError::Disconnected)
            } else {
                self.results.try_recv()
            };
            let batch = match result {
                Ok(batch) => batch,
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.outstanding = 0;
                    return;
                }
            };
            self.outstanding -= 1;
            match batch {
                Ok(kinds) => checked.extend(kinds),
                Err(e) => {
                    self.failed.get_or_insert(e);
                }
            }
        }
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        self.batches.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads `len` bytes at `offset`, for tests and tools.
pub fn read_range(path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0; len];
    file.read_exact(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_that_changes_after_its_scan_is_caught_when_sent() {
        let path = std::env::temp_dir().join(format!("diskcast-source-{}", std::process::id()));
        let chunk = 64 << 10;
        let mut image = vec![0u8; 4 * chunk];
        image[..chunk].fill(7);
        image[2 * chunk..3 * chunk].fill(9);
        std::fs::write(&path, &image).unwrap();
        let mut source = Source::open(&path, chunk as u32).unwrap();
        let manifest = source.scan(None, |_| {}).unwrap();
        assert_eq!(manifest.data_chunks().collect::<Vec<_>>(), [0, 2]);
        // Something writes to the disk while it is being sent (the read-ahead starts at the
        // first chunk asked for, so it reads the changed bytes).
        image[2 * chunk + 100] = 1;
        std::fs::write(&path, &image).unwrap();
        assert_eq!(source.chunk(0).unwrap()[0], 7);
        let err = source.chunk(2).unwrap_err().to_string();
        assert!(err.contains("changed since"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");

        // The same change, found when the chunk is read on its own: the first pass went past it
        // (its error in the queue is let go), then it is asked for.
        let mut image = numbered(8, chunk);
        std::fs::write(&path, &image).unwrap();
        let mut source = Source::open(&path, chunk as u32).unwrap();
        source.scan(None, |_| {}).unwrap();
        image[2 * chunk + 100] = 0;
        std::fs::write(&path, &image).unwrap();
        assert_eq!(source.chunk(0).unwrap()[0], 0xff);
        assert_eq!(source.chunk(5).unwrap()[0], 5);
        assert_eq!(source.chunk(1).unwrap()[0], 1);
        let err = source.chunk(2).unwrap_err().to_string();
        assert!(err.contains("changed since"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }

    /// An image of `chunks` chunks, each filled with its index (chunk 0 with 0xff), every fifth
    /// zero.
    fn numbered(chunks: usize, chunk: usize) -> Vec<u8> {
        let mut image = vec![0u8; chunks * chunk];
        for (i, block) in image.chunks_mut(chunk).enumerate() {
            if i % 5 != 4 {
                block.fill(if i == 0 { 0xff } else { i as u8 });
            }
        }
        image
    }

    #[test]
    fn the_read_ahead_serves_the_first_pass_in_order_and_repairs_out_of_order() {
        let path = std::env::temp_dir().join(format!("diskcast-ahead-{}", std::process::id()));
        let chunk = 64 << 10;
        // Short last chunk: its length is the image's.
        let mut image = numbered(40, chunk);
        image.truncate(image.len() - 1000);
        std::fs::write(&path, &image).unwrap();
        let mut source = Source::open(&path, chunk as u32).unwrap();
        let manifest = source.scan(None, |_| {}).unwrap();
        let expect = |index: u32| {
            let (offset, len) = manifest.chunk_range(index);
            &image[offset as usize..offset as usize + len]
        };
        let data: Vec<u32> = manifest.data_chunks().collect();
        assert_eq!(data.len(), 32);
        for (n, &index) in data.iter().enumerate() {
            // Block by block: the same chunk several times.
            for _ in 0..3 {
                assert_eq!(source.chunk(index).unwrap(), expect(index), "chunk {index}");
            }
            // Repairs of older chunks (some out of the cache) between first-pass chunks.
            if n % 7 == 6 {
                for old in [data[0], data[n / 2], data[n - 1]] {
                    assert_eq!(source.chunk(old).unwrap(), expect(old), "repair {old}");
                }
            }
            let Ahead::Running(ahead) = &source.ahead else {
                panic!("chunk {index} not read ahead: {:?}", source.ahead);
            };
            assert_eq!(ahead.next, n + 1, "chunk {index} taken from the queue");
        }
        assert!(source.checked.iter().all(|&c| c), "every chunk checked");

        // A first pass that jumps ahead skips what it passed; those are read when asked for.
        let mut source = Source::open(&path, chunk as u32).unwrap();
        source.scan(None, |_| {}).unwrap();
        for index in [1, 12, 2, 13, 39, 0] {
            assert_eq!(source.chunk(index).unwrap(), expect(index), "chunk {index}");
        }
        // Zero chunks are read as they are, never queued.
        assert_eq!(source.chunk(4).unwrap(), expect(4));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn the_read_ahead_thread_ends_when_its_source_is_dropped() {
        let path = std::env::temp_dir().join(format!("diskcast-ahead-end-{}", std::process::id()));
        let chunk = 64 << 10;
        std::fs::write(&path, numbered(40, chunk)).unwrap();
        let mut source = Source::open(&path, chunk as u32).unwrap();
        source.scan(None, |_| {}).unwrap();
        source.chunk(0).unwrap();
        // The thread holds the file while it reads ahead: 32 chunks do not fit its queue, so it
        // waits on it.
        let file = Arc::downgrade(&source.file);
        assert_eq!(file.strong_count(), 2);
        drop(source);
        assert!(file.upgrade().is_none(), "the read-ahead thread still runs");
        std::fs::remove_file(&path).unwrap();
    }

    fn disk_like(chunks: usize, chunk: usize) -> Vec<u8> {
        let mut image = vec![0u8; chunks * chunk];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for (i, block) in image.chunks_mut(chunk).enumerate() {
            match i % 3 {
                0 => {}
                1 => block
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = b"usr/lib/x86_64-linux-gnu/ "[j % 26]),
                _ => block.iter_mut().for_each(|b| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    *b = (state >> 24) as u8;
                }),
            }
        }
        image
    }

    #[test]
    fn a_scan_for_the_wire_compresses_what_pays_and_serves_frames_that_decode() {
        let path = std::env::temp_dir().join(format!("diskcast-wire-{}", std::process::id()));
        let chunk = 64 << 10;
        let image = disk_like(12, chunk);
        std::fs::write(&path, &image).unwrap();
        // A slow link: compressing always pays.
        let slow = WireCompression {
            level: 1,
            link_rate: 1,
            budget: 1 << 30,
        };
        let mut source = Source::open(&path, chunk as u32).unwrap();
        let (manifest, report) = source.scan_for_wire(None, slow).unwrap();
        assert_eq!(report.compressed_chunks, 4, "{report:?}");
        assert_eq!(report.batches_raw_for_cpu, 0, "{report:?}");
        let text = manifest.chunks[1];
        assert!(matches!(text, ChunkKind::Zstd { .. }), "{text:?}");
        assert!(
            matches!(manifest.chunks[2], ChunkKind::Data(_)),
            "random stays raw"
        );
        assert_eq!(manifest.chunks[0], ChunkKind::Zero);
        for index in manifest.data_chunks() {
            let (offset, len) = manifest.chunk_range(index);
            let stored = source.chunk(index).unwrap().to_vec();
            let kind = manifest.chunks[index as usize];
            let raw = diskcast_proto::codec::decode(index, &kind, &stored, len).unwrap();
            assert_eq!(&raw[..], &image[offset as usize..offset as usize + len]);
        }
        // The manifest says how chunks travel; what they hold is what a plain scan finds.
        let plain = Source::open(&path, chunk as u32)
            .unwrap()
            .scan(None, |_| {})
            .unwrap();
        for (a, b) in manifest.chunks.iter().zip(&plain.chunks) {
            assert_eq!(a.hash(), b.hash());
        }

        // The scan measured what compressing costs here: the link rate below which it pays.
        assert!(
            report.break_even_rate.is_some_and(|r| r > 0.0),
            "{report:?}"
        );
        // Which batches go raw on a link faster than the CPU is the judge's to test (judge.rs):
        // this content compresses in less time than a thread's CPU clock resolves, so here it
        // pays at any link rate.

        // No memory for frames: everything raw, still correct.
        let tight = WireCompression { budget: 0, ..slow };
        let mut source = Source::open(&path, chunk as u32).unwrap();
        let (manifest, report) = source.scan_for_wire(None, tight).unwrap();
        assert_eq!(report.compressed_chunks, 0);
        assert!(!manifest.is_compressed());
        std::fs::remove_file(&path).unwrap();
    }

    /// Writes `image` through a writer thread, chunk `moved.0` at the offset of chunk `moved.1`,
    /// and returns what the final flush and read-back said.
    fn write_image(name: &str, image: &[u8], chunk: usize, moved: (u32, u32)) -> DiskDone {
        let path = std::env::temp_dir().join(format!("diskcast-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let manifest =
            Manifest::scan_at(image, image.len() as u64, chunk as u32, None, |_| {}).unwrap();
        let writer =
            spawn_writer(Target::open(&path).unwrap(), 4, FinishOptions::default()).unwrap();
        let op = |op| writer.ops.send(op).unwrap();
        op(DiskOp::Prepare {
            image_size: image.len() as u64,
        });
        for index in manifest.data_chunks() {
            let (offset, len) = manifest.chunk_range(index);
            let at = if index == moved.0 { moved.1 } else { index };
            op(DiskOp::Write(ChunkWrite {
                chunk: index,
                offset: manifest.chunk_range(at).0,
                stored: image[offset as usize..offset as usize + len].to_vec(),
                kind: manifest.chunks[index as usize],
                raw_len: len,
                repair: None,
            }));
            let done = writer.done.recv().unwrap();
            assert!(matches!(done, DiskDone::Written { .. }), "{done:?}");
        }
        op(DiskOp::FlushAndVerify {
            manifest: Box::new(manifest),
        });
        let done = writer.done.recv().unwrap();
        std::fs::remove_file(&path).unwrap();
        done
    }

    #[test]
    fn the_writer_verifies_what_it_wrote_and_fails_a_copy_that_reads_back_wrong() {
        let chunk = 64 << 10;
        // Several read-back batches, and a last one the final flush reads.
        let image = numbered(3 * CHECK_BATCH + 5, chunk);
        let manifest =
            Manifest::scan_at(&image[..], image.len() as u64, chunk as u32, None, |_| {}).unwrap();
        let done = write_image("written", &image, chunk, (0, 0));
        assert_eq!(done, DiskDone::Verified(Ok(manifest.image_hash())));
        // Chunk 7's bytes land on chunk 3 (in the first batch, read back while later ones are
        // written): the copy fails at chunk 3, never verified.
        let done = write_image("misplaced", &image, chunk, (7, 3));
        let DiskDone::Verified(Err(why)) = done else {
            panic!("{done:?}");
        };
        assert!(why.contains("chunk 3 at offset"), "{why}");
    }

    #[test]
    fn a_read_back_that_fails_fails_the_copy() {
        let path = std::env::temp_dir().join(format!("diskcast-unread-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let chunk = 64 << 10;
        let image = numbered(4, chunk);
        std::fs::write(&path, &image).unwrap();
        let manifest =
            Manifest::scan_at(&image[..], image.len() as u64, chunk as u32, None, |_| {}).unwrap();
        let target = Arc::new(Target::open(&path).unwrap());
        let mut writer = Writer::new(target, chunk, FinishOptions::default());
        // A batch that reads past the end of the file: the image itself is intact.
        writer.verifier.check(vec![(9, 64 * chunk as u64, chunk)]);
        let why = writer.flush_and_verify(&manifest).unwrap_err();
        assert!(why.starts_with("flushing and reading back"), "{why}");
        std::fs::remove_file(&path).unwrap();
    }

    /// Prints the writer's rate with the read-back of each batch waited for (as before the
    /// verifier thread) and overlapped: `DISKCAST_BENCH_DIR=DIR cargo test -p diskcast-agent
    /// --lib writer_rate -- --ignored --nocapture` (a directory on the disk to measure).
    #[test]
    #[ignore = "a benchmark: prints figures"]
    fn writer_rate() {
        let dir =
            std::env::var_os("DISKCAST_BENCH_DIR").map_or(std::env::temp_dir(), PathBuf::from);
        let path = dir.join(format!("diskcast-writer-rate-{}", std::process::id()));
        let (chunk, chunks) = (1 << 20, 256);
        let image = disk_like(chunks, chunk)
            .chunks(chunk)
            .flat_map(|c| c.iter().map(|b| b ^ 0x5a))
            .collect::<Vec<u8>>();
        let manifest =
            Manifest::scan_at(&image[..], image.len() as u64, chunk as u32, None, |_| {}).unwrap();
        for (round, serial) in [true, false, true, false].into_iter().enumerate() {
            let _ = std::fs::remove_file(&path);
            let target = Arc::new(Target::open(&path).unwrap());
            target.prepare(image.len() as u64).unwrap();
            let mut writer = Writer::new(target, chunk, FinishOptions::default());
            let started = std::time::Instant::now();
            for index in 0..chunks as u32 {
                let (offset, len) = manifest.chunk_range(index);
                let done = writer.write(ChunkWrite {
                    chunk: index,
                    offset,
                    stored: image[offset as usize..offset as usize + len].to_vec(),
                    kind: manifest.chunks[index as usize],
                    raw_len: len,
                    repair: None,
                });
                assert!(matches!(done, DiskDone::Written { .. }), "{done:?}");
                if serial {
                    writer.verifier.collect(&mut writer.checked, true);
                }
            }
            writer.flush_and_verify(&manifest).unwrap();
            let seconds = started.elapsed().as_secs_f64();
            println!(
                "round {round} {}: {:.1} MB/s ({:.2} s)",
                if serial {
                    "read-back waited for"
                } else {
                    "read-back overlapped"
                },
                image.len() as f64 / seconds / 1e6,
                seconds
            );
        }
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_sample_tells_compressible_chunks_from_random_ones() {
        let chunk = 1 << 20;
        let image = disk_like(3, chunk);
        assert!(sample_shrinks(&image[chunk..2 * chunk], 1), "text");
        assert!(!sample_shrinks(&image[2 * chunk..], 1), "random");
        // Random at the head, text after it: slices spread over the chunk find the text.
        let mut mixed = image[chunk..2 * chunk].to_vec();
        mixed[..chunk / 8].copy_from_slice(&image[2 * chunk..2 * chunk + chunk / 8]);
        assert!(sample_shrinks(&mixed, 1));
        // Too small to sample: compressed whole.
        assert!(sample_shrinks(&image[2 * chunk..2 * chunk + (64 << 10)], 1));
        // A 1 MiB random chunk costs a sample, not a whole compression, and stays raw.
        let encoded = encode_for_wire(&image[2 * chunk..], true, 1);
        assert!(encoded.frame.is_none());
        assert!(matches!(encoded.kind, ChunkKind::Data(_)));
        let encoded = encode_for_wire(&image[chunk..2 * chunk], true, 1);
        assert!(matches!(encoded.kind, ChunkKind::Zstd { .. }));
        let frame = encoded.frame.unwrap();
        let raw = diskcast_proto::codec::decode(1, &encoded.kind, &frame, chunk).unwrap();
        assert_eq!(&raw[..], &image[chunk..2 * chunk]);
    }
}
