//! What the bootserver answers over HTTP: the kernel and initramfs, each machine's iPXE script,
//! `/status`, and image uploads into the store (`PUT /images/NAME`, what a capture sends).

use crate::dhcp_server::DhcpServer;
use crate::http::{ClientAddr, ServerAddr};
use crate::ipxe::INITRD_NAME;
use crate::lab::Lab;
use crate::store::{ImageSummary, Store, StoreError};
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Extension, Router};
use diskcast_proto::image_file::ImageFileError;
use diskcast_proto::mac::MacAddr;
use http_body_util::BodyExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tower_http::services::ServeFile;

/// What the routes need.
#[derive(Debug)]
pub struct WebState {
    pub lab: Arc<Lab>,
    pub dhcp: Arc<Mutex<DhcpServer>>,
    pub tftp: Arc<crate::tftp::TftpStats>,
    /// Authorises any upload (`agent capture --token` by hand).
    pub admin_token: Arc<str>,
    /// Capture tasks whose token has been used for an upload: each authorises one.
    pub used_capture_tokens: Mutex<std::collections::HashSet<i64>>,
}

impl WebState {
    pub fn new(
        lab: Arc<Lab>,
        dhcp: Arc<Mutex<DhcpServer>>,
        tftp: Arc<crate::tftp::TftpStats>,
        admin_token: Arc<str>,
    ) -> Self {
        Self {
            lab,
            dhcp,
            tftp,
            admin_token,
            used_capture_tokens: Mutex::default(),
        }
    }
}

/// A capture pauses while it reads a region of zeros: an upload may be silent this long.
const UPLOAD_IDLE: Duration = Duration::from_secs(300);

pub fn router(state: Arc<WebState>, api: crate::api::ApiState) -> Router {
    let boot = &state.lab.config.boot;
    Router::new()
        .route_service("/boot/vmlinuz", ServeFile::new(&boot.kernel))
        .route_service(
            &format!("/boot/{INITRD_NAME}"),
            ServeFile::new(&boot.initramfs),
        )
        .route_service("/boot/localboot.efi", ServeFile::new(&boot.local_boot_efi))
        // UEFI HTTP boot clients fetch iPXE itself over HTTP (no TFTP at all).
        .route_service(
            "/boot/snponly.efi",
            ServeFile::new(boot.tftp_root.join("snponly.efi")),
        )
        .route_service(
            "/boot/ipxe.efi",
            ServeFile::new(boot.tftp_root.join("ipxe.efi")),
        )
        .route("/boot/{script}", get(script))
        .route("/status", get(status))
        .route("/images/{name}", put(upload))
        .route("/images/{name}/manifest", get(image_tail))
        .route("/images/{name}/chunks/{index}", get(image_chunk))
        .with_state(state)
        .merge(crate::api::router(api.clone()))
        .merge(crate::console::router(api.clone()))
        .layer(axum::middleware::from_fn_with_state(
            api,
            crate::console::read_access,
        ))
        .layer(axum::middleware::from_fn(log_request))
}

