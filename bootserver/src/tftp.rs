//! Read-only TFTP for the iPXE loaders, on async-tftp with a handler that keeps every request
//! inside the root directory, symlinks included (async-tftp's own directory handler follows them
//! out), and caps block and window sizes.

use async_tftp::packet;
use async_tftp::server::{Handler, TftpServerBuilder};
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TftpError {
    #[error("TFTP root {path} is not a readable directory")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting TFTP on {addr}")]
    Start {
        addr: SocketAddr,
        #[source]
        source: async_tftp::Error,
    },
}

/// Largest block that fits a 1500-byte Ethernet frame (1500 - IP 20 - UDP 8 - TFTP 4).
pub const MAX_BLOCK_SIZE: u16 = 1468;
pub const MAX_WINDOW_SIZE: u16 = 16;

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

impl Handler for ConfinedDir {
    type Reader = smol::Unblock<std::fs::File>;
    type Writer = futures_lite::io::Sink;

    async fn read_req_open(
        &mut self,
        client: &SocketAddr,
        path: &Path,
    ) -> Result<(Self::Reader, Option<u64>), packet::Error> {
        let Some(resolved) = self.resolve(path) else {
            log::warn!(
                "tftp: {client} asked for {} outside the root or missing: denied",
                path.display()
            );
            return Err(packet::Error::FileNotFound);
        };
        let file = std::fs::File::open(&resolved).map_err(|_| packet::Error::FileNotFound)?;
        let size = file.metadata().ok().map(|m| m.len());
        log::info!(
            "tftp: {client} read {} ({} bytes)",
            path.display(),
            size.unwrap_or(0)
        );
        Ok((smol::Unblock::new(file), size))
    }

    async fn write_req_open(
        &mut self,
        client: &SocketAddr,
        path: &Path,
        _size: Option<u64>,
    ) -> Result<Self::Writer, packet::Error> {
        log::warn!(
            "tftp: {client} tried to write {}: this server is read-only",
            path.display()
        );
        Err(packet::Error::IllegalOperation)
    }
}

/// Runs the TFTP server until the process ends.
pub fn serve(root: ConfinedDir, addr: SocketAddr) -> Result<(), TftpError> {
    smol::block_on(async {
        let server = TftpServerBuilder::with_handler(root)
            .bind(addr)
            .block_size_limit(MAX_BLOCK_SIZE)
            .window_size_limit(MAX_WINDOW_SIZE)
            .timeout(Duration::from_secs(2))
            .max_send_retries(4)
            .build()
            .await
            .map_err(|source| TftpError::Start { addr, source })?;
        server
            .serve()
            .await
            .map_err(|source| TftpError::Start { addr, source })
    })
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
