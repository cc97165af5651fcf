//! `bootserver images pull URL`: copies a stored image from another bootserver over HTTP.
//!
//! The source serves its image file's tail (`GET /images/NAME/manifest`: signed manifest,
//! metadata, footer) and each stored chunk (`GET /images/NAME/chunks/INDEX`). The puller checks
//! the tail's structure and its signature against the keys it trusts *before* it asks for a
//! chunk, then checks every chunk against the manifest's hash as it arrives. Chunks are written
//! at their final offsets into a staging file in the store (`.NAME.pull`, laid out exactly like
//! the finished image file, holes where chunks are missing), so a pull that stops (killed, the
//! connection dropped, the disk full) continues on the next run: the chunks staged and intact
//! (checked again by hash) are not fetched again. The image is listed only once every chunk is
//! there and verified, published by the same commit as an upload or import.
//!
//! Signature: a pull checked against a trusted key is re-signed with the local store's key and
//! its metadata records the source and the key that signed it there. Each site's agents and
//! deploys trust their own server's key, so a pulled image deploys without every site trusting
//! every other site's key; the provenance stays readable (`images show`). With `--trust-any`
//! nothing vouched for the manifest, so the source's signature (or none) is kept as it came and
//! the image is not deployed until an admin checks it and runs `images sign`.

use crate::store::{Store, StoreError};
use diskcast_proto::image_file::{
    valid_image_name, Footer, ImageFile, FOOTER_LEN, IMAGE_NAME_RULE,
};
use diskcast_proto::read_at::ReadAt;
use diskcast_proto::trust::{PublicKey, Untrusted};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A manifest this large describes a disk far beyond any lab's (2 TiB at 1 MiB chunks is
/// ~80 MiB): a bigger answer is refused, not read into memory.
const MAX_TAIL: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("{url:?} is not a pull URL: give http://HOST:PORT/images/NAME ({why})")]
    Url { url: String, why: &'static str },
    #[error("the local name {0:?} is invalid: give --name with {IMAGE_NAME_RULE}")]
    Name(String),
    #[error("cannot reach {url}: {source} (is the source bootserver running, and its http_port reachable from here? Once it is, the same command continues a pull that stopped)")]
    Unreachable {
        url: String,
        #[source]
        source: ureq::Error,
    },
    #[error("{url}: the connection broke off or stalled mid-answer ({source}); run the same command again to continue: the chunks staged so far are kept")]
    BrokenOff {
        url: String,
        #[source]
        source: ureq::Error,
    },
    #[error("{url}: the answer is longer than the {limit} bytes expected: the source's image is damaged or was tampered with")]
    TooLong { url: String, limit: u64 },
    #[error("{url}: the source has no such image ({body}); `bootserver images list` there shows its images")]
    NotFound { url: String, body: String },
    #[error("{url}: the source refuses reads without its admin token ({body}): give --token (the source's `bootserver token`)")]
    Unauthorised { url: String, body: String },
    #[error("{url}: the source answered {status} ({body})")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: the source's answer is not a sound image manifest: {why}")]
    BadManifest { url: String, why: String },
    #[error("refused before fetching a chunk: the source's image {url} is {why}")]
    Untrusted { url: String, why: String },
    #[error("no key to check the source's signature with: give --trust KEY (the source's `bootserver key show`), or --config whose [security] trusts it, or --trust-any")]
    NoKeys,
    #[error("{url}: chunk {index} does not match the signed manifest ({why}); the source's copy is damaged or was tampered with: nothing was listed, {staged} verified chunks stay staged")]
    BadChunk {
        url: String,
        index: u32,
        why: String,
        staged: u32,
    },
    #[error("another pull into {0} is running (it holds the staging file's lock)")]
    Busy(PathBuf),
    #[error("{path}: {op}{hint}")]
    Io {
        path: PathBuf,
        op: &'static str,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a pull is asked to do.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// `http://HOST:PORT/images/NAME`.
    pub url: String,
    /// The name in the local store (default: the source's).
    pub name: Option<String>,
    /// Keys the source's signature must verify under; empty: the store's trusted keys.
    pub trust: Vec<PublicKey>,
    /// Take an unsigned or unknown signature (kept as it came, not re-signed).
    pub trust_any: bool,
    /// The source's admin token, for a source that closes reads.
    pub token: Option<String>,
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullReport {
    pub name: String,
    pub data_chunks: u32,
    /// Chunks found staged and intact from an earlier run: not fetched again.
    pub already_staged: u32,
    pub fetched: u32,
    pub fetched_bytes: u64,
    pub summary: crate::store::ImageSummary,
    /// The key the source's signature verified under (`None` with `--trust-any`).
    pub source_key: Option<PublicKey>,
    /// Re-signed with the local key (else kept as it came).
    pub resigned: bool,
}

/// Progress, for the caller to show.
#[derive(Debug, Clone, Copy)]
pub enum Progress {
    /// Checked the manifest and the staging file: `staged` of `total` data chunks are there.
    Start {
        total: u32,
        staged: u32,
    },
    Chunk {
        done: u32,
        total: u32,
    },
}

/// The source's base URL (`http://host:port/images/NAME`, no trailing slash) and image name.
pub fn parse_url(url: &str) -> Result<(String, String), PullError> {
    let bad = |why| PullError::Url {
        url: url.into(),
        why,
    };
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        if url.starts_with("https://") {
            bad("https is not spoken: the image is authenticated by its signature and chunk hashes, so plain http is enough")
        } else {
            bad("it must start with http://")
        }
    })?;
    let rest = rest.trim_end_matches('/');
    let (host, path) = rest.split_once('/').ok_or_else(|| bad("no path"))?;
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let name = path
        .strip_prefix("images/")
        .ok_or_else(|| bad("the path must be /images/NAME"))?;
    if !valid_image_name(name) {
        return Err(bad("the image name in it is invalid"));
    }
    Ok((format!("http://{host}/images/{name}"), name.into()))
}

