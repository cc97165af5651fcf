//! Builders of real file systems holding kept files and a deleted file of garbage, and the
//! checks of a used map against them.
#![allow(dead_code)]

use super::*;
use diskcast_fsmap::UsedMap;

/// Every 4 KiB of a garbage file starts with this marker (then its index and random bytes).
pub const MARK: &[u8; 16] = b"DELETED-GARBAGE:";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ext,
    Fat,
    Ntfs,
    Swap,
}

/// A file system image: its kind, file, size and the files that must survive.
pub struct Built {
    pub kind: Kind,
    pub path: PathBuf,
    pub size: u64,
    pub kept: Vec<(String, Vec<u8>)>,
    /// Bytes of garbage written then deleted.
    pub garbage: u64,
}

pub fn garbage(len: usize, seed: u64) -> Vec<u8> {
    let mut data = random_bytes(len, seed);
    for (i, block) in data.chunks_mut(4096).enumerate() {
        if block.len() >= 24 {
            block[..16].copy_from_slice(MARK);
            block[16..24].copy_from_slice(&(i as u64).to_le_bytes());
        }
    }
    data
}

/// Three files of random data, smaller on file systems under 16 MiB.
fn kept_files(
    dir: &TempDir,
    tag: &str,
    seed: u64,
    fs_size: u64,
) -> Vec<(String, Vec<u8>, PathBuf)> {
    let sizes = if fs_size < 16 * MIB {
        [5_000usize, 30_000, 200_000]
    } else {
        [5_000, 300_000, 2_100_000]
    };
    sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let name = format!("keep{i}");
            let data = random_bytes(len, seed + i as u64);
            let path = dir.path(&format!("{tag}-{name}"));
            write_file(&path, &data);
            (name, data, path)
        })
        .collect()
}

/// ext2/3/4 made by `mkfs` with `args`; files written and the garbage deleted with debugfs.
pub fn build_ext(
    dir: &TempDir,
    tag: &str,
    size: u64,
    mkfs: &str,
    args: &[&str],
    garbage_len: usize,
) -> Built {
    need(mkfs, "e2fsprogs");
    need("debugfs", "e2fsprogs");
    let path = dir.path(&format!("{tag}.img"));
    image(&path, size);
    let mut a = vec!["-F", "-q"];
    a.extend_from_slice(args);
    let p = path.to_str().unwrap();
    a.push(p);
    run(mkfs, &a);
    let kept = kept_files(dir, tag, 10, size);
    let big = dir.path(&format!("{tag}-big"));
    write_file(&big, &garbage(garbage_len, 99));
    let mut cmds = String::new();
    cmds += &format!("write {} {}\n", kept[0].2.display(), kept[0].0);
    cmds += &format!("write {} big\n", big.display());
    for k in &kept[1..] {
        cmds += &format!("write {} {}\n", k.2.display(), k.0);
    }
    let cmdfile = dir.path(&format!("{tag}-cmds"));
    write_file(&cmdfile, cmds.as_bytes());
    run("debugfs", &["-w", "-f", cmdfile.to_str().unwrap(), p]);
    run("debugfs", &["-w", "-R", "rm big", p]);
    Built {
        kind: Kind::Ext,
        path,
        size,
        kept: kept.into_iter().map(|(n, d, _)| (n, d)).collect(),
        garbage: garbage_len as u64,
    }
}

