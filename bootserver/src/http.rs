//! The HTTP edge: hyper serving an axum router, behind our own accept loop so the server can bound
//! what any client costs it. Boot files, iPXE scripts, status and image uploads all travel here,
//! and the lab's machines must still boot while somebody holds hundreds of connections open.
//!
//! - connections: at most [`HttpLimits::max_connections`] in total and
//!   [`HttpLimits::per_client`] per address; more are closed at once (and logged, throttled);
//! - a request's headers must arrive within [`HttpLimits::header_timeout`] in total, not per
//!   read: a client trickling a byte every few seconds is cut off (slowloris);
//! - headers are bounded in number and size (hyper), conflicting `Content-Length`s are a 400;
//! - the accept loop survives running out of file descriptors, and says so loudly.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("binding HTTP on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What one client, and all of them together, may hold.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub per_client: usize,
    /// From the first byte of a request to the end of its headers.
    pub header_timeout: Duration,
    pub max_headers: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            per_client: 32,
            header_timeout: Duration::from_secs(10),
            max_headers: 64,
        }
    }
}

/// The address a request came from, for handlers (`Extension<ClientAddr>`).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// The server's address the client reached (`Extension<ServerAddr>`): with several subnets,
/// what the client is told to come back to.
#[derive(Debug, Clone, Copy)]
pub struct ServerAddr(pub SocketAddr);

/// Counts open connections per client; a [`Slot`] frees its place when dropped.
#[derive(Debug, Default)]
struct Connections {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
    /// When a refusal was last logged, per client: floods must not flood the log.
    last_warned: HashMap<IpAddr, Instant>,
}

#[derive(Debug)]
struct Slot {
    connections: Arc<Mutex<Connections>>,
    client: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Ok(mut c) = self.connections.lock() else {
            return;
        };
        c.total -= 1;
        if let Some(n) = c.per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                c.per_client.remove(&self.client);
            }
        }
    }
}

fn admit(
    connections: &Arc<Mutex<Connections>>,
    client: IpAddr,
    limits: &HttpLimits,
) -> Option<Slot> {
    let mut c = connections.lock().ok()?;
    let mine = c.per_client.get(&client).copied().unwrap_or(0);
    if c.total >= limits.max_connections || mine >= limits.per_client {
        let now = Instant::now();
        let quiet = c
            .last_warned
            .get(&client)
            .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(60));
        if !quiet {
            log::warn!(
                "http: refusing connections from {client}: {mine} open from it, {} in total (limits {} per client, {} in total)",
                c.total,
                limits.per_client,
                limits.max_connections
            );
            c.last_warned.insert(client, now);
        }
        return None;
    }
    c.total += 1;
    *c.per_client.entry(client).or_insert(0) += 1;
    Some(Slot {
        connections: Arc::clone(connections),
        client,
    })
}

pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, HttpError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Serves `app` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, app: Router, limits: HttpLimits) {
    serve_maybe_tls(listener, app, limits, None).await
}

/// Serves `app` over TLS on `listener`, with the same limits; the handshake must finish within
/// the header deadline too (a client that opens and stalls is cut off like a slowloris).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: HttpLimits,
    tls: std::sync::Arc<rustls::ServerConfig>,
) {
    serve_maybe_tls(
        listener,
        app,
        limits,
        Some(tokio_rustls::TlsAcceptor::from(tls)),
    )
    .await
}