/// Checks a fetched tail as the store checks a file's (footer, CRCs, manifest, hash,
/// metadata); returns the data length and the image as described.
pub fn check_tail(tail: &[u8], url: &str) -> Result<(u64, ImageFile<TailOnly>), String> {
    let footer_at = tail
        .len()
        .checked_sub(FOOTER_LEN)
        .ok_or_else(|| format!("{} bytes, shorter than a footer", tail.len()))?;
    let mut footer = [0u8; FOOTER_LEN];
    footer.copy_from_slice(&tail[footer_at..]);
    let footer = Footer::parse(&footer).map_err(|e| format!("its footer: {e}"))?;
    let data_len = footer.data_len;
    let owned = TailOnly {
        data_len,
        tail: tail.to_vec(),
    };
    let file_len = data_len
        .checked_add(tail.len() as u64)
        .ok_or("its data length overflows")?;
    let image = ImageFile::read(owned, file_len, Path::new(url))
        .map_err(|e| diskcast_proto::error_chain(&e))?;
    Ok((data_len, image))
}

/// The tail fetched from the source, standing in for the whole file while its structure is
/// checked: the chunk region is never read by [`ImageFile::read`].
#[derive(Debug)]
pub struct TailOnly {
    data_len: u64,
    tail: Vec<u8>,
}

impl ReadAt for TailOnly {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let at = offset
            .checked_sub(self.data_len)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        self.tail.read_exact_at(buf, at)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.data_len + self.tail.len() as u64)
    }
}

struct Client {
    agent: ureq::Agent,
    token: Option<String>,
}

impl Client {
    fn new(token: Option<String>) -> Self {
        let config = ureq::Agent::config_builder()
            // Statuses are answers to explain, not transport failures.
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            // A source that stops sending mid-chunk is a dropped connection: fail, resume later.
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_recv_body(Some(Duration::from_secs(120)))
            .max_redirects(0)
            .build();
        Self {
            agent: ureq::Agent::new_with_config(config),
            token,
        }
    }

