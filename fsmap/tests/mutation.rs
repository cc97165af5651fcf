//! Random byte mutations of small real images (GPT and MBR disks holding ext4, FAT, NTFS and
//! swap; a FAT32 and an ext4 superfloppy) through `used_map` and `fit_gpt_to_disk`: no panic,
//! and the map stays sorted and inside the disk.

#![allow(clippy::unwrap_used)]

mod common;

use common::build::*;
use common::*;
use diskcast_fsmap::{fit_gpt_to_disk, used_map, Options, ReadAt};
use std::cell::RefCell;
use std::io::Cursor;

const ITERATIONS: u64 = 20_000;
const FIT_ITERATIONS: u64 = 5_000;

struct Target {
    name: &'static str,
    data: Vec<u8>,
    /// What `used_map` reads of the intact image (offset, length): the metadata it parses.
    hot: Vec<(u64, u64)>,
    /// Starts of the partitions (and 0).
    starts: Vec<u64>,
}

/// A disk that records where it is read.
struct Recorder<'a> {
    data: &'a [u8],
    reads: RefCell<Vec<(u64, u64)>>,
}

impl ReadAt for Recorder<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.reads.borrow_mut().push((offset, buf.len() as u64));
        self.data.read_exact_at(buf, offset)
    }

    fn size(&self) -> std::io::Result<u64> {
        Ok(self.data.len() as u64)
    }
}

fn target(name: &'static str, path: &Path, starts: Vec<u64>) -> Target {
    let data = fs::read(path).unwrap();
    let recorder = Recorder {
        data: &data,
        reads: RefCell::new(Vec::new()),
    };
    used_map(&recorder, &Options::default()).unwrap();
    let mut hot = recorder.reads.into_inner();
    hot.sort_unstable();
    hot.dedup();
    eprintln!(
        "{name}: {} reads, {} bytes",
        hot.len(),
        hot.iter().map(|r| r.1).sum::<u64>()
    );
    Target {
        name,
        data,
        hot,
        starts,
    }
}

fn sfdisk(dir: &TempDir, name: &str, size: u64, script: &str) -> PathBuf {
    need("sfdisk", "fdisk");
    let path = dir.path(name);
    image(&path, size);
    let s = dir.path(&format!("{name}.sfdisk"));
    write_file(&s, script.as_bytes());
    sh(&format!(
        "sfdisk --no-reread --no-tell-kernel -q {} < {}",
        path.display(),
        s.display()
    ));
    path
}

fn targets(dir: &TempDir) -> Vec<Target> {
    let ext = build_ext(dir, "ext4", 8 * MIB, "mkfs.ext4", &["-g", "2048"], 1 << 20);
    let fat12 = build_fat(dir, "fat12", 2 * MIB, &["-F", "12"], 256 << 10);
    let ntfs = build_ntfs(dir, "ntfs", 4 * MIB, 0, false);
    let swap = build_swap(dir, "swap", MIB);
    let gpt = sfdisk(
        dir,
        "gpt.img",
        18 * MIB,
        "label: gpt\nstart=2048, size=16384, type=L\nstart=18432, size=4096, type=L\n\
         start=22528, size=8192, type=L\nstart=30720, size=2048, type=S\n",
    );
    let gpt_starts = [2048u64, 18432, 22528, 30720].map(|s| s * 512);
    for (start, b) in gpt_starts.iter().zip([&ext, &fat12, &ntfs, &swap]) {
        put(&gpt, *start, &b.path);
    }
    let fat16 = build_fat(dir, "fat16", 4 * MIB, &["-F", "16", "-s", "1"], 256 << 10);
    let mbr = sfdisk(
        dir,
        "mbr.img",
        16 * MIB,
        "label: dos\nstart=2048, size=8192, type=6\nstart=10240, size=20480, type=5\n\
         start=12288, size=16384, type=83\n",
    );
    put(&mbr, 2048 * 512, &fat16.path);
    put(&mbr, 12288 * 512, &ext.path);
    let fat32 = build_fat(
        dir,
        "fat32",
        34 * MIB,
        &["-F", "32", "-s", "1", "-S", "512"],
        256 << 10,
    );
    let mut starts = vec![0];
    starts.extend(gpt_starts);
    vec![
        target("gpt", &gpt, starts),
        target("mbr", &mbr, vec![0, 2048 * 512, 10240 * 512, 12288 * 512]),
        target("fat32", &fat32.path, vec![0]),
        target("ext4", &ext.path, vec![0]),
    ]
}

