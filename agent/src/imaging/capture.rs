//! Capture: read a disk, compress its data chunks, and stream them as an image file to the
//! bootserver's store (`PUT /images/NAME` over HTTP/1.1 with chunked transfer coding, since the
//! compressed size is known only at the end). The server checks the whole file before the image
//! appears in its store, and answers with what it stored.

use super::disk::{DiskError, Source};
use crate::http_client::{read_response, ConnectError, Connection, Endpoint, Handle};
use diskcast_fsmap::chunks_to_read;
use diskcast_proto::cmdline::Blocks;
use diskcast_proto::codec;
use diskcast_proto::image_file::{
    valid_image_name, ImageWriter, Metadata, PushError, IMAGE_NAME_RULE,
};
use diskcast_proto::manifest::{Manifest, DEFAULT_CHUNK_SIZE};
use diskcast_proto::units::human_size;
use std::io::{self, BufReader, BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("image name {0:?} is invalid: use {IMAGE_NAME_RULE}")]
    Name(String),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("the source {0} is empty")]
    Empty(PathBuf),
    #[error("reaching the image store")]
    Connect(#[from] ConnectError),
    #[error("reading {path} at offset {offset}")]
    Read {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("uploading to {addr} (the server closed the connection or the network failed)")]
    Upload {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("the image store at {addr} did not answer within {} s", waited.as_secs())]
    NoAnswer { addr: SocketAddr, waited: Duration },
    #[error("reading the image store's answer from {addr}")]
    Answer {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("a compression thread crashed; nothing was stored")]
    Compressor,
    #[error("the image store at {addr} refused the image: {status} {message}")]
    Refused {
        addr: SocketAddr,
        status: u16,
        message: String,
    },
}

#[derive(Debug, Clone)]
pub struct CaptureOptions {
    pub source: PathBuf,
    /// The store's API: plain HTTP, or HTTPS with the certificate pinned or a CA.
    pub server: Endpoint,
    pub name: String,
    pub level: i32,
    pub chunk_size: u32,
    /// Describes the machine and disk in the image's metadata.
    pub source_machine: String,
    pub source_disk: String,
    /// Which blocks of the source are read and stored.
    pub blocks: Blocks,
    /// What proves the upload is wanted: the capture task's one-time token, or the store's
    /// admin token. Sent in the `Authorization` header, never logged.
    pub token: Option<String>,
}