    /// `GET url`: the body (at most `limit` bytes) and the signer header; statuses as errors.
    fn get(&self, url: &str, limit: u64) -> Result<(Vec<u8>, Option<String>), PullError> {
        let mut request = self.agent.get(url);
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let unreachable = |source| PullError::Unreachable {
            url: url.into(),
            source,
        };
        let mut response = request.call().map_err(unreachable)?;
        let status = response.status().as_u16();
        let signer = response
            .headers()
            .get(crate::web::SIGNER_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        if status != 200 {
            let body = response
                .body_mut()
                .with_config()
                .limit(4096)
                .read_to_string()
                .unwrap_or_default()
                .trim()
                .to_string();
            return Err(match status {
                404 => PullError::NotFound {
                    url: url.into(),
                    body,
                },
                401 | 403 => PullError::Unauthorised {
                    url: url.into(),
                    body,
                },
                _ => PullError::Status {
                    url: url.into(),
                    status,
                    body,
                },
            });
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .map_err(|source| match source {
                ureq::Error::BodyExceedsLimit(_) => PullError::TooLong {
                    url: url.into(),
                    limit,
                },
                source => PullError::BrokenOff {
                    url: url.into(),
                    source,
                },
            })?;
        Ok((body, signer))
    }
}

fn io_err(
    path: &Path,
    op: &'static str,
    hint: &'static str,
) -> impl FnOnce(io::Error) -> PullError {
    let path = path.to_path_buf();
    move |source| PullError::Io {
        path,
        op,
        hint,
        source,
    }
}

/// Says why a signature is not accepted, naming the key the source says signed it.
fn untrusted(why: Untrusted, seen: Option<&str>, expected: &[PublicKey]) -> String {
    let expected = expected
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    match (why, seen) {
        (Untrusted::Unsigned, _) => format!(
            "unsigned (expected a signature by {expected}); --trust-any takes it anyway, unsigned"
        ),
        (Untrusted::UnknownKey, Some(seen)) => format!(
            "signed by {seen} (as the source says), not by a key trusted here (expected {expected}); if that is the source's key (`bootserver key show` there), give --trust {seen}"
        ),
        (Untrusted::UnknownKey, None) => format!(
            "signed by a key the source does not name, not by a key trusted here (expected {expected})"
        ),
    }
}

/// Names of pulls staged in `store` and not finished (their `.NAME.pull` files): the same
/// command continues one; deleting the file abandons it.
pub fn staged_pulls(store: &Store) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store.dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            file.strip_prefix('.')
                .and_then(|f| f.strip_suffix(".pull"))
                .filter(|n| valid_image_name(n))
                .map(String::from)
        })
        .collect();
    names.sort();
    names
}

/// The chunks of `data` that `staged` does not hold intact (decompressed and hashed on every
/// core, as `images verify` does), in order.
fn unmatched_chunks(staged: &ImageFile, data: &[u32]) -> Vec<u32> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per_thread = data.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = data
            .chunks(per_thread)
            .map(|share| {
                scope.spawn(move || {
                    share
                        .iter()
                        .copied()
                        .filter(|&i| staged.raw_chunk(i).is_err())
                        .collect::<Vec<u32>>()
                })
            })
            .collect();
        // A crashed checker's share is fetched again: that costs time, never correctness.
        workers
            .into_iter()
            .zip(data.chunks(per_thread))
            .flat_map(|(w, share)| w.join().unwrap_or_else(|_| share.to_vec()))
            .collect()
    })
}

