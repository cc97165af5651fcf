//! ext2/3/4: superblock, group descriptors and block bitmaps.
//!
//! Used: everything the block bitmaps mark, plus (whether marked or not) every group's
//! superblock backup, descriptor blocks, reserved GDT blocks, block and inode bitmaps and inode
//! table. A `BLOCK_UNINIT` group (only honoured when descriptors carry checksums, as in the
//! kernel) has no bitmap on disk: its used blocks are computed the way the kernel initialises
//! such a bitmap (`ext4_init_block_bitmap`): that base metadata and its own bitmaps and inode
//! table. The journal is an inode whose blocks are in the bitmaps.
//!
//! Refused (whole partition): needs_recovery, a state other than clean, recorded errors (all
//! three unless forced); bigalloc, an external journal device, unknown incompat or ro_compat
//! features; descriptor checksum mismatches; metadata or a size outside the partition.

use crate::io::{le16, le32, Area, ReadAt};
use crate::map::RangeBuilder;
use crate::{FsKind, FsmapError, Options};

const MAGIC: u16 = 0xEF53;

const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;

const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
/// Every incompat feature whose on-disk format we know does not change where the allocation
/// bitmaps and group metadata are (compression 0x1 is not among them).
const INCOMPAT_KNOWN: u32 = 0x2 // filetype
    | INCOMPAT_RECOVER
    | INCOMPAT_JOURNAL_DEV
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | 0x100 // mmp
    | INCOMPAT_FLEX_BG
    | 0x400 // ea_inode
    | 0x1000 // dirdata
    | INCOMPAT_CSUM_SEED
    | 0x4000 // largedir
    | 0x8000 // inline_data
    | 0x10000 // encrypt
    | 0x20000; // casefold

const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_GDT_CSUM: u32 = 0x10;
const RO_COMPAT_BIGALLOC: u32 = 0x200;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
/// Known ro_compat features other than bigalloc (which changes the bitmap's unit).
const RO_COMPAT_KNOWN: u32 = RO_COMPAT_SPARSE_SUPER
    | 0x2 // large_file
    | 0x4 // btree_dir
    | 0x8 // huge_file
    | RO_COMPAT_GDT_CSUM
    | 0x20 // dir_nlink
    | 0x40 // extra_isize
    | 0x100 // quota
    | RO_COMPAT_METADATA_CSUM
    | 0x800 // replica
    | 0x1000 // readonly
    | 0x2000 // project
    | 0x4000 // shared_blocks
    | 0x8000 // verity
    | 0x10000; // orphan_present

const STATE_VALID: u16 = 0x1;
const STATE_ERROR: u16 = 0x2;

const BG_BLOCK_UNINIT: u16 = 0x2;

/// The largest batch of bitmap blocks read at once.
const BATCH_BYTES: u64 = 1 << 20;

/// The ext4 flavour of crc32c: no final inversion (`ext4_chksum`).
const CRC32C_RAW: crc::Algorithm<u32> = crc::Algorithm {
    width: 32,
    poly: 0x1edc_6f41,
    init: 0xffff_ffff,
    refin: true,
    refout: true,
    xorout: 0,
    check: 0x1cf9_6d7c,
    residue: 0,
};
static CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&CRC32C_RAW);
/// Linux's crc16 (poly 0x8005 reflected, seeded with ~0): CRC-16/MODBUS.
static CRC16: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_MODBUS);

/// Whether the 1024 bytes at byte 1024 are an ext superblock.
pub(crate) fn probe(sb: &[u8]) -> bool {
    le16(sb, 0x38) == MAGIC
}

/// ext2, ext3 or ext4, as blkid names them.
pub(crate) fn kind(sb: &[u8]) -> FsKind {
    let incompat = le32(sb, 0x60);
    let ro_compat = le32(sb, 0x64);
    if incompat & !(0x2 | INCOMPAT_RECOVER | INCOMPAT_META_BG) != 0
        || ro_compat & !(RO_COMPAT_SPARSE_SUPER | 0x2 | 0x4) != 0
    {
        FsKind::Ext4
    } else if le32(sb, 0x5C) & COMPAT_HAS_JOURNAL != 0 {
        FsKind::Ext3
    } else {
        FsKind::Ext2
    }
}

