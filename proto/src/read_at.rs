//! Positioned reads of a disk, a device or an image file, by several readers at once (the
//! image store's senders, the used-block map, the scan). The caller opens the file, or holds
//! the bytes in memory (tests, fuzzing).

use std::io::{self, Seek, SeekFrom};

/// A positioned read that failed, with where.
#[derive(Debug, thiserror::Error)]
#[error("reading at byte {offset}")]
pub struct ReadAtError {
    pub offset: u64,
    #[source]
    pub source: io::Error,
}

pub trait ReadAt {
    /// Fills `buf` from byte `offset`, or fails (a read past the end is an error).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The size in bytes.
    fn size(&self) -> io::Result<u64>;
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let bytes = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(bytes);
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl ReadAt for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }

    /// A regular file's length; for a block device (whose metadata says 0), the end found by
    /// seeking, which moves the file's position (positioned reads do not use it).
    fn size(&self) -> io::Result<u64> {
        let meta = self.metadata()?;
        if meta.is_file() {
            Ok(meta.len())
        } else {
            let mut file = self;
            file.seek(SeekFrom::End(0))
        }
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_refuse_reads_past_the_end() {
        let bytes = vec![1u8, 2, 3, 4];
        let mut buf = [0u8; 2];
        bytes.read_exact_at(&mut buf, 2).unwrap();
        assert_eq!(buf, [3, 4]);
        assert!(bytes.read_exact_at(&mut buf, 3).is_err());
        assert!(bytes.read_exact_at(&mut buf, u64::MAX).is_err());
        assert_eq!(ReadAt::size(&bytes).unwrap(), 4);
    }
}
