//! The image store: a directory of image files (`NAME.dcimg`, format in
//! `diskcast_proto::image_file`).
//!
//! An image appears only when complete and checked: uploads and imports are written to a hidden
//! temporary file (`.NAME.PID.N.partial`), fsynced, fully verified, then linked to their final
//! name — `link` fails if the name exists, so two captures of one name cannot overwrite each
//! other — and the temporary name removed. A crash leaves at most a `.partial` file, never a
//! listed image; the next server start removes partial files whose writer is gone.

use diskcast_proto::image_file::{
    valid_image_name, ImageFile, ImageFileError, ImageWriter, Metadata, PushError, EXTENSION,
    IMAGE_NAME_RULE,
};
use diskcast_proto::manifest::{ChunkKind, DEFAULT_CHUNK_SIZE};
use diskcast_proto::read_at::ReadAt;
use diskcast_proto::trust::{PublicKey, SigningKey, Untrusted};
use diskcast_proto::units::human_size;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("image name {0:?} is invalid: use {IMAGE_NAME_RULE}")]
    Name(String),
    #[error("image {name:?} already exists in {dir}: delete it first or choose another name")]
    Exists { name: String, dir: PathBuf },
    #[error("no image {name:?} in {dir} (see `bootserver images list`)")]
    NotFound { name: String, dir: PathBuf },
    #[error("{path}: {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the uploaded image is incomplete or damaged; nothing was stored")]
    Rejected(#[source] ImageFileError),
    #[error("{source_desc} is empty (0 bytes): nothing to import (did the command before the pipe fail?)")]
    EmptySource { source_desc: String },
    #[error("reading {source_desc}")]
    ReadSource {
        source_desc: String,
        #[source]
        source: io::Error,
    },
    #[error("{target} is the stored image {name:?} itself: exporting onto it would destroy it")]
    ExportOntoItself { name: String, target: PathBuf },
    #[error("{target} exists: give --force to replace it")]
    TargetExists { target: PathBuf },
    #[error(transparent)]
    Image(#[from] ImageFileError),
    #[error("image {name:?} {why}: it is not deployed (`bootserver images verify {name}` checks it; `images sign {name}` vouches for an image you checked)")]
    Untrusted { name: String, why: Untrusted },
    #[error("no key to check image {name:?}'s signature with: give --config (the server's key) or --trust KEY")]
    NoKeys { name: String },
}

/// What an image's signature says, against the keys the store knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signature {
    /// Signed by this trusted key.
    By(PublicKey),
    Untrusted(Untrusted),
    /// The store knows no key to check it with.
    NotChecked,
}

impl std::fmt::Display for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::By(key) => write!(f, "signed by {key}"),
            Self::Untrusted(why) => write!(f, "NOT TRUSTED: {why}"),
            Self::NotChecked => f.write_str("not checked (no key: give --config or --trust KEY)"),
        }
    }
}

/// Identifies one version of a file: any write changes its ctime, which no one can set back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

/// Opens an image file and checks its structure.
pub fn open_image_file(path: &Path) -> Result<ImageFile, ImageFileError> {
    let io_err = |op: &'static str| {
        let path = path.to_path_buf();
        move |source| ImageFileError::Io { path, op, source }
    };
    let file = File::open(path).map_err(io_err("opening"))?;
    let len = file.metadata().map_err(io_err("reading metadata"))?.len();
    ImageFile::read(file, len, path)
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { path, op, source }
}

/// One line of `images list`.
#[derive(Debug, Clone)]
pub struct ImageSummary {
    pub name: String,
    pub raw_size: u64,
    /// The disk's bytes that are part of the image (all but the unused, absent chunks).
    pub used_bytes: u64,
    pub data_bytes: u64,
    pub stored_bytes: u64,
    pub file_len: u64,
    pub created: u64,
    pub image_hash: [u8; 32],
    pub origin: String,
}

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    /// Signs what the store takes in (captures, imports); `None`: stored unsigned.
    signer: Option<SigningKey>,
    /// Whose image signatures are accepted (the signer's own key among them).
    trusted: Vec<PublicKey>,
    /// Images fully verified (signature and every chunk) in this version of their file.
    verified: Arc<Mutex<HashMap<String, FileStamp>>>,
}

static PARTIAL_COUNTER: AtomicU64 = AtomicU64::new(0);