struct Geometry {
    block_size: u64,
    blocks: u64,
    first_data_block: u64,
    blocks_per_group: u64,
    groups: u64,
    desc_size: u64,
    descs_per_block: u64,
    inode_table_blocks: u64,
    reserved_gdt: u64,
    gdt_blocks: u64,
    first_meta_bg: u64,
    compat: u32,
    incompat: u32,
    ro_compat: u32,
    backup_bgs: [u32; 2],
}

impl Geometry {
    fn meta_bg(&self) -> bool {
        self.incompat & INCOMPAT_META_BG != 0
    }

    fn group_first_block(&self, g: u64) -> u64 {
        self.first_data_block + g * self.blocks_per_group
    }

    fn blocks_in_group(&self, g: u64) -> u64 {
        (self.blocks - self.group_first_block(g)).min(self.blocks_per_group)
    }

    /// `ext4_bg_has_super`.
    fn has_super(&self, g: u64) -> bool {
        if g == 0 {
            return true;
        }
        if self.compat & COMPAT_SPARSE_SUPER2 != 0 {
            return self.backup_bgs.iter().any(|&b| u64::from(b) == g);
        }
        if g == 1 || self.ro_compat & RO_COMPAT_SPARSE_SUPER == 0 {
            return true;
        }
        g % 2 == 1 && [3u64, 5, 7].iter().any(|&p| is_power_of(g, p))
    }

    /// Superblock, descriptor and reserved GDT blocks at the start of group `g`
    /// (`ext4_num_base_meta_clusters`).
    fn base_meta_blocks(&self, g: u64) -> u64 {
        let sup = u64::from(self.has_super(g));
        let metagroup = g / self.descs_per_block;
        if !self.meta_bg() || metagroup < self.first_meta_bg {
            if sup == 1 {
                let gdb = if self.meta_bg() {
                    self.first_meta_bg
                } else {
                    self.gdt_blocks
                };
                sup + gdb + self.reserved_gdt
            } else {
                0
            }
        } else {
            let r = g % self.descs_per_block;
            let gdb = u64::from(r == 0 || r == 1 || r == self.descs_per_block - 1);
            sup + gdb
        }
    }

    /// The block holding group `g`'s descriptor (`descriptor_loc`).
    fn descriptor_block(&self, g: u64) -> u64 {
        let n = g / self.descs_per_block;
        if !self.meta_bg() || n < self.first_meta_bg {
            self.first_data_block + 1 + n
        } else {
            let bg = n * self.descs_per_block;
            self.group_first_block(bg) + u64::from(self.has_super(bg))
        }
    }
}

fn is_power_of(mut n: u64, p: u64) -> bool {
    while n > 1 && n % p == 0 {
        n /= p;
    }
    n == 1
}

