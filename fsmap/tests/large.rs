//! A 1 TiB ext4 (a sparse file): the map needs a few MiB of reads, in few requests.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use diskcast_fsmap::{used_map, Options, ReadAt};
use std::cell::Cell;

struct Counting {
    file: File,
    bytes: Cell<u64>,
    reads: Cell<u64>,
}

impl ReadAt for Counting {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.bytes.set(self.bytes.get() + buf.len() as u64);
        self.reads.set(self.reads.get() + 1);
        ReadAt::read_exact_at(&self.file, buf, offset)
    }

    fn size(&self) -> std::io::Result<u64> {
        ReadAt::size(&self.file)
    }
}

#[test]
fn one_tib_ext4_reads_little() {
    need("mkfs.ext4", "e2fsprogs");
    let dir = TempDir::new("large");
    let path = dir.path("tib.img");
    image(&path, 1 << 40);
    run(
        "mkfs.ext4",
        &[
            "-F",
            "-q",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
            path.to_str().unwrap(),
        ],
    );
    let disk = Counting {
        file: File::open(&path).unwrap(),
        bytes: Cell::new(0),
        reads: Cell::new(0),
    };
    let (map, report) = used_map(
        &disk,
        &Options {
            merge_gap: 0,
            ..Options::default()
        },
    )
    .unwrap();
    assert!(report.partitions[0].whole.is_none(), "{report:?}");
    let out = run("dumpe2fs", &["-h", path.to_str().unwrap()]);
    let fs_used =
        (num(&out, "Block count:") - num(&out, "Free blocks:")) * num(&out, "Block size:");
    assert_eq!(map.used_bytes(), fs_used);
    let (bytes, reads) = (disk.bytes.get(), disk.reads.get());
    eprintln!(
        "1 TiB ext4: {reads} reads, {bytes} bytes, {} ranges",
        map.ranges().len()
    );
    assert!(
        bytes < 8 << 20 && reads < 1000,
        "{reads} reads, {bytes} bytes"
    );
}