/// One log line per request: client, method, path, status.
async fn log_request(
    Extension(ClientAddr(client)): Extension<ClientAddr>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let response = next.run(request).await;
    log::info!(
        "http: {} {method} {path} {}",
        client.ip(),
        response.status().as_u16()
    );
    response
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    let mut body = body.into();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    (status, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

/// `GET /boot/MAC.ipxe`: the agent for the machine's open task, or its local disk, pointing at
/// the server's address the machine reached.
async fn script(
    State(state): State<Arc<WebState>>,
    Extension(ServerAddr(local)): Extension<ServerAddr>,
    Path(file): Path<String>,
) -> Response {
    let Some(mac) = file
        .strip_suffix(".ipxe")
        .and_then(|m| m.parse::<MacAddr>().ok())
    else {
        return text(StatusCode::NOT_FOUND, "not found");
    };
    let lab = Arc::clone(&state.lab);
    let server = match local.ip() {
        std::net::IpAddr::V4(ip) if !ip.is_unspecified() => ip,
        _ => lab.server_ip,
    };
    let script =
        tokio::task::spawn_blocking(move || lab.boot_script_at(mac, crate::unix_now(), server))
            .await;
    match script {
        Ok(Ok(script)) => text(StatusCode::OK, script),
        Ok(Err(e)) => {
            log::error!(
                "lab: no boot script for {mac}: {}",
                diskcast_proto::error_chain(&e)
            );
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no boot script: the server's log says why",
            )
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The first 16 hex digits of an image hash, as `images list` shows them.
pub fn short_hash(hash: &[u8; 32]) -> String {
    hash[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// `GET /status`: leases, DHCP counters, stored images, served deploys.
async fn status(State(state): State<Arc<WebState>>) -> Response {
    // Copy what DHCP knows and let go of its lock before touching the disk: listing a large
    // store must not delay a single DHCP answer.
    let dhcp = match state.dhcp.lock() {
        Ok(dhcp) => serde_json::json!({
            "mode": format!("{:?}", dhcp.settings().mode).to_lowercase(),
            "leases": dhcp.leases.leases,
            "dhcp": {
                "offers": dhcp.stats.offers, "acks": dhcp.stats.acks, "naks": dhcp.stats.naks,
                "malformed": dhcp.stats.malformed, "ignored": dhcp.stats.ignored,
                "unknown_relay": dhcp.stats.unknown_relay,
            },
        }),
        Err(_) => serde_json::json!({ "error": "the DHCP server crashed" }),
    };
    let listing = {
        let store = state.lab.store.clone();
        tokio::task::spawn_blocking(move || store.list())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    };
    let images: Vec<serde_json::Value> = listing
        .into_iter()
        .map(|entry| match entry {
            Ok(i) => serde_json::json!({
                "name": i.name, "disk_bytes": i.raw_size, "data_bytes": i.data_bytes,
                "stored_bytes": i.stored_bytes, "created": i.created,
                "hash": short_hash(&i.image_hash), "origin": i.origin,
            }),
            Err(e) => serde_json::json!({ "error": public_reason(&e) }),
        })
        .collect();
    let mut body = dhcp;
    body["tftp"] = serde_json::to_value(state.tftp.snapshot()).unwrap_or_default();
    body["images"] = serde_json::Value::Array(images);
    body["sessions"] = serde_json::to_value(state.lab.sessions.views()).unwrap_or_default();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body:#}\n"),
    )
        .into_response()
}

/// What a store problem may tell a client: no server paths, no process ids (the log has them).
pub fn public_reason(e: &StoreError) -> String {
    let image = |e: &ImageFileError| match e {
        ImageFileError::Io { op, source, .. } => format!("{op}: {source}"),
        ImageFileError::NotAnImage { why, .. } => format!("not a diskcast image file ({why})"),
        ImageFileError::Version { version, .. } => {
            format!("image file version {version} is not supported")
        }
        ImageFileError::Damaged { what, why, .. } => format!("{what} is damaged ({why})"),
        ImageFileError::Manifest { source, .. } => format!("bad manifest: {source}"),
        ImageFileError::Chunk { offset, source, .. } => {
            format!("the chunk at image offset {offset} is damaged: {source}")
        }
    };
    match e {
        StoreError::Name(_) => e.to_string(),
        StoreError::Exists { name, .. } => {
            format!("image {name:?} already exists: delete it first or choose another name")
        }
        StoreError::NotFound { name, .. } => format!("no image {name:?}"),
        StoreError::Io { op, source, .. } => format!("the store failed {op}: {source}"),
        StoreError::Rejected(inner) => format!(
            "the uploaded image is incomplete or damaged; nothing was stored ({})",
            image(inner)
        ),
        StoreError::Image(inner) => image(inner),
        // Command-line work only; said without paths all the same.
        StoreError::EmptySource { .. } => "the source is empty".into(),
        StoreError::ReadSource { source, .. } => format!("reading the source: {source}"),
        StoreError::ExportOntoItself { name, .. } => {
            format!("exporting {name:?} onto itself is refused")
        }
        StoreError::TargetExists { .. } => "the export target exists".into(),
        StoreError::Untrusted { name, why } => format!("image {name:?} {why}"),
        StoreError::NoKeys { name } => format!("no key to check image {name:?}"),
    }
}

/// The header naming the key that signed a served manifest (one this server trusts), so a
/// puller that does not trust it can say which key it saw.
pub const SIGNER_HEADER: &str = "diskcast-signer";

/// A store read for a puller, off the async threads; a missing image is a 404.
async fn store_read<T: Send + 'static>(
    state: &Arc<WebState>,
    read: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Response> {
    let lab = Arc::clone(&state.lab);
    match tokio::task::spawn_blocking(move || read(&lab.store)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e @ StoreError::NotFound { .. })) => {
            Err(text(StatusCode::NOT_FOUND, public_reason(&e)))
        }
        Ok(Err(e)) => {
            log::warn!("http: serving a pull: {}", diskcast_proto::error_chain(&e));
            Err(store_refusal(&e))
        }
        Err(_) => Err(text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "reading the store crashed",
        )),
    }
}

/// `GET /images/NAME/manifest`: the image file's tail (signed manifest, metadata, footer), what
/// `bootserver images pull` checks before it fetches a chunk. Reads are open or closed as
/// `[security] public_reads` says, like the API's.
async fn image_tail(State(state): State<Arc<WebState>>, Path(name): Path<String>) -> Response {
    match store_read(&state, move |store| store.tail(&name)).await {
        Ok((tail, signature)) => {
            let mut response = (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/octet-stream")],
                tail,
            )
                .into_response();
            if let crate::store::Signature::By(key) = signature {
                if let Ok(value) = header::HeaderValue::from_str(&key.to_string()) {
                    response.headers_mut().insert(SIGNER_HEADER, value);
                }
            }
            response
        }
        Err(response) => response,
    }
}

/// `GET /images/NAME/chunks/INDEX`: data chunk INDEX's stored bytes, unchecked (the puller
/// checks each against the signed manifest's hash); 404 for a chunk that is not stored.
async fn image_chunk(
    State(state): State<Arc<WebState>>,
    Path((name, index)): Path<(String, u32)>,
) -> Response {
    let what = format!("image {name:?} stores no chunk {index} (zero, unused or past its end)");
    match store_read(&state, move |store| store.stored_chunk(&name, index)).await {
        Ok(Some(bytes)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/octet-stream")],
            bytes,
        )
            .into_response(),
        Ok(None) => text(StatusCode::NOT_FOUND, what),
        Err(response) => response,
    }
}

/// How a refusal of the store is answered.
fn store_refusal(e: &StoreError) -> Response {
    let status = match e {
        StoreError::Exists { .. } => StatusCode::CONFLICT,
        StoreError::Name(_) | StoreError::Rejected(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    text(status, public_reason(e))
}

/// What the network side hands the thread that writes the store.
enum Piece {
    Data(Bytes),
    /// The body ended properly: commit.
    End,
}

/// Why an upload did not end stored.
enum UploadEnd {
    Stored(ImageSummary),
    /// The store refused or failed; nothing stored.
    Store(StoreError),
    /// Writing the store failed (its disk is full...): nothing stored.
    Write(std::io::Error),
    /// The body did not end properly.
    BrokenOff,
}

/// The `Authorization: Bearer TOKEN` of a request, if any.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Who may upload image `name`: the admin token, or the token of the open capture task for
/// exactly that name, once. A used capture token is spent even if its upload then fails (the
/// machine's next boot brings a new one). `Ok`: who authorised it; `Err`: why not.
async fn authorise_upload(
    state: &Arc<WebState>,
    headers: &axum::http::HeaderMap,
    name: &str,
) -> Result<String, String> {
    let refuse = |why: &str| Err(why.to_string());
    let Some(given) = bearer(headers) else {
        return refuse(
            "uploads need a token: the capture task's (its agent has it) or the admin token              (`bootserver token`), as `Authorization: Bearer TOKEN`; nothing was stored",
        );
    };
    if crate::lab::same_secret(given, &state.admin_token) {
        return Ok("the admin token".into());
    }
    let lab = Arc::clone(&state.lab);
    let token = given.to_string();
    let task = tokio::task::spawn_blocking(move || lab.registry.task_by_token(&token))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
    let Some(task) = task.filter(|t| t.state.is_open()) else {
        return refuse(
            "the token is not the admin token nor an open capture task's; nothing was stored",
        );
    };
    match &task.kind {
        diskcast_registry::TaskKind::Capture { image } if image == name => {}
        _ => {
            return refuse(&format!(
                "task {}'s token does not authorise an upload of {name:?}; nothing was stored",
                task.id
            ))
        }
    }
    let first_use = state
        .used_capture_tokens
        .lock()
        .is_ok_and(|mut used| used.insert(task.id));
    if !first_use {
        return refuse(&format!(
            "task {}'s token was used for an upload already: each capture task uploads once; nothing was stored",
            task.id
        ));
    }
    Ok(format!("capture task {} of {}", task.id, task.mac))
}

/// `PUT /images/NAME`: a capture. The image is listed only once complete and verified. The
/// token and the name are checked before a byte of the body is asked for, so a client that
/// sent `Expect: 100-continue` learns of a refusal before it reads its disk, and no upload
/// without a token takes a byte of the store's disk.
async fn upload(
    State(state): State<Arc<WebState>>,
    Path(name): Path<String>,
    Extension(ClientAddr(client)): Extension<ClientAddr>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Response {
    if let Err(e) = state.lab.store.check_free(&name) {
        if !matches!(e, StoreError::Exists { .. }) {
            return store_refusal(&e);
        }
    }
    let who = match authorise_upload(&state, &headers, &name).await {
        Ok(who) => who,
        Err(why) => {
            log::warn!("store: upload of {name:?} from {client} refused: no valid token");
            return text(StatusCode::UNAUTHORIZED, why);
        }
    };
    if let Err(e) = state.lab.store.check_free(&name) {
        return store_refusal(&e);
    }
    log::info!("store: {who} authorises the upload of {name:?} from {client}");
    log::info!("store: receiving image {name:?} from {client}");
    let started = Instant::now();
    let (tx, rx) = tokio::sync::mpsc::channel::<Piece>(8);
    let store = state.lab.store.clone();
    let image = name.clone();
    let writer = tokio::task::spawn_blocking(move || write_upload(&store, &image, rx));
    let mut body = body;
    let network_problem = loop {
        let frame = match tokio::time::timeout(UPLOAD_IDLE, body.frame()).await {
            Err(_) => break Some(format!("silent for {} s", UPLOAD_IDLE.as_secs())),
            Ok(None) => {
                let _ = tx.send(Piece::End).await;
                break None;
            }
            Ok(Some(Err(e))) => break Some(e.to_string()),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if tx.send(Piece::Data(data)).await.is_err() {
                // The writer stopped (the store failed): its result says why.
                break None;
            }
        }
    };
    drop(tx);
    let end = writer.await.unwrap_or_else(|e| {
        UploadEnd::Write(std::io::Error::other(format!(
            "the store writer crashed: {e}"
        )))
    });
    match (end, network_problem) {
        (UploadEnd::Stored(summary), _) => {
            let line = format!(
                "stored image {name}: {}, hash {}, in {:.1} s",
                summary.sizes(),
                short_hash(&summary.image_hash),
                started.elapsed().as_secs_f64()
            );
            log::info!("store: {line}");
            text(StatusCode::CREATED, line)
        }
        (UploadEnd::Write(e), _) => {
            log::error!(
                "store: writing image {name:?} into {}: {e}; nothing stored",
                state.lab.store.dir().display()
            );
            text(
                StatusCode::INSUFFICIENT_STORAGE,
                format!("the image store could not write the image ({e}); nothing was stored"),
            )
        }
        (UploadEnd::Store(e), _) => {
            log::warn!(
                "store: image {name:?} from {client} refused: {}",
                diskcast_proto::error_chain(&e)
            );
            store_refusal(&e)
        }
        (UploadEnd::BrokenOff, problem) => {
            let why = problem.unwrap_or_else(|| "the body ended early".into());
            log::warn!("store: upload of {name:?} from {client} broke off: {why}; nothing stored");
            text(
                StatusCode::BAD_REQUEST,
                format!("the upload broke off ({why}); nothing was stored"),
            )
        }
    }
}

/// The store side of an upload, on a blocking thread: writes what arrives, commits at the end.
fn write_upload(
    store: &Store,
    name: &str,
    mut rx: tokio::sync::mpsc::Receiver<Piece>,
) -> UploadEnd {
    let mut incoming = match store.incoming(name) {
        Ok(incoming) => incoming,
        Err(e) => return UploadEnd::Store(e),
    };
    loop {
        match rx.blocking_recv() {
            Some(Piece::Data(bytes)) => {
                if let Err(e) = std::io::Write::write_all(&mut incoming.file, &bytes) {
                    return UploadEnd::Write(e);
                }
            }
            Some(Piece::End) => break,
            // Dropped without an end: the upload broke off; `incoming` removes its file.
            None => return UploadEnd::BrokenOff,
        }
    }
    match incoming.commit() {
        Ok(summary) => UploadEnd::Stored(summary),
        Err(StoreError::Io { source, .. }) => UploadEnd::Write(source),
        Err(e) => UploadEnd::Store(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::tests::exchange_from;
    use diskcast_proto::image_file::{ImageWriter, Metadata};
    use std::io::{Read, Write};

    /// A server with a store in a fresh directory; returns its address and the store.
    fn server(tag: &str) -> (SocketAddr, Store) {
        let (addr, lab, token) = crate::testing::web_server(tag, "");
        ADMIN.with(|a| *a.borrow_mut() = token);
        (addr, lab.store.clone())
    }

    thread_local! {
        /// The admin token of the server this test thread started.
        static ADMIN: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }

    fn admin_header() -> String {
        ADMIN.with(|a| format!("Authorization: Bearer {}\r\n", a.borrow()))
    }

    use std::net::SocketAddr;

    /// A small valid image file, as a capture would upload it.
    fn image_bytes() -> Vec<u8> {
        let mut raw = vec![0u8; 3 << 20];
        raw[..1 << 20].fill(0x5a);
        let mut writer = ImageWriter::new(Vec::new(), 1 << 20);
        writer.push_all(&mut &raw[..], 3, |_| {}).unwrap();
        writer.finish(&Metadata::new("capture", 3, 1)).unwrap().1
    }

    fn chunked(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in body.chunks(7000) {
            out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            out.extend_from_slice(piece);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    /// `PUT /images/NAME` with the admin token.
    fn put(addr: SocketAddr, name: &str, headers: &str, body: &[u8]) -> String {
        put_as(addr, name, &format!("{}{headers}", admin_header()), body)
    }

    fn put_as(addr: SocketAddr, name: &str, headers: &str, body: &[u8]) -> String {
        let request = [
            format!("PUT /images/{name} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n")
                .as_bytes(),
            body,
        ]
        .concat();
        exchange_from([127, 0, 0, 1], addr, &request)
    }

    #[test]
    fn unsigned_upload_refused() {
        let (addr, lab, admin) = crate::testing::web_server("upload-token", "");
        let image = image_bytes();
        let body = chunked(&image);
        let chunked_header = "Transfer-Encoding: chunked\r\n";
        let store_files = || std::fs::read_dir(lab.store.dir()).unwrap().count();
        // No token, a wrong one, an admin token cut short: 401, and not a byte on the disk.
        for auth in [
            String::new(),
            "Authorization: Bearer nope\r\n".to_string(),
            format!("Authorization: Bearer {}\r\n", &admin[1..]),
            format!("Authorization: Basic {admin}\r\n"),
        ] {
            let answer = put_as(addr, "golden", &format!("{auth}{chunked_header}"), &body);
            assert!(answer.starts_with("HTTP/1.1 401"), "{auth:?}: {answer}");
            assert!(answer.contains("nothing was stored"), "{answer}");
            assert!(!answer.contains(&admin), "the token is echoed: {answer}");
        }
        // With Expect: the refusal comes before the client sends its body.
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .write_all(b"PUT /images/golden HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
            .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut first = [0u8; 64];
        let n = stream.read(&mut first).unwrap();
        assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 401"));
        drop(stream);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(store_files(), 0, "a refused upload left a file");

        // A capture task's token authorises its image name, once.
        let pc: diskcast_proto::mac::MacAddr = "52:54:00:00:00:31".parse().unwrap();
        let request = crate::lab::tasks::TaskRequest {
            kind: "capture".into(),
            image: Some("golden".into()),
            to: pc.to_string(),
            options: Default::default(),
            wake: false,
            timeout: None,
            relays: Vec::new(),
        };
        lab.create_tasks(&request, 100).unwrap();
        let script = lab.boot_script(pc, 101).unwrap();
        let line = script.lines().find(|l| l.starts_with("kernel ")).unwrap();
        let task_token = diskcast_proto::cmdline::BootConfig::parse(line)
            .unwrap()
            .task
            .unwrap()
            .token;
        let with_task = format!("Authorization: Bearer {task_token}\r\n{chunked_header}");
        let other_name = put_as(addr, "other", &with_task, &body);
        assert!(other_name.starts_with("HTTP/1.1 401"), "{other_name}");
        assert!(other_name.contains("does not authorise"), "{other_name}");
        let stored = put_as(addr, "golden", &with_task, &body);
        assert!(stored.starts_with("HTTP/1.1 201"), "{stored}");
        let (_, signature) = lab.store.verify("golden").unwrap();
        assert_eq!(signature, crate::store::Signature::By(lab.key.public()));
        // Spent: the same token again is refused, whatever the name.
        lab.store.delete("golden").unwrap();
        let again = put_as(addr, "golden", &with_task, &body);
        assert!(again.starts_with("HTTP/1.1 401"), "{again}");
        assert!(again.contains("used for an upload already"), "{again}");
        assert_eq!(store_files(), 0);
    }

    #[test]
    fn pulls_get_the_signed_tail_and_stored_chunks_only() {
        let (addr, lab, admin) =
            crate::testing::web_server("pull-reads", "\n[security]\npublic_reads = false\n");
        // A data chunk, a zero chunk, a data chunk.
        let mut raw = vec![7u8; 3 << 20];
        raw[1 << 20..2 << 20].fill(0);
        lab.store
            .import("golden", &mut &raw[..], "test", 3)
            .unwrap();
        let get = |path: &str, auth: bool| {
            let auth = if auth {
                format!("Authorization: Bearer {admin}\r\n")
            } else {
                String::new()
            };
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n");
            exchange_from([127, 0, 0, 1], addr, request.as_bytes())
        };
        // Closed reads close these too.
        for path in ["/images/golden/manifest", "/images/golden/chunks/0"] {
            assert!(get(path, false).starts_with("HTTP/1.1 401"), "{path}");
        }
        let tail = get("/images/golden/manifest", true);
        assert!(tail.starts_with("HTTP/1.1 200"), "{tail}");
        let key = lab.store.signer().unwrap().public().to_string();
        assert!(
            tail.to_ascii_lowercase()
                .contains(&format!("{SIGNER_HEADER}: {key}")),
            "{tail}"
        );
        assert!(get("/images/golden/chunks/0", true).starts_with("HTTP/1.1 200"));
        for (path, status) in [
            ("/images/golden/chunks/1", "404"),
            ("/images/golden/chunks/3", "404"),
            ("/images/golden/chunks/x", "400"),
            ("/images/other/manifest", "404"),
            ("/images/other/chunks/0", "404"),
        ] {
            let answer = get(path, true);
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status}")),
                "{path}: {answer}"
            );
        }
    }

    #[test]
    fn reads_can_be_closed_to_everyone_but_the_admin() {
        let (addr, _, admin) =
            crate::testing::web_server("closed-reads", "\n[security]\npublic_reads = false\n");
        let get = |path: &str, auth: &str| {
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n");
            exchange_from([127, 0, 0, 1], addr, request.as_bytes())
        };
        for path in ["/status", "/api/v1/machines", "/api/v1/images"] {
            assert!(get(path, "").starts_with("HTTP/1.1 401"), "{path}");
            let ok = get(path, &format!("Authorization: Bearer {admin}\r\n"));
            assert!(ok.starts_with("HTTP/1.1 200"), "{path}: {ok}");
        }
        // A machine's boot script is not a read of the lab: it stays reachable.
        assert!(!get("/boot/52:54:00:00:00:99.ipxe", "").starts_with("HTTP/1.1 401"));
    }

    #[test]
    fn uploads_in_chunks_or_with_a_length_are_stored_and_cut_offs_never_are() {
        let (addr, store) = server("upload");
        let image = image_bytes();
        let ok = put(
            addr,
            "golden",
            "Transfer-Encoding: chunked\r\n",
            &chunked(&image),
        );
        assert!(ok.starts_with("HTTP/1.1 201"), "{ok}");
        store.verify("golden").unwrap();
        let sized = put(
            addr,
            "sized",
            &format!("Content-Length: {}\r\n", image.len()),
            &image,
        );
        assert!(sized.starts_with("HTTP/1.1 201"), "{sized}");
        // Cut off: in a chunk, before the last chunk, a bad size line, short of the length.
        let whole = chunked(&image);
        let cuts: [(&str, Vec<u8>, &str); 4] = [
            (
                "a",
                whole[..whole.len() / 2].to_vec(),
                "Transfer-Encoding: chunked\r\n",
            ),
            (
                "b",
                whole[..whole.len() - 5].to_vec(),
                "Transfer-Encoding: chunked\r\n",
            ),
            ("c", b"zz\r\n".to_vec(), "Transfer-Encoding: chunked\r\n"),
            ("d", image[..100].to_vec(), "Content-Length: 100000\r\n"),
        ];
        for (name, body, headers) in cuts {
            let request = [
                format!(
                    "PUT /images/{name} HTTP/1.1\r\nHost: x\r\n{}{headers}\r\n",
                    admin_header()
                )
                .as_bytes(),
                &body,
            ]
            .concat();
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream.write_all(&request).unwrap();
            // The client dies mid-upload.
            stream.shutdown(std::net::Shutdown::Write).unwrap();
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            assert!(
                answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
                "{name}: {answer}"
            );
        }
        // Nothing half-written is listed or left behind.
        std::thread::sleep(Duration::from_millis(300));
        let listed: Vec<String> = store
            .list()
            .unwrap()
            .into_iter()
            .map(|i| i.unwrap().name)
            .collect();
        assert_eq!(listed, ["golden", "sized"]);
        let leftovers = std::fs::read_dir(store.dir()).unwrap().count();
        assert_eq!(leftovers, 2, "partial files were left behind");
        // No body at all is an empty upload: not an image.
        let none = put(addr, "x", "", b"");
        assert!(none.starts_with("HTTP/1.1 400"), "{none}");
    }

    #[test]
    fn a_taken_name_is_refused_before_the_body_and_the_answer_reaches_the_client() {
        let (addr, store) = server("conflict");
        let image = image_bytes();
        let ok = put(
            addr,
            "golden",
            "Transfer-Encoding: chunked\r\n",
            &chunked(&image),
        );
        assert!(ok.starts_with("HTTP/1.1 201"), "{ok}");
        // With Expect: the refusal comes instead of 100 Continue, before any body is sent.
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .write_all(
                format!(
                    "PUT /images/golden HTTP/1.1\r\nHost: x\r\n{}Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
                    admin_header()
                )
                .as_bytes(),
            )
            .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut first = [0u8; 64];
        let n = stream.read(&mut first).unwrap();
        let first = String::from_utf8_lossy(&first[..n]);
        assert!(first.starts_with("HTTP/1.1 409"), "{first}");
        // Without Expect, the client is sending its body already: it still reads the 409.
        let refused = put(
            addr,
            "golden",
            "Transfer-Encoding: chunked\r\n",
            &chunked(&image),
        );
        assert!(refused.starts_with("HTTP/1.1 409"), "{refused}");
        assert!(refused.contains("already exists"), "{refused}");
        // No server path or process id in what a client is told.
        let dir = store.dir().display().to_string();
        assert!(!refused.contains(&dir), "{refused}");
        let damaged = put(
            addr,
            "damaged",
            "Transfer-Encoding: chunked\r\n",
            &chunked(&image[..image.len() - 1]),
        );
        assert!(damaged.starts_with("HTTP/1.1 400"), "{damaged}");
        assert!(
            !damaged.contains(&dir) && !damaged.contains(".partial"),
            "{damaged}"
        );
    }
}