/// Maps the used blocks of the ext file system filling `area` into `out` (absolute offsets).
pub(crate) fn map<D: ReadAt + ?Sized>(
    area: Area<'_, D>,
    opts: &Options,
    notes: &mut Vec<String>,
    out: &mut RangeBuilder,
) -> Result<(), FsmapError> {
    let sb = area.read_vec("ext superblock", 1024, 1024)?;
    let geo = geometry(&sb, area.len)?;
    check_clean(&sb, opts, notes)?;
    let bs = geo.block_size;
    let abs = |block: u64| area.start.saturating_add(block.saturating_mul(bs));

    // Metadata that is used whatever the bitmaps say; kept apart from the bitmap runs, which
    // arrive in ascending order and merge as they come.
    let mut meta = RangeBuilder::new(opts.merge_gap);
    // The boot block(s) before the first group (1 KiB file systems), and the superblock.
    meta.add(
        area.start,
        abs(geo.first_data_block.max(1)).max(area.start + 2048),
    );
    let mut bits = RangeBuilder::new(opts.merge_gap);
    let csum = Checksum::new(&sb, &geo);

    let mut desc_block = Vec::new();
    let mut desc_block_no = None;
    let mut batch = Batch::default();
    for g in 0..geo.groups {
        let block = geo.descriptor_block(g);
        if block >= geo.blocks {
            return Err(oob("ext group descriptor block", abs(block), bs, &area));
        }
        if desc_block_no != Some(block) {
            desc_block = area.read_vec("ext group descriptors", block * bs, bs)?;
            desc_block_no = Some(block);
            meta.add(abs(block), abs(block + 1));
        }
        let at = ((g % geo.descs_per_block) * geo.desc_size) as usize;
        let desc = desc_block
            .get(at..at + geo.desc_size as usize)
            .ok_or_else(|| FsmapError::corrupt("ext group descriptor", "past its block"))?;
        csum.verify(g, desc)?;
        let wide = geo.desc_size >= 64 && geo.incompat & INCOMPAT_64BIT != 0;
        let hi = |lo_at: usize, hi_at: usize| {
            u64::from(le32(desc, lo_at))
                | if wide {
                    u64::from(le32(desc, hi_at)) << 32
                } else {
                    0
                }
        };
        let block_bitmap = hi(0x0, 0x20);
        let inode_bitmap = hi(0x4, 0x24);
        let inode_table = hi(0x8, 0x28);
        let flags = le16(desc, 0x12);

        let first = geo.group_first_block(g);
        let own = [
            ("ext block bitmap", block_bitmap, 1),
            ("ext inode bitmap", inode_bitmap, 1),
            ("ext inode table", inode_table, geo.inode_table_blocks),
        ];
        for (what, start, len) in own {
            match start.checked_add(len) {
                Some(end) if start >= geo.first_data_block && end <= geo.blocks => {
                    meta.add(abs(start), abs(end))
                }
                _ => return Err(oob(what, abs(start), len.saturating_mul(bs), &area)),
            }
        }
        let base = geo.base_meta_blocks(g);
        meta.add(abs(first), abs((first + base).min(geo.blocks)));

        let uninit = flags & BG_BLOCK_UNINIT != 0 && csum.present();
        if uninit {
            // Nothing else is allocated in the group (its own metadata was added above, and
            // metadata of other groups is added when their descriptors are read).
            continue;
        }
        if !batch.extends(block_bitmap, bs) {
            batch.flush(&area, &geo, &mut bits)?;
            batch = Batch {
                first_block: block_bitmap,
                groups: Vec::new(),
            };
        }
        batch.groups.push(g);
    }
    batch.flush(&area, &geo, &mut bits)?;

    // Past the file system's end (a partition larger than the file system) is not the file
    // system's: it is kept (it may hold another layer's metadata, e.g. an md superblock).
    bits.add(
        abs(geo.blocks).min(area.start + area.len),
        area.start + area.len,
    );
    out.extend(bits.finish().ranges());
    out.extend(meta.finish().ranges());
    Ok(())
}

fn oob<D: ?Sized>(what: &'static str, offset: u64, len: u64, area: &Area<'_, D>) -> FsmapError {
    FsmapError::OutOfBounds {
        what,
        offset,
        len,
        limit: area.start.saturating_add(area.len),
    }
}

