//! [`used_map`] as the senders need it: which chunks to read, told in the log.

use crate::{used_map, Options, Report};
use diskcast_proto::cmdline::Blocks;
use diskcast_proto::read_at::ReadAt;
use diskcast_proto::units::human_size;
use std::path::Path;

/// The chunks of `disk` to read for `blocks` (`None`: every chunk), with the map's findings in
/// the log (`path` names the disk there). The map never fails a send or a capture: a disk
/// whose map cannot be made is read whole, with a warning.
pub fn chunks_to_read(
    disk: &(impl ReadAt + ?Sized),
    path: &Path,
    chunk_size: u32,
    blocks: Blocks,
) -> Option<Vec<bool>> {
    let force_unclean = match blocks {
        Blocks::All => {
            log::info!(
                "reading every block of {} (all blocks asked for)",
                path.display()
            );
            return None;
        }
        Blocks::Used => false,
        Blocks::UsedTrustUnclean => true,
    };
    let size = match disk.size() {
        Ok(size) => size,
        Err(e) => {
            log::warn!(
                "reading the size of {}: {e}; reading every block",
                path.display()
            );
            return None;
        }
    };
    let opts = Options {
        force_unclean,
        ..Options::default()
    };
    match used_map(disk, &opts) {
        Ok((map, report)) => {
            for line in describe(path, size, map.used_bytes(), &report) {
                log::info!("{line}");
            }
            for warning in &report.warnings {
                log::warn!("{}: {warning}", path.display());
            }
            Some(map.chunks(size, chunk_size))
        }
        Err(e) => {
            log::warn!(
                "mapping the used blocks of {}: {}; reading every block",
                path.display(),
                diskcast_proto::error_chain(&e)
            );
            None
        }
    }
}

/// One line for the disk, one per partition.
fn describe(path: &Path, size: u64, used: u64, report: &Report) -> Vec<String> {
    let mut lines = vec![format!(
        "used blocks of {} ({}): {:?} partition table, {} used",
        path.display(),
        human_size(size),
        report.table,
        human_size(used)
    )];
    for part in &report.partitions {
        let how = match part.whole {
            None => format!("{} used", human_size(part.used_bytes)),
            Some(why) => format!("copied whole ({why:?})"),
        };
        lines.push(format!(
            "  partition {}: {}, {}, {how}",
            part.index,
            part.fs,
            human_size(part.len)
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_blocks_reads_everything_and_a_blank_disk_is_read_whole() {
        let blank = vec![0u8; 4 << 20];
        let path = Path::new("blank.img");
        assert_eq!(chunks_to_read(&blank, path, 1 << 20, Blocks::All), None);
        // No table, no file system: every chunk is used.
        assert_eq!(
            chunks_to_read(&blank, path, 1 << 20, Blocks::Used),
            Some(vec![true; 4])
        );
    }
}