/// An image being written; becomes visible only through [`Incoming::commit`].
#[derive(Debug)]
pub struct Incoming {
    name: String,
    temp: PathBuf,
    final_path: PathBuf,
    pub file: BufWriter<File>,
    signer: Option<SigningKey>,
    /// Replaces the image's metadata when the store signs it (a pull records where from).
    metadata: Option<Metadata>,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // Committed images were linked already; anything else is discarded.
        let _ = fs::remove_file(&self.temp);
    }
}

impl Incoming {
    /// Flushes, fsyncs, verifies every chunk, then publishes under the final name.
    pub fn commit(mut self) -> Result<ImageSummary, StoreError> {
        self.file.flush().map_err(io_err(&self.temp, "writing"))?;
        self.file
            .get_ref()
            .sync_all()
            .map_err(io_err(&self.temp, "syncing"))?;
        let mut image = open_image_file(&self.temp).map_err(StoreError::Rejected)?;
        image.verify().map_err(StoreError::Rejected)?;
        if let Some(key) = &self.signer {
            // Checked, so the store vouches for it: every image it keeps is signed.
            let metadata = self.metadata.as_ref().unwrap_or(&image.metadata);
            sign_in_place(&self.temp, &image, metadata, key)?;
            image = open_image_file(&self.temp).map_err(StoreError::Rejected)?;
        }
        match fs::hard_link(&self.temp, &self.final_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StoreError::Exists {
                    name: self.name.clone(),
                    dir: self.final_path.parent().unwrap_or(Path::new("")).into(),
                })
            }
            Err(e) => return Err(io_err(&self.final_path, "publishing")(e)),
        }
        if let Some(dir) = self.final_path.parent() {
            // The new directory entry must survive a power cut too.
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(ImageSummary::of(&self.name, &image))
    }
}

impl ImageSummary {
    pub fn of(name: &str, image: &ImageFile) -> Self {
        Self {
            name: name.into(),
            raw_size: image.manifest.image_size,
            used_bytes: image.manifest.image_size - image.manifest.absent_bytes(),
            data_bytes: image.manifest.data_bytes(),
            stored_bytes: image.manifest.stored_bytes(),
            file_len: image.file_len,
            created: image.metadata.created,
            image_hash: image.manifest.image_hash(),
            origin: image.metadata.origin.clone(),
        }
    }

    /// `64.0 MiB raw, 20.0 MiB used, 13.0 MiB of data stored in 7.0 MiB (1.86x)`.
    pub fn sizes(&self) -> String {
        format!(
            "{} raw, {} used, {} of data stored in {} ({:.2}x)",
            human_size(self.raw_size),
            human_size(self.used_bytes),
            human_size(self.data_bytes),
            human_size(self.stored_bytes),
            self.data_bytes as f64 / self.stored_bytes.max(1) as f64
        )
    }
}

fn import_metadata(source_desc: &str, level: i32) -> Metadata {
    let mut meta = Metadata::new("import", level, crate::unix_now());
    meta.source_disk = source_desc.into();
    meta
}

/// A reader that remembers its own failure, so a caller that also writes can tell a failed read
/// from a failed write.
struct TellingReader<'a> {
    inner: &'a mut dyn Read,
    failed: Option<io::Error>,
}

impl Read for TellingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            let marker = io::Error::new(e.kind(), "reading the source failed");
            self.failed = Some(e);
            marker
        })
    }
}

/// Writes every chunk of `image` to `file` (named `path` in errors), then syncs it. `sparse`:
/// size the file and skip zero chunks (a regular file); otherwise write zeros too (a device).
/// Unused (absent) chunks are never written.
fn write_raw(image: &ImageFile, file: &File, path: &Path, sparse: bool) -> Result<(), StoreError> {
    let manifest = &image.manifest;
    if sparse {
        file.set_len(manifest.image_size)
            .map_err(io_err(path, "sizing"))?;
    }
    let zeros = vec![0u8; manifest.chunk_size as usize];
    for index in 0..manifest.chunk_count() {
        let (offset, len) = manifest.chunk_range(index);
        let kind = manifest.chunks[index as usize];
        let bytes = if kind.is_data() {
            image.raw_chunk(index)?
        } else if sparse || kind == ChunkKind::Absent {
            // Unused on the source: a device keeps what it holds there.
            continue;
        } else {
            zeros[..len].to_vec()
        };
        std::os::unix::fs::FileExt::write_all_at(file, &bytes, offset)
            .map_err(io_err(path, "writing"))?;
    }
    file.sync_all().map_err(io_err(path, "syncing"))
}