fn geometry(sb: &[u8], area_len: u64) -> Result<Geometry, FsmapError> {
    if !probe(sb) {
        return Err(FsmapError::corrupt("ext superblock", "no magic"));
    }
    let compat = le32(sb, 0x5C);
    let incompat = le32(sb, 0x60);
    let ro_compat = le32(sb, 0x64);
    if incompat & INCOMPAT_JOURNAL_DEV != 0 {
        return Err(FsmapError::unsupported(
            "ext feature",
            "external journal device",
        ));
    }
    if incompat & !INCOMPAT_KNOWN != 0 {
        return Err(FsmapError::unsupported(
            "ext feature",
            format!("incompat {:#x}", incompat & !INCOMPAT_KNOWN),
        ));
    }
    if ro_compat & RO_COMPAT_BIGALLOC != 0 {
        return Err(FsmapError::unsupported("ext feature", "bigalloc"));
    }
    if ro_compat & !RO_COMPAT_KNOWN != 0 {
        return Err(FsmapError::unsupported(
            "ext feature",
            format!("ro_compat {:#x}", ro_compat & !RO_COMPAT_KNOWN),
        ));
    }
    let log = le32(sb, 0x18);
    if log > 6 {
        return Err(FsmapError::corrupt(
            "ext superblock",
            format!("log block size {log}"),
        ));
    }
    let block_size = 1024u64 << log;
    let wide = incompat & INCOMPAT_64BIT != 0;
    let blocks = u64::from(le32(sb, 0x4))
        | if wide {
            u64::from(le32(sb, 0x150)) << 32
        } else {
            0
        };
    let first_data_block = u64::from(le32(sb, 0x14));
    if first_data_block != u64::from(block_size == 1024) {
        return Err(FsmapError::corrupt(
            "ext superblock",
            format!("first data block {first_data_block}"),
        ));
    }
    match blocks.checked_mul(block_size) {
        Some(bytes) if bytes <= area_len => {}
        _ => {
            return Err(FsmapError::OutOfBounds {
                what: "ext file system",
                offset: 0,
                len: blocks.saturating_mul(block_size),
                limit: area_len,
            })
        }
    }
    if blocks <= first_data_block + 1 {
        return Err(FsmapError::corrupt(
            "ext superblock",
            format!("{blocks} blocks"),
        ));
    }
    let blocks_per_group = u64::from(le32(sb, 0x20));
    // mke2fs's own bounds (the bitmap fits in one block).
    if !(256..=block_size * 8).contains(&blocks_per_group) || blocks_per_group % 8 != 0 {
        return Err(FsmapError::corrupt(
            "ext superblock",
            format!("{blocks_per_group} blocks per group"),
        ));
    }
    let groups = (blocks - first_data_block).div_ceil(blocks_per_group);
    if groups > u64::from(u32::MAX) {
        return Err(FsmapError::corrupt(
            "ext superblock",
            format!("{groups} groups"),
        ));
    }
    let desc_size = if wide { u64::from(le16(sb, 0xFE)) } else { 32 };
    if !desc_size.is_power_of_two()
        || !(32..=block_size).contains(&desc_size)
        || (wide && desc_size < 64)
    {
        return Err(FsmapError::corrupt(
            "ext superblock",
            format!("descriptor size {desc_size}"),
        ));
    }
    let descs_per_block = block_size / desc_size;
    let rev = le32(sb, 0x4C);
    let inode_size = if rev == 0 {
        128
    } else {
        u64::from(le16(sb, 0x58))
    };
    if !inode_size.is_power_of_two() || !(128..=block_size).contains(&inode_size) {
        return Err(FsmapError::corrupt(
            "ext superblock",
            format!("inode size {inode_size}"),
        ));
    }
    let inodes_per_group = u64::from(le32(sb, 0x28));
    if inodes_per_group == 0 || inodes_per_group > block_size * 8 {
        return Err(FsmapError::corrupt(
            "ext superblock",
            format!("{inodes_per_group} inodes per group"),
        ));
    }
    let inode_table_blocks = (inodes_per_group * inode_size).div_ceil(block_size);
    let gdt_blocks = groups.div_ceil(descs_per_block);
    let first_meta_bg = u64::from(le32(sb, 0x104));
    if incompat & INCOMPAT_META_BG != 0 && first_meta_bg > gdt_blocks {
        return Err(FsmapError::corrupt(
            "ext superblock",
            format!("first meta_bg {first_meta_bg}"),
        ));
    }
    Ok(Geometry {
        block_size,
        blocks,
        first_data_block,
        blocks_per_group,
        groups,
        desc_size,
        descs_per_block,
        inode_table_blocks,
        reserved_gdt: u64::from(le16(sb, 0xCE)),
        gdt_blocks,
        first_meta_bg,
        compat,
        incompat,
        ro_compat,
        backup_bgs: [le32(sb, 0x24C), le32(sb, 0x250)],
    })
}

fn check_clean(sb: &[u8], opts: &Options, notes: &mut Vec<String>) -> Result<(), FsmapError> {
    let state = le16(sb, 0x3A);
    let mut why = Vec::new();
    if le32(sb, 0x60) & INCOMPAT_RECOVER != 0 {
        why.push("the journal needs recovery");
    }
    if state & STATE_VALID == 0 {
        why.push("the state is not clean (mounted, or not unmounted)");
    }
    if state & STATE_ERROR != 0 {
        why.push("errors were recorded");
    }
    if why.is_empty() {
        return Ok(());
    }
    let detail = format!("ext: {}", why.join(", "));
    if opts.force_unclean {
        notes.push(format!("{detail}; mapped anyway (forced)"));
        Ok(())
    } else {
        Err(FsmapError::Unclean { detail })
    }
}