async fn serve_maybe_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: HttpLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let connections = Arc::new(Mutex::new(Connections::default()));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) if out_of_descriptors(&e) => {
                log::error!(
                    "http: out of file descriptors accepting a connection ({e}): clients are refused until some close; raise the open-files limit (LimitNOFILE)"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => {
                log::warn!("http: accepting a connection: {e}");
                continue;
            }
        };
        let Some(slot) = admit(&connections, peer.ip(), &limits) else {
            drop(stream);
            continue;
        };
        let local = stream
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let service = TowerToHyperService::new(
            app.clone()
                .layer(axum::Extension(ClientAddr(peer)))
                .layer(axum::Extension(ServerAddr(local))),
        );
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_headers(limits.max_headers)
                .keep_alive(true);
            let served = match tls {
                None => {
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                }
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await;
                    match handshake {
                        Ok(Ok(stream)) => {
                            builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await
                        }
                        Ok(Err(e)) => {
                            log::info!("https: {peer}: TLS handshake failed: {e}");
                            return;
                        }
                        Err(_) => {
                            log::debug!(
                                "https: {peer}: no TLS handshake within {:?}",
                                limits.header_timeout
                            );
                            return;
                        }
                    }
                }
            };
            if let Err(e) = served {
                log::debug!("http: {peer}: {e}");
            }
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use axum::routing::get;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    /// A server for `app` on 127.0.0.1 in a runtime of its own; returns its address.
    pub(crate) fn start(app: Router, limits: HttpLimits) -> SocketAddr {
        serve_on_loopback(move |listener| serve(listener, app, limits))
    }

    /// Runs `run` on a fresh loopback listener in a runtime of its own; returns its address.
    fn serve_on_loopback<F, Fut>(run: F) -> SocketAddr
    where
        F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                run(listener).await;
            });
        });
        rx.recv().unwrap()
    }

    /// A TLS server for `app` (see [`start`]) with a fresh self-signed certificate.
    pub(crate) fn start_tls(app: Router, limits: HttpLimits) -> SocketAddr {
        let dir = std::env::temp_dir().join(format!(
            "diskcast-http-tls-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let policy = crate::config::HttpsPolicy {
            port: 8443,
            identity: crate::config::HttpsIdentity::Generated,
        };
        let identity = crate::tls::load_or_create(&policy, &dir, &["127.0.0.1".into()]).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let config = crate::tls::server_config(&identity).unwrap();
        serve_on_loopback(move |listener| serve_tls(listener, app, limits, config))
    }

    /// Sends `request` from `from` (an address on the loopback) and reads the whole answer.
    pub(crate) fn exchange_from(from: [u8; 4], addr: SocketAddr, request: &[u8]) -> String {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((from, 0))).unwrap();
        let std_socket: std::net::TcpStream = {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime
                .block_on(socket.connect(addr))
                .unwrap()
                .into_std()
                .unwrap()
        };
        let mut stream = std_socket;
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request).unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    }

    fn hello() -> Router {
        Router::new().route("/hello", get(|| async { "hi\n" }))
    }

    #[test]
    fn serves_routes_and_refuses_what_is_not_http() {
        let addr = start(hello(), HttpLimits::default());
        let ok = exchange_from(
            [127, 0, 0, 1],
            addr,
            b"GET /hello?x=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        );
        assert!(
            ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nhi\n"),
            "{ok}"
        );
        let head = exchange_from([127, 0, 0, 1], addr, b"HEAD /hello HTTP/1.0\r\n\r\n");
        assert!(
            head.starts_with("HTTP/1.0 200") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        let close = b"Connection: close\r\n\r\n";
        let get = |path: &str| {
            let request = [format!("GET {path} HTTP/1.1\r\n").as_bytes(), close].concat();
            exchange_from([127, 0, 0, 1], addr, &request)
        };
        assert!(get("/nope").starts_with("HTTP/1.1 404"));
        // Keep-alive: two requests on one connection, two answers (the console's page, its
        // script and its API reads share one).
        let kept = exchange_from(
            [127, 0, 0, 1],
            addr,
            b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\nGET /hello HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(kept.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{kept}");
        let post = exchange_from(
            [127, 0, 0, 1],
            addr,
            b"POST /hello HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(exchange_from([127, 0, 0, 1], addr, b"garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
        // Two different lengths: which body would it be? Refused.
        let twice = exchange_from(
            [127, 0, 0, 1],
            addr,
            b"GET /hello HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
        );
        assert!(twice.starts_with("HTTP/1.1 400"), "{twice}");
        let many_headers: String = (0..200).map(|i| format!("X-{i}: y\r\n")).collect();
        let crowded = exchange_from(
            [127, 0, 0, 1],
            addr,
            format!("GET /hello HTTP/1.1\r\n{many_headers}\r\n").as_bytes(),
        );
        assert!(crowded.starts_with("HTTP/1.1 431"), "{crowded}");
    }

    #[test]
    fn tls_connections_that_never_finish_their_handshake_are_cut_off() {
        let limits = HttpLimits {
            header_timeout: Duration::from_secs(2),
            ..HttpLimits::default()
        };
        let addr = start_tls(hello(), limits);
        // Silent after connecting: closed once the header deadline passed, without an answer.
        let mut silent = TcpStream::connect(addr).unwrap();
        silent
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 64];
        assert!(matches!(silent.read(&mut buf), Ok(0) | Err(_)));
        // Plain HTTP to the TLS port: no HTTP answer, the connection ends.
        let answer = exchange_from(
            [127, 0, 0, 1],
            addr,
            b"GET /hello HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert!(!answer.contains("hi"), "{answer}");
    }

    #[test]
    fn a_slowloris_crowd_neither_holds_connections_nor_keeps_others_out() {
        let limits = HttpLimits {
            max_connections: 64,
            per_client: 16,
            header_timeout: Duration::from_secs(2),
            ..HttpLimits::default()
        };
        let addr = start(hello(), limits);
        // 100 connections from one address, each trickling a request one byte at a time.
        let crowd: Vec<TcpStream> = (0..100)
            .filter_map(|_| TcpStream::connect(addr).ok())
            .collect();
        let started = Instant::now();
        let mut cut_off = vec![false; crowd.len()];
        let mut served_meanwhile = 0;
        while started.elapsed() < Duration::from_secs(4) {
            for (i, mut stream) in crowd.iter().enumerate() {
                if !cut_off[i] && stream.write_all(b"G").is_err() {
                    cut_off[i] = true;
                }
            }
            // Another client is served all the while.
            let answer = exchange_from(
                [127, 0, 0, 2],
                addr,
                b"GET /hello HTTP/1.1\r\nConnection: close\r\n\r\n",
            );
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            served_meanwhile += 1;
            std::thread::sleep(Duration::from_millis(300));
        }
        assert!(served_meanwhile >= 5);
        // Past the header deadline every trickler was cut off, including the 16 admitted.
        let mut buf = [0u8; 64];
        let closed = crowd
            .iter()
            .filter(|s| {
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                matches!((&**s).read(&mut buf), Ok(0) | Err(_))
            })
            .count();
        assert_eq!(closed, crowd.len());
    }
}
