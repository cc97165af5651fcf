//! Linux swap: only the first page (boot bits, header, bad-page list and signature) is used.
//! A swap area holding a hibernation image is copied whole.

use crate::io::{le32, Area, ReadAt};
use crate::map::RangeBuilder;
use crate::FsmapError;

const PAGE_SIZES: [u64; 4] = [4096, 8192, 16384, 65536];

/// What the signature at the end of the first page says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Swap {
    /// A swap area, with its page size.
    Plain(u64),
    /// A hibernation image (swsusp, uswsusp, TuxOnIce).
    Hibernation,
}

/// The swap signature of the area, if any.
pub(crate) fn probe<D: ReadAt + ?Sized>(area: &Area<'_, D>) -> Option<Swap> {
    for page in PAGE_SIZES {
        let mut sig = [0u8; 10];
        if area.read("swap signature", page - 10, &mut sig).is_err() {
            return None;
        }
        match &sig {
            b"SWAPSPACE2" | b"SWAP-SPACE" => return Some(Swap::Plain(page)),
            b"S1SUSPEND\0" | b"S2SUSPEND\0" | b"ULSUSPEND\0" | b"LINHIB0001" => {
                return Some(Swap::Hibernation)
            }
            _ => {}
        }
    }
    None
}

/// Maps a swap area: its first page, and whatever follows its last page.
pub(crate) fn map<D: ReadAt + ?Sized>(
    area: Area<'_, D>,
    out: &mut RangeBuilder,
) -> Result<(), FsmapError> {
    let page = match probe(&area) {
        Some(Swap::Plain(page)) => page,
        Some(Swap::Hibernation) => {
            return Err(FsmapError::unsupported(
                "swap",
                "it holds a hibernation image",
            ))
        }
        None => return Err(FsmapError::corrupt("swap", "no signature")),
    };
    let end = area.start + area.len;
    out.add(area.start, area.start + page);
    // Version 1 header: last_page at byte 1028. An old (SWAP-SPACE) header has none.
    let mut header = [0u8; 8];
    area.read("swap header", 1024, &mut header)?;
    let last_page = u64::from(le32(&header, 4));
    let swap_end = (last_page + 1).saturating_mul(page).min(area.len);
    let swap_end = if le32(&header, 0) != 1 || swap_end <= page {
        area.len
    } else {
        swap_end
    };
    out.add(area.start + swap_end, end);
    Ok(())
}
