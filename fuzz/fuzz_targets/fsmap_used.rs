#![no_main]
//! A disk image from the fuzzer's bytes: partition tables, file system superblocks and
//! allocation maps are all untrusted.
use diskcast_fsmap::{used_map, Options};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the options; the rest is the disk.
    let Some((&flags, disk)) = data.split_first() else {
        return;
    };
    let opts = Options {
        force_unclean: flags & 1 == 1,
        merge_gap: if flags & 2 == 2 { 0 } else { 1 << 20 },
    };
    if let Ok((map, report)) = used_map(disk, &opts) {
        let size = disk.len() as u64;
        assert!(map.ranges().windows(2).all(|w| w[0].end < w[1].start));
        assert!(map
            .ranges()
            .iter()
            .all(|r| r.start < r.end && r.end <= size));
        assert!(report
            .partitions
            .iter()
            .all(|p| p.start + p.len <= size && p.used_bytes <= p.len));
        let _ = map.chunks(size, 4096);
    }
});