/// FAT made by mkfs.vfat with `args`; files copied and the garbage deleted with mtools.
pub fn build_fat(dir: &TempDir, tag: &str, size: u64, args: &[&str], garbage_len: usize) -> Built {
    need("mkfs.vfat", "dosfstools");
    need("mcopy", "mtools");
    let path = dir.path(&format!("{tag}.img"));
    image(&path, size);
    let p = path.to_str().unwrap();
    let mut a: Vec<&str> = args.to_vec();
    a.push(p);
    run("mkfs.vfat", &a);
    let kept = kept_files(dir, tag, 20, size);
    let big = dir.path(&format!("{tag}-big"));
    write_file(&big, &garbage(garbage_len, 98));
    run(
        "mcopy",
        &[
            "-i",
            p,
            kept[0].2.to_str().unwrap(),
            &format!("::{}", kept[0].0),
        ],
    );
    run("mcopy", &["-i", p, big.to_str().unwrap(), "::big"]);
    for k in &kept[1..] {
        run(
            "mcopy",
            &["-i", p, k.2.to_str().unwrap(), &format!("::{}", k.0)],
        );
    }
    run("mdel", &["-i", p, "::big"]);
    Built {
        kind: Kind::Fat,
        path,
        size,
        kept: kept.into_iter().map(|(n, d, _)| (n, d)).collect(),
        garbage: garbage_len as u64,
    }
}

/// NTFS made by mkntfs; with `files`, mounted with ntfs-3g (root, FUSE) to write the files and
/// delete the garbage.
pub fn build_ntfs(dir: &TempDir, tag: &str, size: u64, garbage_len: usize, files: bool) -> Built {
    need("mkntfs", "ntfs-3g");
    let path = dir.path(&format!("{tag}.img"));
    image(&path, size);
    let p = path.to_str().unwrap();
    run("mkntfs", &["-F", "-Q", "-q", p]);
    let mut kept_out = Vec::new();
    let mut g = 0;
    if files {
        need("ntfs-3g", "ntfs-3g");
        need_root("ntfs-3g mounts the image through FUSE to write files");
        let mnt = dir.path(&format!("{tag}-mnt"));
        fs::create_dir_all(&mnt).unwrap();
        run("ntfs-3g", &[p, mnt.to_str().unwrap()]);
        let kept = kept_files(dir, tag, 30, size);
        let write = || -> std::io::Result<()> {
            fs::write(mnt.join(&kept[0].0), &kept[0].1)?;
            fs::write(mnt.join("big"), garbage(garbage_len, 97))?;
            for k in &kept[1..] {
                fs::write(mnt.join(&k.0), &k.1)?;
            }
            Ok(())
        };
        let written = write();
        run("umount", &[mnt.to_str().unwrap()]);
        written.unwrap();
        run("ntfs-3g", &[p, mnt.to_str().unwrap()]);
        let removed = fs::remove_file(mnt.join("big"));
        run("umount", &[mnt.to_str().unwrap()]);
        removed.unwrap();
        kept_out = kept.into_iter().map(|(n, d, _)| (n, d)).collect();
        g = garbage_len as u64;
    }
    Built {
        kind: Kind::Ntfs,
        path,
        size,
        kept: kept_out,
        garbage: g,
    }
}

pub fn build_swap(dir: &TempDir, tag: &str, size: u64) -> Built {
    need("mkswap", "util-linux");
    let path = dir.path(&format!("{tag}.img"));
    // Garbage after the first page: mkswap keeps it, and none of it may be mapped.
    let mut data = vec![0u8; 4096];
    data.extend(garbage(size as usize - 4096, 96));
    write_file(&path, &data);
    run("mkswap", &[path.to_str().unwrap()]);
    Built {
        kind: Kind::Swap,
        path,
        size,
        kept: Vec::new(),
        garbage: size - 4096,
    }
}

/// The used bytes the file system's own tool reports for the image `part`.
pub fn tool_used(kind: Kind, part: &Path) -> u64 {
    let p = part.to_str().unwrap();
    match kind {
        Kind::Ext => {
            let out = run("dumpe2fs", &["-h", p]);
            (num(&out, "Block count:") - num(&out, "Free blocks:")) * num(&out, "Block size:")
        }
        Kind::Fat => {
            let out = run("fsck.vfat", &["-n", "-v", p]);
            let line = out
                .lines()
                .find(|l| l.contains(" clusters") && l.contains('/'))
                .unwrap();
            let used: u64 = line
                .rsplit(", ")
                .next()
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let cluster: u64 = out
                .lines()
                .find(|l| l.contains("bytes per cluster"))
                .and_then(|l| l.split_whitespace().next())
                .unwrap()
                .parse()
                .unwrap();
            num(&out, "Data area starts at byte") + used * cluster
        }
        Kind::Ntfs => {
            let out = run("ntfsinfo", &["-m", p]);
            (num(&out, "Volume Size in Clusters:") - num(&out, "Free Clusters:"))
                * num(&out, "Cluster Size:")
        }
        Kind::Swap => 4096,
    }
}

