//! Positioned reads of a disk, and bounded views of one of its areas (a partition).

use crate::FsmapError;
use std::io::{self, Read, Seek, SeekFrom};

pub use diskcast_proto::read_at::ReadAt;

/// The bytes `start..start + len` of a disk: every read is checked against these bounds.
#[derive(Debug)]
pub(crate) struct Area<'a, D: ?Sized> {
    disk: &'a D,
    pub(crate) start: u64,
    pub(crate) len: u64,
}

// Derived Clone/Copy would require D: Clone.
impl<D: ?Sized> Clone for Area<'_, D> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<D: ?Sized> Copy for Area<'_, D> {}

impl<'a, D: ReadAt + ?Sized> Area<'a, D> {
    pub(crate) fn new(disk: &'a D, start: u64, len: u64) -> Self {
        Area { disk, start, len }
    }

    /// Reads `buf.len()` bytes at `offset` (relative to the area), refusing anything past its end.
    pub(crate) fn read(
        &self,
        what: &'static str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), FsmapError> {
        let len = buf.len() as u64;
        let abs = self.start.saturating_add(offset);
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {}
            _ => {
                return Err(FsmapError::OutOfBounds {
                    what,
                    offset: abs,
                    len,
                    limit: self.start.saturating_add(self.len),
                })
            }
        }
        self.disk
            .read_exact_at(buf, abs)
            .map_err(|source| FsmapError::Read {
                what,
                offset: abs,
                source,
            })
    }

    /// Reads `len` bytes at `offset` into a new vector; `len` must already be bounded by the
    /// caller (it is checked against the area before allocating).
    pub(crate) fn read_vec(
        &self,
        what: &'static str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, FsmapError> {
        let fits = offset.checked_add(len).is_some_and(|end| end <= self.len);
        let size = usize::try_from(len)
            .ok()
            .filter(|_| fits)
            .ok_or(FsmapError::OutOfBounds {
                what,
                offset: self.start.saturating_add(offset),
                len,
                limit: self.start.saturating_add(self.len),
            })?;
        let mut buf = vec![0; size];
        self.read(what, offset, &mut buf)?;
        Ok(buf)
    }

    /// The sub-area `offset..offset + len`, which must lie inside this one.
    pub(crate) fn sub(
        &self,
        what: &'static str,
        offset: u64,
        len: u64,
    ) -> Result<Self, FsmapError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(Area {
                disk: self.disk,
                start: self.start + offset,
                len,
            }),
            _ => Err(FsmapError::OutOfBounds {
                what,
                offset: self.start.saturating_add(offset),
                len,
                limit: self.start.saturating_add(self.len),
            }),
        }
    }

    /// A `Read + Seek` cursor over the area, for the crates that want one.
    pub(crate) fn cursor(&self) -> AreaCursor<'a, D> {
        AreaCursor {
            area: *self,
            pos: 0,
        }
    }
}

/// `Read + Seek` over an [`Area`]. Reads stop at the end of the area (a short read, then 0), so
/// a crate's `read_exact` past the end fails with `UnexpectedEof` and never touches bytes
/// outside the area.
#[derive(Debug)]
pub(crate) struct AreaCursor<'a, D: ?Sized> {
    area: Area<'a, D>,
    pos: u64,
}

impl<D: ReadAt + ?Sized> Read for AreaCursor<'_, D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.area.len.saturating_sub(self.pos);
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        if n == 0 {
            return Ok(0);
        }
        let abs = self
            .area
            .start
            .checked_add(self.pos)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "position overflows"))?;
        let dst = buf.get_mut(..n).unwrap_or_default();
        self.area.disk.read_exact_at(dst, abs)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<D: ?Sized> Seek for AreaCursor<'_, D> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.area.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos =
            new.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek outside u64"))?;
        Ok(self.pos)
    }
}

pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    let mut a = [0; 2];
    if let Some(s) = at.checked_add(2).and_then(|end| b.get(at..end)) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}

pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0; 4];
    if let Some(s) = at.checked_add(4).and_then(|end| b.get(at..end)) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}