/// Pulls the image at `opts.url` into `store`.
pub fn pull(
    store: &Store,
    opts: &PullOptions,
    mut progress: impl FnMut(Progress),
) -> Result<PullReport, PullError> {
    let (base, source_name) = parse_url(&opts.url)?;
    let name = opts.name.clone().unwrap_or(source_name);
    if !valid_image_name(&name) {
        return Err(PullError::Name(name));
    }
    store.check_free(&name)?;
    let keys: Vec<PublicKey> = if opts.trust.is_empty() {
        store.trusted().to_vec()
    } else {
        opts.trust.clone()
    };
    if keys.is_empty() && !opts.trust_any {
        return Err(PullError::NoKeys);
    }
    let client = Client::new(opts.token.clone());
    let manifest_url = format!("{base}/manifest");
    let (tail, seen) = client.get(&manifest_url, MAX_TAIL)?;
    let (data_len, described) =
        check_tail(&tail, &manifest_url).map_err(|why| PullError::BadManifest {
            url: manifest_url.clone(),
            why,
        })?;
    let manifest = &described.manifest;
    let source_key = if opts.trust_any {
        None
    } else {
        let key = diskcast_proto::trust::manifest_signer(manifest, &keys).map_err(|why| {
            PullError::Untrusted {
                url: base.clone(),
                why: untrusted(why, seen.as_deref(), &keys),
            }
        })?;
        Some(key)
    };

    // The staging file: the finished file's layout, chunks filled in as they arrive.
    let staging = store.dir().join(format!(".{name}.pull"));
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&staging)
        .map_err(io_err(&staging, "opening the staging file", ""))?;
    let file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| PullError::Busy(staging.clone()))?;
    let file_len = data_len + tail.len() as u64;
    let staged_len = file.metadata().map_or(0, |m| m.len());
    let mut existing_tail = vec![0u8; tail.len()];
    let same_tail = staged_len == file_len
        && FileExt::read_exact_at(&*file, &mut existing_tail, data_len).is_ok()
        && existing_tail == tail;
    if !same_tail {
        if staged_len > 0 {
            // Re-signed or changed at the source since, or broken off before its manifest was
            // written: the staged chunks are checked against this manifest all the same.
            log::info!(
                "{}: staged with another manifest: keeping only the chunks that match this one",
                staging.display()
            );
        }
        let full = "; the store's disk may be full: free space, and run the same command again";
        file.set_len(data_len)
            .map_err(io_err(&staging, "sizing the staging file", full))?;
        file.write_all_at(&tail, data_len)
            .and_then(|()| file.sync_all())
            .map_err(io_err(&staging, "writing the manifest", full))?;
    }
    let staged_file = file
        .try_clone()
        .map_err(io_err(&staging, "opening the staging file", ""))?;
    let staged = ImageFile::read(staged_file, file_len, &staging).map_err(StoreError::Rejected)?;
    let data: Vec<u32> = manifest.data_chunks().collect();
    let total = data.len() as u32;
    // What an earlier run left: intact chunks stay (each checked again by its hash).
    let missing: Vec<u32> = if staged_len > 0 {
        unmatched_chunks(&staged, &data)
    } else {
        data.clone()
    };
    let already = total - missing.len() as u32;
    // Where the finished file holds each chunk: after the stored chunks before it.
    let mut offsets = vec![0u64; manifest.chunks.len()];
    let mut at = 0u64;
    for &index in &data {
        offsets[index as usize] = at;
        at += manifest.wire_len(index) as u64;
    }
    progress(Progress::Start {
        total,
        staged: already,
    });
    let mut fetched_bytes = 0u64;
    for (n, &index) in missing.iter().enumerate() {
        let wire_len = manifest.wire_len(index) as u64;
        let url = format!("{base}/chunks/{index}");
        // One byte over, so a longer answer shows as a length mismatch, not a cut.
        let (bytes, _) = client.get(&url, wire_len + 1)?;
        let (_, raw_len) = manifest.chunk_range(index);
        let staged_so_far = already + n as u32;
        let bad = |why: String| PullError::BadChunk {
            url: base.clone(),
            index,
            why,
            staged: staged_so_far,
        };
        if bytes.len() as u64 != wire_len {
            return Err(bad(format!(
                "{} bytes, the manifest says {wire_len}",
                bytes.len()
            )));
        }
        diskcast_proto::codec::decode(index, &manifest.chunks[index as usize], &bytes, raw_len)
            .map_err(|e| bad(e.to_string()))?;
        file.write_all_at(&bytes, offsets[index as usize]).map_err(io_err(
            &staging,
            "writing a chunk",
            "; if the store's disk is full, free space and run the same command again: the chunks staged so far are kept",
        ))?;
        fetched_bytes += wire_len;
        progress(Progress::Chunk {
            done: staged_so_far + 1,
            total,
        });
    }
    file.sync_all()
        .map_err(io_err(&staging, "syncing the staging file", ""))?;
    drop(staged);

    let resign = source_key.map(|key| {
        let mut meta = described.metadata.clone();
        meta.origin = format!(
            "pull of {base} (was {}, signed by {})",
            if meta.origin.is_empty() {
                "?"
            } else {
                &meta.origin
            },
            key.short()
        );
        meta
    });
    let resigned = resign.is_some() && store.signer().is_some();
    let summary = store.adopt_staged(&name, &staging, resign)?.commit()?;
    // Held until published, so another pull of the name cannot take the staging file meanwhile.
    drop(file);
    Ok(PullReport {
        name,
        data_chunks: total,
        already_staged: already,
        fetched: missing.len() as u32,
        fetched_bytes,
        summary,
        source_key,
        resigned,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskcast_proto::trust::SigningKey;
    use std::fs;

    fn raw_disk(size: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        let mut raw = vec![0u8; size];
        for (i, block) in raw.chunks_mut(256 << 10).enumerate() {
            if i % 5 != 0 {
                block.iter_mut().for_each(|b| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                    *b = (state >> 33) as u8
                });
            }
        }
        raw
    }

    fn local_store(tag: &str, seed: u8) -> Store {
        let dir = std::env::temp_dir().join(format!("diskcast-pull-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        Store::open(&dir)
            .unwrap()
            .with_signer(SigningKey::from_seed([seed; 32]))
    }

    fn opts(url: String, trust: Vec<PublicKey>) -> PullOptions {
        PullOptions {
            url,
            name: None,
            trust,
            trust_any: false,
            token: None,
        }
    }

    fn exported(store: &Store, name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        store.export_to(name, &mut out).unwrap();
        out
    }

    fn staging_files(store: &Store) -> usize {
        fs::read_dir(store.dir())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".pull"))
            .count()
    }

    #[test]
    fn urls_are_checked_before_anything_is_asked() {
        assert_eq!(
            parse_url("http://10.0.0.1:8080/images/golden/").unwrap(),
            ("http://10.0.0.1:8080/images/golden".into(), "golden".into())
        );
        for bad in [
            "https://h/images/a",
            "ftp://h/images/a",
            "http:///images/a",
            "http://h/a",
            "http://h/images/../x",
            "http://h",
        ] {
            assert!(
                matches!(parse_url(bad), Err(PullError::Url { .. })),
                "{bad}"
            );
        }
        assert!(check_tail(b"short", "x").is_err());
    }

    #[test]
    fn a_pulled_image_verifies_exports_the_same_bytes_and_is_re_signed() {
        let (addr, lab, _) = crate::testing::web_server("pull-ok", "");
        let raw = raw_disk(6 << 20, 1);
        lab.store
            .import("golden", &mut &raw[..], "test", 3)
            .unwrap();
        let source_key = lab.store.signer().unwrap().public();
        let local = local_store("ok", 7);
        let url = format!("http://{addr}/images/golden");

        // The wrong key: refused before any chunk, nothing staged, both keys named.
        let stranger = SigningKey::from_seed([9; 32]).public();
        let err = pull(&local, &opts(url.clone(), vec![stranger]), |_| {}).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, PullError::Untrusted { .. }), "{text}");
        assert!(
            text.contains(&source_key.to_string()) && text.contains(&stranger.to_string()),
            "{text}"
        );
        assert_eq!(staging_files(&local), 0);
        // No key at all: said so.
        let keyless = Store::open(&local.dir().join("keyless")).unwrap();
        assert!(matches!(
            pull(&keyless, &opts(url.clone(), vec![]), |_| {}),
            Err(PullError::NoKeys)
        ));

        let report = pull(&local, &opts(url.clone(), vec![source_key]), |_| {}).unwrap();
        assert_eq!(report.fetched, report.data_chunks);
        assert_eq!(report.already_staged, 0);
        assert!(report.resigned);
        let (_, signature) = local.verify("golden").unwrap();
        assert_eq!(
            signature,
            crate::store::Signature::By(local.signer().unwrap().public())
        );
        assert!(exported(&local, "golden") == raw);
        let (_, image) = local.show("golden").unwrap();
        assert!(
            image.metadata.origin.contains(&url),
            "{}",
            image.metadata.origin
        );
        assert!(image.metadata.origin.contains(&source_key.short()));
        assert_eq!(staging_files(&local), 0);
        // Again: the name is taken.
        assert!(matches!(
            pull(&local, &opts(url.clone(), vec![source_key]), |_| {}),
            Err(PullError::Store(StoreError::Exists { .. }))
        ));
        // Under another name, with --trust-any: kept as it came (the source's signature).
        let mut any = opts(url.clone(), vec![]);
        any.trust_any = true;
        any.name = Some("copy".into());
        let report = pull(&local, &any, |_| {}).unwrap();
        assert!(!report.resigned);
        let copy = local.open_image("copy").unwrap();
        assert_eq!(
            diskcast_proto::trust::manifest_signer(&copy.manifest, &[source_key]),
            Ok(source_key)
        );

        // A missing image, a closed port.
        let err = pull(
            &local,
            &opts(format!("http://{addr}/images/nothing"), vec![source_key]),
            |_| {},
        )
        .unwrap_err();
        assert!(matches!(err, PullError::NotFound { .. }), "{err}");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let mut unreachable = opts(
            format!("http://127.0.0.1:{port}/images/golden"),
            vec![source_key],
        );
        unreachable.name = Some("other".into());
        let err = pull(&local, &unreachable, |_| {}).unwrap_err();
        assert!(matches!(err, PullError::Unreachable { .. }), "{err}");
    }

    #[test]
    fn a_tampered_chunk_fails_lists_nothing_and_the_next_run_resumes() {
        let (addr, lab, _) = crate::testing::web_server("pull-tamper", "");
        let raw = raw_disk(6 << 20, 2);
        lab.store
            .import("golden", &mut &raw[..], "test", 3)
            .unwrap();
        let source_key = lab.store.signer().unwrap().public();
        let path = lab.store.dir().join("golden.dcimg");
        let good = fs::read(&path).unwrap();
        let image = lab.store.open_image("golden").unwrap();
        let data: Vec<u32> = image.manifest.data_chunks().collect();
        assert!(data.len() >= 4);
        // Flip a byte in the third stored chunk.
        let third_at: usize = data[..2].iter().map(|&i| image.manifest.wire_len(i)).sum();
        let mut bad = good.clone();
        bad[third_at + 10] ^= 0x20;
        fs::write(&path, &bad).unwrap();

        let local = local_store("tamper", 8);
        let url = format!("http://{addr}/images/golden");
        let err = pull(&local, &opts(url.clone(), vec![source_key]), |_| {}).unwrap_err();
        assert!(
            matches!(err, PullError::BadChunk { index, staged: 2, .. } if index == data[2]),
            "{err}"
        );
        assert!(local.list().unwrap().is_empty(), "a half image was listed");
        assert_eq!(staging_files(&local), 1);
        assert_eq!(staged_pulls(&local), vec!["golden".to_string()]);

        // Repaired at the source by importing the disk again (another description, so another
        // manifest tail): the two chunks staged still match and are not fetched again.
        lab.store.delete("golden").unwrap();
        lab.store
            .import("golden", &mut &raw[..], "imported again", 3)
            .unwrap();
        assert!(fs::read(&path).unwrap() != good);
        let mut starts = Vec::new();
        let report = pull(&local, &opts(url.clone(), vec![source_key]), |p| {
            if let Progress::Start { staged, .. } = p {
                starts.push(staged);
            }
        })
        .unwrap();
        assert_eq!(starts, vec![2]);
        assert_eq!(report.already_staged, 2);
        assert_eq!(report.fetched, report.data_chunks - 2);
        assert!(exported(&local, "golden") == raw);
        local.verify("golden").unwrap();

        // A forged manifest (CRCs and hash recomputed, signature gone): refused as unsigned.
        let mut forged = image.manifest.clone();
        forged.signature.clear();
        let data_len = forged.stored_bytes();
        let mut bytes = good[..data_len as usize].to_vec();
        diskcast_proto::image_file::write_tail(&mut bytes, &forged, &image.metadata, data_len)
            .unwrap();
        fs::write(&path, &bytes).unwrap();
        let mut again = opts(url.clone(), vec![source_key]);
        again.name = Some("forged".into());
        let err = pull(&local, &again, |_| {}).unwrap_err();
        assert!(err.to_string().contains("unsigned"), "{err}");
        // A manifest damaged in transit (or on the source's disk): not sound.
        let mut broken = good.clone();
        let len = broken.len();
        broken[len - FOOTER_LEN - 5] ^= 1;
        fs::write(&path, &broken).unwrap();
        // The source refuses to serve it (its own check); the puller checks as well.
        let err = pull(&local, &again, |_| {}).unwrap_err();
        assert!(
            matches!(err, PullError::Status { status: 500, .. }),
            "{err}"
        );
        let tail = &broken[data_len as usize..];
        assert!(check_tail(tail, "x").unwrap_err().contains("CRC"));
        assert!(check_tail(&good[data_len as usize..], "x").is_ok());
        assert_eq!(local.list().unwrap().len(), 1);
    }

    #[test]
    fn two_pulls_of_one_name_do_not_interleave() {
        let (addr, lab, _) = crate::testing::web_server("pull-busy", "");
        let raw = raw_disk(2 << 20, 4);
        lab.store
            .import("golden", &mut &raw[..], "test", 3)
            .unwrap();
        let source_key = lab.store.signer().unwrap().public();
        let local = local_store("busy", 5);
        let staging = File::create(local.dir().join(".golden.pull")).unwrap();
        let held = nix::fcntl::Flock::lock(staging, nix::fcntl::FlockArg::LockExclusive).unwrap();
        let url = format!("http://{addr}/images/golden");
        let err = pull(&local, &opts(url.clone(), vec![source_key]), |_| {}).unwrap_err();
        assert!(matches!(err, PullError::Busy(_)), "{err}");
        drop(held);
        // The other one gone (its empty staging file left): this one runs.
        pull(&local, &opts(url, vec![source_key]), |_| {}).unwrap();
        assert!(exported(&local, "golden") == raw);
    }

    #[test]
    fn a_full_disk_is_named_and_a_closed_source_needs_its_token() {
        let (addr, lab, token) =
            crate::testing::web_server("pull-closed", "\n[security]\npublic_reads = false\n");
        let raw = raw_disk(4 << 20, 3);
        lab.store
            .import("golden", &mut &raw[..], "test", 1)
            .unwrap();
        let source_key = lab.store.signer().unwrap().public();
        let url = format!("http://{addr}/images/golden");
        let disk = crate::testing::TinyFs::mount("pull-full", "1m");
        let small = Store::open(disk.path())
            .unwrap()
            .with_signer(SigningKey::from_seed([3; 32]));
        let err = pull(&small, &opts(url.clone(), vec![source_key]), |_| {}).unwrap_err();
        assert!(matches!(err, PullError::Unauthorised { .. }), "{err}");
        let mut with_token = opts(url.clone(), vec![source_key]);
        with_token.token = Some(token);
        let err = pull(&small, &with_token, |_| {}).unwrap_err();
        let text = diskcast_proto::error_chain(&err);
        assert!(
            text.contains("disk is full") || text.contains("space"),
            "{text}"
        );
        assert!(small.list().unwrap().is_empty());
    }
}