/// All checks of one file system at `offset` of `disk`, with the maps of the disk; `copy` is
/// the disk with every unused chunk overwritten.
pub fn check(
    dir: &TempDir,
    built: &Built,
    disk: &Path,
    offset: u64,
    exact: &UsedMap,
    default: &UsedMap,
    copy: &Path,
) {
    let tag = built
        .path
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let part = dir.path(&format!("{tag}-orig.part"));
    extract(disk, offset, built.size, &part);

    // 1. Within one chunk of what the file system's tool says.
    let fs_used = tool_used(built.kind, &part);
    let ours = used_in(exact, offset, built.size);
    assert!(
        ours.abs_diff(fs_used) <= MIB,
        "{tag}: the map uses {ours} bytes, the file system's tool says {fs_used}"
    );

    // 2. The deleted garbage is not in the map.
    let data = fs::read(&part).unwrap();
    let mut marks = 0u64;
    for at in (0..data.len().saturating_sub(16)).step_by(512) {
        if &data[at..at + 16] == MARK {
            marks += 1;
            let abs = offset + at as u64;
            assert!(
                !exact.overlaps(abs..abs + 512),
                "{tag}: deleted garbage at byte {abs} is in the map"
            );
        }
    }
    eprintln!(
        "{tag}: map {ours} bytes, file system tool {fs_used}, {marks} garbage blocks unmapped"
    );
    assert!(
        marks * 4096 >= built.garbage * 9 / 10,
        "{tag}: only {marks} garbage blocks found on disk"
    );
    let default_used = used_in(default, offset, built.size);
    assert!(
        default_used + built.garbage * 9 / 10 <= built.size,
        "{tag}: {default_used} bytes used with the default merge gap, {} of garbage",
        built.garbage
    );

    // 3. With unused chunks overwritten: the file system checks clean and the files read back.
    let part = dir.path(&format!("{tag}-copy.part"));
    extract(copy, offset, built.size, &part);
    let p = part.to_str().unwrap();
    let out = dir.path(&format!("{tag}-out"));
    let o = out.to_str().unwrap();
    match built.kind {
        Kind::Ext => {
            run("e2fsck", &["-fn", p]);
        }
        Kind::Fat => {
            let (ok, so, se) = try_run("fsck.vfat", &["-n", p]);
            assert!(
                ok && !so.contains("Dirty") && !se.contains("Dirty"),
                "{tag}: fsck.vfat -n:\n{so}\n{se}"
            );
        }
        Kind::Ntfs => {
            run("ntfsfix", &["-n", p]);
        }
        Kind::Swap => {
            let mut first = [0u8; 10];
            File::open(&part)
                .unwrap()
                .read_exact_at(&mut first, 4086)
                .unwrap();
            assert_eq!(&first, b"SWAPSPACE2");
        }
    }
    for (name, want) in &built.kept {
        let _ = fs::remove_file(&out);
        match built.kind {
            Kind::Ext => {
                run("debugfs", &["-R", &format!("dump /{name} {o}"), p]);
            }
            Kind::Fat => {
                run("mcopy", &["-n", "-i", p, &format!("::{name}"), o]);
            }
            Kind::Ntfs => {
                let data = run_bytes("ntfscat", &[p, &format!("/{name}")]);
                write_file(&out, &data);
            }
            Kind::Swap => {}
        }
        let got = fs::read(&out).unwrap_or_default();
        assert!(
            got == *want,
            "{tag}: /{name} differs after the unused chunks were overwritten"
        );
    }
}

pub fn run_bytes(cmd: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(cmd)
        .args(args)
        .env("PATH", PATH)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "`{cmd} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