/// Group descriptor checksums (crc16 with `gdt_csum`, crc32c with `metadata_csum`).
enum Checksum {
    None,
    Crc16 { uuid: [u8; 16], desc_size: usize },
    Crc32c { seed: u32, desc_size: usize },
}

impl Checksum {
    fn new(sb: &[u8], geo: &Geometry) -> Self {
        let mut uuid = [0; 16];
        if let Some(u) = sb.get(0x68..0x78) {
            uuid.copy_from_slice(u);
        }
        let desc_size = geo.desc_size as usize;
        if geo.ro_compat & RO_COMPAT_METADATA_CSUM != 0 {
            let seed = if geo.incompat & INCOMPAT_CSUM_SEED != 0 {
                le32(sb, 0x270)
            } else {
                let mut d = CRC32C.digest();
                d.update(&uuid);
                d.finalize()
            };
            Checksum::Crc32c { seed, desc_size }
        } else if geo.ro_compat & RO_COMPAT_GDT_CSUM != 0 {
            // Without 64bit the kernel checksums 32 bytes whatever s_desc_size says.
            Checksum::Crc16 { uuid, desc_size }
        } else {
            Checksum::None
        }
    }

    fn present(&self) -> bool {
        !matches!(self, Checksum::None)
    }

    fn verify(&self, group: u64, desc: &[u8]) -> Result<(), FsmapError> {
        let le_group = (group as u32).to_le_bytes();
        let head = desc.get(..0x1E).unwrap_or_default();
        let tail = desc.get(0x20..).unwrap_or_default();
        let want = match self {
            Checksum::None => return Ok(()),
            Checksum::Crc16 { uuid, desc_size } => {
                let mut d = CRC16.digest();
                d.update(uuid);
                d.update(&le_group);
                d.update(head);
                d.update(
                    tail.get(..desc_size.saturating_sub(0x20))
                        .unwrap_or_default(),
                );
                d.finalize()
            }
            Checksum::Crc32c { seed, desc_size } => {
                let mut d = CRC32C.digest_with_initial(seed.reverse_bits());
                d.update(&le_group);
                d.update(head);
                d.update(&[0, 0]);
                d.update(
                    tail.get(..desc_size.saturating_sub(0x20))
                        .unwrap_or_default(),
                );
                (d.finalize() & 0xFFFF) as u16
            }
        };
        let have = le16(desc, 0x1E);
        if have == want {
            Ok(())
        } else {
            Err(FsmapError::corrupt(
                "ext group descriptor",
                format!("group {group}: checksum {have:#06x}, expected {want:#06x}"),
            ))
        }
    }
}

/// Groups whose block bitmaps are consecutive blocks, read in one go.
#[derive(Default)]
struct Batch {
    first_block: u64,
    groups: Vec<u64>,
}

impl Batch {
    fn extends(&self, block: u64, block_size: u64) -> bool {
        let n = self.groups.len() as u64;
        !self.groups.is_empty()
            && block == self.first_block + n
            && (n + 1) * block_size <= BATCH_BYTES
    }

    fn flush<D: ReadAt + ?Sized>(
        &self,
        area: &Area<'_, D>,
        geo: &Geometry,
        out: &mut RangeBuilder,
    ) -> Result<(), FsmapError> {
        if self.groups.is_empty() {
            return Ok(());
        }
        let bs = geo.block_size;
        let n = self.groups.len() as u64;
        let buf = area.read_vec("ext block bitmaps", self.first_block * bs, n * bs)?;
        for (i, &g) in self.groups.iter().enumerate() {
            let bitmap = buf
                .get(i * bs as usize..(i + 1) * bs as usize)
                .unwrap_or_default();
            let first = geo.group_first_block(g);
            crate::map::add_bitmap(
                bitmap,
                geo.blocks_in_group(g),
                area.start + first * bs,
                bs,
                out,
            );
        }
        Ok(())
    }
}