fn mutate(t: &mut Target, rng: &mut Rng) -> Vec<(usize, u8)> {
    let mut undo = Vec::new();
    for _ in 0..1 + rng.below(4) {
        let len = t.data.len() as u64;
        let at = match rng.below(10) {
            0..6 => {
                let (start, len) = t.hot[rng.below(t.hot.len() as u64) as usize];
                start + rng.below(len)
            }
            6..9 => t.starts[rng.below(t.starts.len() as u64) as usize] + rng.below(128 << 10),
            _ => rng.below(len),
        } as usize;
        let Some(byte) = t.data.get_mut(at) else {
            continue;
        };
        undo.push((at, *byte));
        *byte = match rng.below(4) {
            0 => *byte ^ (1 << rng.below(8)),
            1 => 0,
            2 => 0xFF,
            _ => rng.next() as u8,
        };
    }
    undo
}

#[test]
fn mutated_images_never_panic() {
    let dir = TempDir::new("mutation");
    let mut targets = targets(&dir);
    let mut rng = Rng(0x5EED_1234_5678_9ABC);
    for t in &targets {
        let (_, report) = used_map(&t.data, &Options::default()).unwrap();
        assert!(
            report.warnings.is_empty() && report.partitions.iter().all(|p| p.whole.is_none()),
            "{}: {report:?}",
            t.name
        );
    }
    let mut whole = 0;
    for i in 0..ITERATIONS {
        let t = &mut targets[(i % 4) as usize];
        let undo = mutate(t, &mut rng);
        let opts = Options {
            force_unclean: rng.below(2) == 0,
            merge_gap: [0, 4096, 1 << 20][rng.below(3) as usize],
        };
        let size = t.data.len() as u64;
        if let Ok((map, report)) = used_map(&t.data, &opts) {
            let r = map.ranges();
            assert!(
                r.windows(2).all(|w| w[0].end < w[1].start),
                "{}: unsorted map",
                t.name
            );
            assert!(
                r.iter().all(|x| x.start < x.end && x.end <= size),
                "{}: range outside the disk",
                t.name
            );
            assert!(report
                .partitions
                .iter()
                .all(|p| p.start + p.len <= size && p.used_bytes <= p.len));
            whole += usize::from(!report.warnings.is_empty());
        }
        for (at, b) in undo.into_iter().rev() {
            t.data[at] = b;
        }
    }
    eprintln!("{ITERATIONS} mutations, {whole} with warnings");

    // fit_gpt_to_disk on mutated copies of the GPT disk's first and last sectors.
    let gpt = &targets[0].data;
    let mut small = gpt[..MIB as usize].to_vec();
    small.extend_from_slice(&gpt[gpt.len() - MIB as usize..]);
    let hot: Vec<usize> = (0..small.len())
        .filter(|&i| small[i] != 0 && (i < 34 * 512 || i >= small.len() - 33 * 512))
        .collect();
    for _ in 0..FIT_ITERATIONS {
        let mut disk = small.clone();
        for _ in 0..1 + rng.below(3) {
            let at = hot[rng.below(hot.len() as u64) as usize] + rng.below(64) as usize;
            if let Some(b) = disk.get_mut(at) {
                *b = rng.next() as u8;
            }
        }
        let size = disk.len() as u64;
        let mut c = Cursor::new(disk);
        let _ = fit_gpt_to_disk(
            &mut c,
            size,
            size + rng.below(4) * MIB + rng.below(4096),
            512,
            rng.below(2) == 0,
        );
    }
}