/// Rewrites the tail of the image file at `path` (not yet published, or a private copy) with
/// its manifest signed by `key`; the stored chunks stay as they are.
fn sign_in_place(
    path: &Path,
    image: &ImageFile,
    metadata: &Metadata,
    key: &SigningKey,
) -> Result<(), StoreError> {
    let mut manifest = image.manifest.clone();
    diskcast_proto::trust::sign_manifest(&mut manifest, key);
    let data_len = manifest.stored_bytes();
    let mut file = File::options()
        .write(true)
        .open(path)
        .map_err(io_err(path, "opening to sign"))?;
    file.set_len(data_len).map_err(io_err(path, "signing"))?;
    file.seek(io::SeekFrom::Start(data_len))
        .map_err(io_err(path, "signing"))?;
    let mut out = BufWriter::new(&mut file);
    diskcast_proto::image_file::write_tail(&mut out, &manifest, metadata, data_len)
        .and_then(|()| out.flush())
        .map_err(io_err(path, "signing"))?;
    drop(out);
    file.sync_all().map_err(io_err(path, "syncing"))
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(io_err(dir, "creating the image store"))?;
        Ok(Self {
            dir: dir.into(),
            signer: None,
            trusted: Vec::new(),
            verified: Arc::default(),
        })
    }

    /// The store signs what it takes in with `key` and trusts its signatures.
    pub fn with_signer(mut self, key: SigningKey) -> Self {
        self.trusted.push(key.public());
        self.signer = Some(key);
        self
    }

    /// The key the store signs with.
    pub fn signer(&self) -> Option<&SigningKey> {
        self.signer.as_ref()
    }

    /// The store also trusts these keys' image signatures.
    pub fn trusting(mut self, keys: &[PublicKey]) -> Self {
        self.trusted.extend_from_slice(keys);
        self
    }

    /// What `image`'s signature says.
    pub fn signature(&self, image: &ImageFile) -> Signature {
        if self.trusted.is_empty() {
            return Signature::NotChecked;
        }
        match diskcast_proto::trust::manifest_signer(&image.manifest, &self.trusted) {
            Ok(key) => Signature::By(key),
            Err(why) => Signature::Untrusted(why),
        }
    }

    /// The image, once its signature is trusted and every chunk verified: what a deploy sends.
    /// The full check runs once per version of the file (a changed file is checked again).
    pub fn open_trusted(&self, name: &str) -> Result<ImageFile, StoreError> {
        let path = self.path_of(name)?;
        let stamp = FileStamp::of(&path);
        let image = self.open_image(name)?;
        match self.signature(&image) {
            Signature::By(_) => {}
            Signature::Untrusted(why) => {
                return Err(StoreError::Untrusted {
                    name: name.into(),
                    why,
                })
            }
            Signature::NotChecked => return Err(StoreError::NoKeys { name: name.into() }),
        }
        let known_good = self
            .verified
            .lock()
            .ok()
            .and_then(|v| v.get(name).copied())
            .is_some_and(|s| Some(s) == stamp);
        if !known_good {
            image.verify()?;
            // Checked against the version opened: a change since shows in its stamp.
            if let (Some(stamp), Ok(mut verified)) = (stamp, self.verified.lock()) {
                if FileStamp::of(&path) == Some(stamp) {
                    verified.insert(name.into(), stamp);
                }
            }
        }
        Ok(image)
    }

    /// Signs an image already stored (one imported unsigned, or signed by a key no longer
    /// trusted) after checking every chunk: a copy is signed and renamed over it.
    pub fn sign(&self, name: &str) -> Result<ImageSummary, StoreError> {
        let Some(key) = &self.signer else {
            return Err(StoreError::NoKeys { name: name.into() });
        };
        let image = self.open_image(name)?;
        image.verify()?;
        let path = self.path_of(name)?;
        let temp = self.dir.join(format!(
            ".{name}.{}.{}.partial",
            std::process::id(),
            PARTIAL_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let signed = fs::copy(&path, &temp)
            .map_err(io_err(&temp, "copying to sign"))
            .and_then(|_| sign_in_place(&temp, &image, &image.metadata, key))
            .and_then(|()| {
                let image = open_image_file(&temp)?;
                image.verify()?;
                fs::rename(&temp, &path).map_err(io_err(&path, "renaming into place"))?;
                Ok(ImageSummary::of(name, &image))
            });
        if signed.is_err() {
            let _ = fs::remove_file(&temp);
        }
        signed
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, name: &str) -> Result<PathBuf, StoreError> {
        if !valid_image_name(name) {
            return Err(StoreError::Name(name.into()));
        }
        Ok(self.dir.join(format!("{name}.{EXTENSION}")))
    }

    /// Removes partial files left by writers that are gone (a crash or a restart).
    pub fn clean_partials(&self) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return removed;
        };
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = file_name
                .strip_prefix('.')
                .and_then(|s| s.strip_suffix(".partial"))
            else {
                continue;
            };
            let pid = stem.rsplit('.').nth(1).and_then(|p| p.parse::<u32>().ok());
            if pid.is_none_or(|pid| !process_alive(pid)) && fs::remove_file(entry.path()).is_ok() {
                removed.push(entry.path());
            }
        }
        removed
    }

    /// `Ok` when `name` is a valid image name not in use (a later commit may still find it taken).
    pub fn check_free(&self, name: &str) -> Result<(), StoreError> {
        if self.path_of(name)?.exists() {
            return Err(StoreError::Exists {
                name: name.into(),
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// Starts writing image `name`; refuses names that exist already.
    pub fn incoming(&self, name: &str) -> Result<Incoming, StoreError> {
        self.check_free(name)?;
        let final_path = self.path_of(name)?;
        let temp = self.dir.join(format!(
            ".{name}.{}.{}.partial",
            std::process::id(),
            PARTIAL_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(io_err(&temp, "creating"))?;
        Ok(Incoming {
            name: name.into(),
            temp,
            final_path,
            file: BufWriter::with_capacity(1 << 20, file),
            signer: self.signer.clone(),
            metadata: None,
        })
    }

    /// A staged image file (a pull's, complete) to publish as `name` through
    /// [`Incoming::commit`]: verified, then signed with the store's key and given `resign`'s
    /// metadata when `resign` is `Some`, else kept exactly as it is (its own signature, if any).
    /// The staged file is removed whether the commit succeeds or not.
    pub fn adopt_staged(
        &self,
        name: &str,
        staged: &Path,
        resign: Option<Metadata>,
    ) -> Result<Incoming, StoreError> {
        let final_path = self.path_of(name)?;
        let file = File::options()
            .read(true)
            .write(true)
            .open(staged)
            .map_err(io_err(staged, "opening"))?;
        Ok(Incoming {
            name: name.into(),
            temp: staged.into(),
            final_path,
            file: BufWriter::new(file),
            signer: resign.as_ref().and(self.signer.clone()),
            metadata: resign,
        })
    }

    /// The keys whose image signatures the store accepts.
    pub fn trusted(&self) -> &[PublicKey] {
        &self.trusted
    }

    /// What follows image `name`'s stored chunks in its file (signed manifest, metadata,
    /// footer: what a pull checks before it asks for a chunk), and what its signature says.
    pub fn tail(&self, name: &str) -> Result<(Vec<u8>, Signature), StoreError> {
        let image = self.open_image(name)?;
        let data_len = image.manifest.stored_bytes();
        let path = self.path_of(name)?;
        let mut tail = vec![0u8; (image.file_len - data_len) as usize];
        let file = File::open(&path).map_err(io_err(&path, "opening"))?;
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut tail, data_len)
            .map_err(io_err(&path, "reading the manifest"))?;
        Ok((tail, self.signature(&image)))
    }

    /// The stored bytes (as they travel: a zstd frame or raw) of image `name`'s chunk `index`;
    /// `None` when that chunk is not stored (zero, unused, or past the end). Not checked here:
    /// whoever fetches it checks it against the signed manifest.
    pub fn stored_chunk(&self, name: &str, index: u32) -> Result<Option<Vec<u8>>, StoreError> {
        let image = self.open_image(name)?;
        if index >= image.manifest.chunk_count() || !image.manifest.chunks[index as usize].is_data()
        {
            return Ok(None);
        }
        let path = self.path_of(name)?;
        image
            .stored_chunk(index)
            .map(Some)
            .map_err(io_err(&path, "reading a chunk"))
    }

    pub fn open_image(&self, name: &str) -> Result<ImageFile, StoreError> {
        let path = self.path_of(name)?;
        if !path.exists() {
            return Err(StoreError::NotFound {
                name: name.into(),
                dir: self.dir.clone(),
            });
        }
        Ok(open_image_file(&path)?)
    }

    pub fn show(&self, name: &str) -> Result<(ImageSummary, ImageFile), StoreError> {
        let image = self.open_image(name)?;
        Ok((ImageSummary::of(name, &image), image))
    }

    /// Every listed image, by name; files that do not open are reported as errors.
    pub fn list(&self) -> Result<Vec<Result<ImageSummary, StoreError>>, StoreError> {
        let mut names: Vec<String> = fs::read_dir(&self.dir)
            .map_err(io_err(&self.dir, "listing the image store"))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(&format!(".{EXTENSION}"))
                    .filter(|n| valid_image_name(n))
                    .map(String::from)
            })
            .collect();
        names.sort();
        Ok(names
            .iter()
            .map(|n| self.show(n).map(|(summary, _)| summary))
            .collect())
    }

    /// Checks every chunk; returns what the signature says (the caller decides whether an
    /// unchecked or untrusted signature fails it).
    pub fn verify(&self, name: &str) -> Result<(ImageSummary, Signature), StoreError> {
        let (summary, image) = self.show(name)?;
        image.verify()?;
        Ok((summary, self.signature(&image)))
    }

    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        let path = self.path_of(name)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::NotFound {
                name: name.into(),
                dir: self.dir.clone(),
            }),
            Err(e) => Err(io_err(&path, "deleting")(e)),
        }
    }

    /// Converts a raw disk image read as a stream (stdin) into a stored image: every block,
    /// since a stream has no partition table to look up ahead of reading it.
    pub fn import(
        &self,
        name: &str,
        raw: &mut dyn Read,
        source_desc: &str,
        level: i32,
    ) -> Result<ImageSummary, StoreError> {
        let mut incoming = self.incoming(name)?;
        let temp = incoming.temp.clone();
        let mut writer = ImageWriter::new(&mut incoming.file, DEFAULT_CHUNK_SIZE);
        // Reading the source and writing the store fail for different reasons: keep them apart.
        let mut source = TellingReader {
            inner: raw,
            failed: None,
        };
        let read = writer.push_all(&mut source, level, |_| {});
        if let Some(source) = source.failed.take() {
            return Err(StoreError::ReadSource {
                source_desc: source_desc.into(),
                source,
            });
        }
        let read = read.map_err(io_err(&temp, "writing"))?;
        if read == 0 {
            return Err(StoreError::EmptySource {
                source_desc: source_desc.into(),
            });
        }
        writer
            .finish(&import_metadata(source_desc, level))
            .map_err(io_err(&temp, "writing"))?;
        incoming.commit()
    }

    /// Converts a raw disk image file or device into a stored image, reading only the chunks
    /// `used` marks (every chunk when `None`); the others are stored as absent.
    pub fn import_disk(
        &self,
        name: &str,
        disk: &(impl ReadAt + ?Sized),
        source_desc: &str,
        level: i32,
        used: Option<&[bool]>,
    ) -> Result<ImageSummary, StoreError> {
        let read_err = |source| StoreError::ReadSource {
            source_desc: source_desc.into(),
            source,
        };
        let size = disk.size().map_err(read_err)?;
        if size == 0 {
            return Err(StoreError::EmptySource {
                source_desc: source_desc.into(),
            });
        }
        let mut incoming = self.incoming(name)?;
        let temp = incoming.temp.clone();
        let mut writer = ImageWriter::new(&mut incoming.file, DEFAULT_CHUNK_SIZE);
        writer
            .push_from(disk, size, used, level, |_, _| {})
            .map_err(|e| match e {
                PushError::Read(e) => read_err(io::Error::new(e.source.kind(), e)),
                PushError::Write(e) => io_err(&temp, "writing")(e),
                PushError::Compressor => {
                    io_err(&temp, "compressing")(io::Error::other("a compression thread crashed"))
                }
            })?;
        writer
            .finish(&import_metadata(source_desc, level))
            .map_err(io_err(&temp, "writing"))?;
        incoming.commit()
    }

    /// Writes image `name` as a raw disk image to `target`: a block device is written in place;
    /// a regular file is written beside its final name and renamed, sparse (zero chunks are
    /// holes). An existing file is replaced only with `force`, and never when it is the stored
    /// image itself (or a link to it).
    pub fn export(&self, name: &str, target: &Path, force: bool) -> Result<(), StoreError> {
        let image = self.open_image(name)?;
        let stored = fs::metadata(self.path_of(name)?).map_err(io_err(target, "reading"))?;
        match fs::metadata(target) {
            Ok(existing) => {
                use std::os::unix::fs::MetadataExt;
                if existing.dev() == stored.dev() && existing.ino() == stored.ino() {
                    return Err(StoreError::ExportOntoItself {
                        name: name.into(),
                        target: target.into(),
                    });
                }
                let is_device = {
                    use std::os::unix::fs::FileTypeExt;
                    existing.file_type().is_block_device() || existing.file_type().is_char_device()
                };
                if is_device {
                    let file = File::options()
                        .write(true)
                        .open(target)
                        .map_err(io_err(target, "opening"))?;
                    return write_raw(&image, &file, target, false);
                }
                if !force {
                    return Err(StoreError::TargetExists {
                        target: target.into(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(target, "reading")(e)),
        }
        let file_name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "export".into());
        let temp = target.with_file_name(format!(
            ".{file_name}.{}.{}.partial",
            std::process::id(),
            PARTIAL_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(io_err(&temp, "creating"))?;
        let written = write_raw(&image, &file, &temp, true).and_then(|()| {
            fs::rename(&temp, target).map_err(io_err(target, "renaming into place"))
        });
        if written.is_err() {
            let _ = fs::remove_file(&temp);
        }
        written
    }

    /// Writes image `name` as a raw disk image to a stream (stdout).
    pub fn export_to(&self, name: &str, out: &mut dyn Write) -> Result<(), StoreError> {
        let image = self.open_image(name)?;
        let target = Path::new("the output stream");
        let zeros = vec![0u8; image.manifest.chunk_size as usize];
        for index in 0..image.manifest.chunk_count() {
            let (_, len) = image.manifest.chunk_range(index);
            if image.manifest.chunks[index as usize].is_data() {
                let raw = image.raw_chunk(index)?;
                out.write_all(&raw).map_err(io_err(target, "writing"))?;
            } else {
                out.write_all(&zeros[..len])
                    .map_err(io_err(target, "writing"))?;
            }
        }
        out.flush().map_err(io_err(target, "writing"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store(tag: &str) -> Store {
        let dir = std::env::temp_dir().join(format!("diskcast-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        Store::open(&dir).unwrap()
    }

    fn raw_disk(size: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        let mut raw = vec![0u8; size];
        for (i, block) in raw.chunks_mut(64 << 10).enumerate() {
            match i % 4 {
                0 => {}
                1 => block
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = b"ext4 inode table"[j % 16]),
                _ => block.iter_mut().for_each(|b| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                    *b = (state >> 33) as u8
                }),
            }
        }
        raw
    }

    #[test]
    fn import_then_export_gives_the_same_bytes_file_and_stream() {
        let store = temp_store("round-trip");
        // Not a multiple of the chunk size, with zero, text and random regions.
        let raw = raw_disk(5 * (1 << 20) + 12345, 3);
        let summary = store.import("golden", &mut &raw[..], "test", 3).unwrap();
        assert_eq!(summary.raw_size, raw.len() as u64);
        assert!(summary.stored_bytes < summary.data_bytes);
        let exported = store.dir().join("exported.raw");
        store.export("golden", &exported, false).unwrap();
        assert!(fs::read(&exported).unwrap() == raw);
        let mut streamed = Vec::new();
        store.export_to("golden", &mut streamed).unwrap();
        assert!(streamed == raw);
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].as_ref().unwrap().name, "golden");
        assert!(matches!(
            store.import("golden", &mut &raw[..], "again", 3),
            Err(StoreError::Exists { .. })
        ));
        store.delete("golden").unwrap();
        assert!(store.list().unwrap().is_empty());
        assert!(matches!(
            store.delete("golden"),
            Err(StoreError::NotFound { .. })
        ));
    }

    #[test]
    fn tampered_image_refused() {
        let key = SigningKey::from_seed([4; 32]);
        let store = temp_store("tampered").with_signer(key.clone());
        let raw = raw_disk(3 * (1 << 20) + 100, 8);
        store.import("golden", &mut &raw[..], "test", 3).unwrap();
        let path = store.dir().join("golden.dcimg");
        let good = fs::read(&path).unwrap();
        assert_eq!(
            store.verify("golden").unwrap().1,
            Signature::By(key.public())
        );
        store.open_trusted("golden").unwrap();
        // Another store trusting another key: not deployed, and `verify` says why.
        let stranger = Store::open(store.dir())
            .unwrap()
            .with_signer(SigningKey::from_seed([5; 32]));
        assert!(matches!(
            stranger.open_trusted("golden"),
            Err(StoreError::Untrusted {
                why: Untrusted::UnknownKey,
                ..
            })
        ));
        assert!(matches!(
            Store::open(store.dir()).unwrap().open_trusted("golden"),
            Err(StoreError::NoKeys { .. })
        ));

        // 1. A chunk changed on disk (after a deploy had checked the file): caught again.
        let image = store.open_image("golden").unwrap();
        let mut bytes = good.clone();
        bytes[image.manifest.wire_len(1) / 2] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        assert!(store.verify("golden").is_err());
        assert!(
            store.open_trusted("golden").is_err(),
            "a changed chunk was deployed"
        );

        // 2. The manifest rewritten to match other content, with every CRC and the footer's
        // hash recomputed: only the signature tells.
        let mut forged = image.manifest.clone();
        let other = forged.data_chunks().next().unwrap();
        forged.chunks[other as usize] = match forged.chunks[other as usize] {
            ChunkKind::Data(_) => ChunkKind::Data([0xee; 32]),
            ChunkKind::Zstd { stored_len, .. } => ChunkKind::Zstd {
                hash: [0xee; 32],
                stored_len,
            },
            kind => kind,
        };
        let data_len = forged.stored_bytes();
        let mut bytes = good[..data_len as usize].to_vec();
        diskcast_proto::image_file::write_tail(&mut bytes, &forged, &image.metadata, data_len)
            .unwrap();
        fs::write(&path, &bytes).unwrap();
        let opened = store.open_image("golden").expect("structurally sound");
        assert_eq!(
            store.signature(&opened),
            Signature::Untrusted(Untrusted::UnknownKey)
        );
        assert!(matches!(
            store.open_trusted("golden"),
            Err(StoreError::Untrusted { .. })
        ));
        // 3. The same with the signature removed: unsigned, refused.
        forged.signature.clear();
        let mut bytes = good[..data_len as usize].to_vec();
        diskcast_proto::image_file::write_tail(&mut bytes, &forged, &image.metadata, data_len)
            .unwrap();
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            store.open_trusted("golden"),
            Err(StoreError::Untrusted {
                why: Untrusted::Unsigned,
                ..
            })
        ));
        // A deploy refuses before it opens a socket.
        let opts = diskcast_transport::send::SendOptions::new(
            Some("lo".into()),
            diskcast_proto::wire::DEFAULT_GROUP,
            diskcast_proto::wire::DEFAULT_PORT,
        );
        let err = crate::deploy::deploy_once(&store, "golden", &opts, |_| {}).unwrap_err();
        assert!(err.to_string().contains("unsigned"), "{err}");

        // The good file again: trusted; `sign` vouches for an unsigned import after checking it.
        fs::write(&path, &good).unwrap();
        store.open_trusted("golden").unwrap();
        let unsigned = temp_store("tampered-unsigned");
        unsigned.import("plain", &mut &raw[..], "test", 3).unwrap();
        let signer = Store::open(unsigned.dir())
            .unwrap()
            .with_signer(key.clone());
        assert!(signer.open_trusted("plain").is_err());
        signer.sign("plain").unwrap();
        assert_eq!(
            signer.verify("plain").unwrap().1,
            Signature::By(key.public())
        );
        let exported = unsigned.dir().join("plain.raw");
        signer.export("plain", &exported, false).unwrap();
        assert!(fs::read(&exported).unwrap() == raw);
    }

    #[test]
    fn verify_detects_a_flipped_byte_in_any_chunk() {
        let store = temp_store("flip");
        let raw = raw_disk(3 * (1 << 20) + 100, 5);
        store.import("img", &mut &raw[..], "test", 3).unwrap();
        let path = store.dir().join("img.dcimg");
        let good = fs::read(&path).unwrap();
        let image = store.open_image("img").unwrap();
        // One flip inside every stored data chunk: first byte, middle, last byte.
        let mut offset = 0usize;
        let mut checked = 0;
        for index in image.manifest.data_chunks() {
            let len = image.manifest.wire_len(index);
            for at in [offset, offset + len / 2, offset + len - 1] {
                let mut bytes = good.clone();
                bytes[at] ^= 0x80;
                fs::write(&path, &bytes).unwrap();
                let err = store
                    .verify("img")
                    .expect_err("a flipped byte must fail verify");
                assert!(
                    err.to_string().contains("chunk at image offset")
                        || matches!(err, StoreError::Image(_)),
                    "{err}"
                );
                checked += 1;
            }
            offset += len;
        }
        assert!(checked >= 9);
        fs::write(&path, &good).unwrap();
        store.verify("img").unwrap();
    }

    #[test]
    fn a_partial_upload_is_never_listed_and_a_retry_succeeds() {
        let store = temp_store("partial");
        let raw = raw_disk(2 << 20, 9);
        let mut file_bytes = Vec::new();
        let mut writer = ImageWriter::new(&mut file_bytes, DEFAULT_CHUNK_SIZE);
        writer.push_all(&mut &raw[..], 3, |_| {}).unwrap();
        writer.finish(&Metadata::new("capture", 3, 1)).unwrap();

        // Cut off halfway: commit refuses, nothing listed, no temporary file left.
        let mut incoming = store.incoming("cut").unwrap();
        incoming
            .file
            .write_all(&file_bytes[..file_bytes.len() / 2])
            .unwrap();
        assert!(matches!(incoming.commit(), Err(StoreError::Rejected(_))));
        // A writer that vanished without commit (dropped): also nothing.
        let mut incoming = store.incoming("cut").unwrap();
        incoming.file.write_all(&file_bytes[..100]).unwrap();
        drop(incoming);
        assert!(store.list().unwrap().is_empty());
        assert_eq!(fs::read_dir(store.dir()).unwrap().count(), 0);

        let mut incoming = store.incoming("cut").unwrap();
        incoming.file.write_all(&file_bytes).unwrap();
        incoming.commit().unwrap();
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn stale_partials_of_dead_writers_are_cleaned() {
        let store = temp_store("stale");
        let dead = store.dir().join(".img.4000000000.0.partial");
        let ours = store
            .dir()
            .join(format!(".img.{}.0.partial", std::process::id()));
        fs::write(&dead, b"x").unwrap();
        fs::write(&ours, b"x").unwrap();
        assert_eq!(store.clean_partials(), vec![dead.clone()]);
        assert!(ours.exists() && !dead.exists());
    }

    #[test]
    fn bad_names_are_refused_before_touching_the_disk() {
        let store = temp_store("names");
        for bad in ["../etc/passwd", ".hidden", "a/b", ""] {
            assert!(matches!(store.incoming(bad), Err(StoreError::Name(_))));
            assert!(matches!(store.open_image(bad), Err(StoreError::Name(_))));
        }
    }

    #[test]
    fn export_never_destroys_the_stored_image_nor_silently_replaces_a_file() {
        let store = temp_store("export-safety");
        let raw = raw_disk(3 << 20, 5);
        store.import("golden", &mut &raw[..], "test", 3).unwrap();
        let stored = store.dir().join("golden.dcimg");
        let before = fs::read(&stored).unwrap();
        // Onto itself, and onto a hard link to it: refused, the image untouched.
        let link = store.dir().join("link-to-golden");
        fs::hard_link(&stored, &link).unwrap();
        for target in [&stored, &link] {
            for force in [false, true] {
                assert!(matches!(
                    store.export("golden", target, force),
                    Err(StoreError::ExportOntoItself { .. })
                ));
            }
        }
        assert!(fs::read(&stored).unwrap() == before);
        store.verify("golden").unwrap();
        // An existing file needs --force; with it, it is replaced whole.
        let target = store.dir().join("old.raw");
        fs::write(&target, b"precious").unwrap();
        assert!(matches!(
            store.export("golden", &target, false),
            Err(StoreError::TargetExists { .. })
        ));
        assert_eq!(fs::read(&target).unwrap(), b"precious");
        store.export("golden", &target, true).unwrap();
        assert!(fs::read(&target).unwrap() == raw);
        // No temporary file stays behind.
        let leftovers: Vec<_> = fs::read_dir(store.dir())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn an_empty_source_is_not_an_image_and_failures_name_their_side() {
        let store = temp_store("empty");
        assert!(matches!(
            store.import("golden", &mut &b""[..], "stdin", 3),
            Err(StoreError::EmptySource { .. })
        ));
        assert!(store.list().unwrap().is_empty());
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("device gone"))
            }
        }
        let err = store
            .import("golden", &mut Broken, "/dev/sdz", 3)
            .unwrap_err();
        assert!(err.to_string().contains("reading /dev/sdz"), "{err}");
        // A write into a full store is the store's failure, not the source's.
        let disk = crate::testing::TinyFs::mount("store", "2m");
        let small = Store::open(disk.path()).unwrap();
        disk.fill();
        let err = small
            .import("golden", &mut &raw_disk(4 << 20, 7)[..], "/dev/sdz", 3)
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("writing") && !text.contains("/dev/sdz"),
            "{text}"
        );
        drop(disk);
        // An export that cannot write names its target, not the store's file.
        let full = Path::new("/dev/full");
        let err = store.export("none", full, false).unwrap_err();
        assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
        let raw = raw_disk(2 << 20, 6);
        store.import("golden", &mut &raw[..], "test", 3).unwrap();
        let err = store.export("golden", full, false).unwrap_err();
        assert!(err.to_string().contains("/dev/full"), "{err}");
    }
}
