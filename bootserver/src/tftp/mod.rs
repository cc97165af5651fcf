//! Read-only TFTP for the iPXE loaders (and anything else PXE firmware fetches before HTTP).
//!
//! # Why our own server
//! This used to be async-tftp 0.4 wrapped in a path-confining handler. Probing found that 700 read
//! requests with option `timeout=255` that are never acknowledged took the whole bootserver down
//! for 21 minutes: async-tftp honours the client's timeout (255 s x 5 tries per transfer), has no
//! cap on concurrent transfers (each costs a socket and a file descriptor), drops malformed
//! requests silently (no ERROR packet for non-UTF-8 names, over-long names or unsupported modes,
//! and it serves `netascii` as octet), and ignores a client's ERROR packet (its issue 18: a
//! firmware's size probe then blocks that client's port for minutes). Its API gives a handler no
//! way to see the mode, refuse with a reason, or bound transfers; fixing that means owning the
//! request loop anyway, and a read-only server is small.
//!
//! # Layout
//! - [`packet`]: typed packets, `parse` and `emit`; a bad request yields the reason sent back.
//! - [`transfer`]: the sans-IO state machine of one read transfer (options, windows, ACKs,
//!   retransmission on the server's own clock; the client's `timeout` option is ignored).
//! - [`server`]: the tokio edge. The request socket (port 69) answers refusals itself; each
//!   accepted read request gets its own UDP socket (RFC 1350 transfer ID) and task. Transfers are
//!   capped in total and per client address; a dead client costs at most `retries x timeout`.
//!
//! Files are read whole into memory when a transfer starts: TFTP carries iPXE binaries of a few
//! hundred KiB to a few MiB (and, for the Secure Boot chain, whose GRUB cannot use HTTP, the
//! kernel and initramfs), and a memory-resident file keeps the state machine free of I/O.
//! [`TftpLimits::max_file_size`] bounds what one transfer may hold, so the worst case is
//! `max_transfers x max_file_size` of memory (64 x 64 MiB by default; iPXE binaries make it
//! 64 x ~1 MiB in practice).

pub mod packet;
pub mod server;
pub mod transfer;

pub use server::{run, TftpError, TftpStats, TftpStatsSnapshot};

use std::io::Read;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Where the files a client asks for come from: a directory ([`ConfinedDir`]), or the
/// bootserver's own namespace (the signed chain's loaders and per-machine GRUB configs, then the
/// directory). Called on a blocking thread, once per accepted transfer.
pub trait FileSource: Send + Sync + std::fmt::Debug + 'static {
    /// The whole content of `name` for the client at `client`, at most `max` bytes.
    fn read(&self, name: &str, client: IpAddr, max: u64) -> Result<Arc<[u8]>, TftpError>;
}

impl FileSource for ConfinedDir {
    fn read(&self, name: &str, _client: IpAddr, max: u64) -> Result<Arc<[u8]>, TftpError> {
        let path = self
            .resolve(Path::new(name))
            .ok_or_else(|| TftpError::NotFound {
                name: name.to_string(),
            })?;
        read_capped(&path, name, max)
    }
}

/// Reads the file at `path` (served as `name`), refusing more than `max` bytes.
pub fn read_capped(path: &Path, name: &str, max: u64) -> Result<Arc<[u8]>, TftpError> {
    let io = |source| TftpError::File {
        path: path.to_path_buf(),
        source,
    };
    let name = name.to_string();
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len > max {
        return Err(TftpError::TooLarge { name, len, max });
    }
    let mut data = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    // The file may grow while read: never take more than the limit.
    file.take(max.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(io)?;
    let len = data.len() as u64;
    if len > max {
        return Err(TftpError::TooLarge { name, len, max });
    }
    Ok(Arc::from(data))
}

/// Largest block that fits a 1500-byte Ethernet frame (1500 - IP 20 - UDP 8 - TFTP 4).
pub const MAX_BLOCK_SIZE: u16 = 1468;
pub const MAX_WINDOW_SIZE: u16 = 16;

/// Bounds on what clients may cost the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TftpLimits {
    /// Transfers in flight at once, all clients together (each holds a socket and the file).
    pub max_transfers: usize,
    /// Transfers in flight at once from one IP address.
    pub max_per_client: usize,
    /// Retransmission timeout, the server's own: a client's `timeout` option is ignored.
    pub timeout: Duration,
    /// Timeouts in a row without progress after which a transfer is abandoned; every timeout but
    /// the last retransmits. A silent client thus costs at most `retries x timeout`.
    pub retries: u32,
    /// Largest blksize granted (a request for more gets this much; RFC 2348 allows at least 8).
    pub max_block_size: u16,
    /// Largest windowsize granted (RFC 7440).
    pub max_window_size: u16,
    /// Largest file served; bigger ones are refused with a hint to use HTTP.
    pub max_file_size: u64,
}

impl Default for TftpLimits {
    fn default() -> Self {
        Self {
            max_transfers: 64,
            max_per_client: 4,
            timeout: Duration::from_secs(1),
            retries: 5,
            max_block_size: MAX_BLOCK_SIZE,
            max_window_size: MAX_WINDOW_SIZE,
            max_file_size: 64 << 20,
        }
    }
}

/// The TFTP root: every request is resolved inside it, symlinks included.
#[derive(Debug, Clone)]
pub struct ConfinedDir {
    root: PathBuf,
}

impl ConfinedDir {
    pub fn new(root: &Path) -> Result<Self, TftpError> {
        let root = root.canonicalize().map_err(|source| TftpError::Root {
            path: root.into(),
            source,
        })?;
        Ok(Self { root })
    }

    /// The file a request names, if it stays inside the root after resolving every link.
    pub fn resolve(&self, requested: &Path) -> Option<PathBuf> {
        let mut relative = PathBuf::new();
        for component in requested.components() {
            match component {
                Component::Normal(part) => relative.push(part),
                Component::RootDir | Component::CurDir => {}
                Component::ParentDir | Component::Prefix(_) => return None,
            }
        }
        let resolved = self.root.join(relative).canonicalize().ok()?;
        (resolved.starts_with(&self.root) && resolved.is_file()).then_some(resolved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_stay_inside_the_root() {
        let base = std::env::temp_dir().join(format!("diskcast-tftp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("undionly.kpxe"), b"x").unwrap();
        std::fs::write(root.join("sub/file"), b"y").unwrap();
        std::fs::write(base.join("secret"), b"z").unwrap();
        std::os::unix::fs::symlink(base.join("secret"), root.join("escape")).unwrap();
        std::os::unix::fs::symlink(root.join("sub/file"), root.join("inside")).unwrap();
        let dir = ConfinedDir::new(&root).unwrap();
        let canonical = root.canonicalize().unwrap();
        assert_eq!(
            dir.resolve(Path::new("undionly.kpxe")),
            Some(canonical.join("undionly.kpxe"))
        );
        assert_eq!(
            dir.resolve(Path::new("/sub/file")),
            Some(canonical.join("sub/file"))
        );
        assert_eq!(
            dir.resolve(Path::new("inside")),
            Some(canonical.join("sub/file"))
        );
        assert_eq!(dir.resolve(Path::new("../secret")), None);
        assert_eq!(dir.resolve(Path::new("sub/../../secret")), None);
        assert_eq!(dir.resolve(Path::new("escape")), None);
        assert_eq!(
            dir.resolve(Path::new("sub")),
            None,
            "directories are not files"
        );
        assert_eq!(dir.resolve(Path::new("missing")), None);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