impl CaptureOptions {
    pub fn new(source: PathBuf, server: Endpoint, name: String) -> Self {
        Self {
            source,
            server,
            name,
            level: codec::DEFAULT_LEVEL,
            chunk_size: DEFAULT_CHUNK_SIZE,
            source_machine: String::new(),
            source_disk: String::new(),
            blocks: Blocks::default(),
            token: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CaptureSummary {
    pub manifest: Manifest,
    pub uploaded: u64,
    pub elapsed: Duration,
    /// The server's answer, one line.
    pub server_says: String,
}

/// Writes HTTP/1.1 chunked transfer coding: each `write` is one chunk (put a `BufWriter` in
/// front so chunks are large).
#[derive(Debug)]
struct ChunkedWriter<W: Write> {
    inner: W,
    written: u64,
}

impl<W: Write> Write for ChunkedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        write!(self.inner, "{:x}\r\n", buf.len())?;
        self.inner.write_all(buf)?;
        self.inner.write_all(b"\r\n")?;
        self.written += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads `opts.source` and uploads it; `progress` gets (bytes read, bytes uploaded).
pub fn run_capture(
    opts: &CaptureOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<CaptureSummary, CaptureError> {
    if !valid_image_name(&opts.name) {
        return Err(CaptureError::Name(opts.name.clone()));
    }
    let source = Source::open(&opts.source, opts.chunk_size)?;
    if source.size == 0 {
        return Err(CaptureError::Empty(opts.source.clone()));
    }
    let addr = opts.server.addr;
    let upload_err = |source| CaptureError::Upload { addr, source };
    // Over HTTPS the certificate is checked here, before the token or any disk byte is written.
    let stream = Connection::open(&opts.server, Duration::from_secs(10))?;
    // A store busy writing may stop reading for a while: the upload waits, as it always did.
    stream.set_write_timeout(None).map_err(upload_err)?;
    log::info!(
        "capturing {} ({}) to {} as image {:?}",
        opts.source.display(),
        human_size(source.size),
        opts.server,
        opts.name
    );
    let started = Instant::now();
    let mut head = BufWriter::new(stream.handle());
    let authorization = opts
        .token
        .as_deref()
        .map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        head,
        "PUT /images/{} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: diskcast-agent/{}\r\n\
         {authorization}Content-Type: application/x-diskcast-image\r\nTransfer-Encoding: chunked\r\n\
         Expect: 100-continue\r\n\r\n",
        opts.name,
        env!("CARGO_PKG_VERSION")
    )
    .and_then(|()| head.flush())
    .map_err(upload_err)?;
    drop(head);
    // The store says now whether it takes the image (name free, store writable), before a whole
    // disk is read for nothing.
    let first_answer = Duration::from_secs(30);
    stream
        .set_read_timeout(Some(first_answer))
        .map_err(upload_err)?;
    let mut response = BufReader::new(stream.handle());
    let (status, message) =
        read_response(&mut response).map_err(|e| answer_err(addr, first_answer, e))?;
    // A server that stops reading mid-upload (its disk is full, it restarts) may have said why:
    // prefer its answer to our broken pipe.
    let sending_failed =
        |source: io::Error, response: &mut BufReader<Handle>| match read_response(response) {
            Ok((status, message)) if status >= 400 => CaptureError::Refused {
                addr,
                status,
                message,
            },
            _ => CaptureError::Upload { addr, source },
        };
    if status != 100 {
        return Err(CaptureError::Refused {
            addr,
            status,
            message,
        });
    }
    let chunked = ChunkedWriter {
        inner: stream.handle(),
        written: 0,
    };
    let mut writer = ImageWriter::new(BufWriter::with_capacity(1 << 20, chunked), opts.chunk_size);
    let used = chunks_to_read(&source, &opts.source, opts.chunk_size, opts.blocks);
    writer
        .push_from(
            &source,
            source.size,
            used.as_deref(),
            opts.level,
            &mut progress,
        )
        .map_err(|e| match e {
            PushError::Read(e) => CaptureError::Read {
                path: opts.source.clone(),
                offset: e.offset,
                source: e.source,
            },
            PushError::Write(e) => sending_failed(e, &mut response),
            PushError::Compressor => CaptureError::Compressor,
        })?;
    let mut meta = Metadata::new("capture", opts.level, crate::unix_now());
    meta.source_machine = opts.source_machine.clone();
    meta.source_disk = opts.source_disk.clone();
    let (manifest, buffered) = writer
        .finish(&meta)
        .map_err(|e| sending_failed(e, &mut response))?;
    let mut chunked = buffered
        .into_inner()
        .map_err(|e| sending_failed(e.into_error(), &mut response))?;
    chunked
        .inner
        .write_all(b"0\r\n\r\n")
        .and_then(|()| chunked.inner.flush())
        .map_err(upload_err)?;
    log::info!(
        "uploaded {} for {} of data ({} unused and skipped); waiting for the store to check it",
        human_size(chunked.written),
        human_size(manifest.data_bytes()),
        human_size(manifest.absent_bytes())
    );
    // The server re-reads and checks everything before answering: allow for a slow disk there.
    let check_time = Duration::from_secs(120 + chunked.written / 50_000_000);
    stream
        .set_read_timeout(Some(check_time))
        .map_err(upload_err)?;
    let (status, message) =
        read_response(&mut response).map_err(|e| answer_err(addr, check_time, e))?;
    if status != 201 {
        return Err(CaptureError::Refused {
            addr,
            status,
            message,
        });
    }
    Ok(CaptureSummary {
        manifest,
        uploaded: chunked.written,
        elapsed: started.elapsed(),
        server_says: message,
    })
}

/// A timeout is the store's silence; anything else a broken answer.
fn answer_err(addr: SocketAddr, waited: Duration, source: io::Error) -> CaptureError {
    match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            CaptureError::NoAnswer { addr, waited }
        }
        _ => CaptureError::Answer { addr, source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_writer_frames_each_write() {
        let mut out = ChunkedWriter {
            inner: Vec::new(),
            written: 0,
        };
        out.write_all(b"hello, world").unwrap();
        out.write_all(&[b'x'; 17]).unwrap();
        assert_eq!(
            out.inner,
            [&b"c\r\nhello, world\r\n11\r\n"[..], &[b'x'; 17], b"\r\n"].concat()
        );
        assert_eq!(out.written, 29);
    }

    #[test]
    fn a_silent_store_is_named_as_silent_not_as_a_closed_connection() {
        let addr = SocketAddr::from(([10, 77, 0, 1], 8080));
        let waited = Duration::from_secs(30);
        let silent = answer_err(addr, waited, io::ErrorKind::WouldBlock.into()).to_string();
        assert!(silent.contains("did not answer within 30 s"), "{silent}");
        let reset = answer_err(addr, waited, io::ErrorKind::ConnectionReset.into()).to_string();
        assert!(
            reset.contains("reading the image store's answer"),
            "{reset}"
        );
    }
}
