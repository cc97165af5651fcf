//! The agent's HTTP/1.1 client for the bootserver: uploads (capture) and task reports. Small on
//! purpose, and every answer is read within bounds, so a hostile "server" cannot make the agent
//! allocate without limit.
//!
//! Over HTTPS (rustls with ring, which links into the static agent) the server is trusted by the
//! SHA-256 fingerprint of its certificate, pinned on the kernel command line by the bootserver
//! (`diskcast.pin=`) or given by hand (`--pin`), or by a CA file. The handshake completes in
//! [`Connection::open`], before a caller can write anything: a server with another certificate
//! never sees a token or a disk byte.

use diskcast_proto::trust::CertFingerprint;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {endpoint}")]
    Tcp {
        /// `https://ADDRESS:PORT` (text: keeps the error small).
        endpoint: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{endpoint} presented a certificate with SHA-256 fingerprint {found}, not the pinned {expected}: \
         nothing was sent to it. Another host may be answering at this address; if the server's \
         certificate was replaced, `bootserver key https` on the server prints the new fingerprint"
    )]
    PinMismatch {
        /// `https://ADDRESS:PORT` (text: keeps the error small).
        endpoint: String,
        found: CertFingerprint,
        expected: CertFingerprint,
    },
    #[error("TLS handshake with {endpoint} failed; nothing was sent to it")]
    Handshake {
        /// `https://ADDRESS:PORT` (text: keeps the error small).
        endpoint: String,
        #[source]
        source: io::Error,
    },
    #[error("reading the CA file {path}: {message}")]
    CaFile { path: PathBuf, message: String },
}

/// How the agent trusts the server.
#[derive(Debug, Clone)]
pub enum ServerTls {
    /// Plain HTTP.
    Plain,
    /// HTTPS to exactly the certificate with this SHA-256 fingerprint (its name is not checked:
    /// the bootserver's self-signed certificate has none a CA vouched for).
    Pin(CertFingerprint),
    /// HTTPS to a certificate a CA in this set issued for the server's address.
    Roots(Arc<rustls::RootCertStore>),
}

impl ServerTls {
    /// Roots from a PEM file of CA certificates.
    pub fn ca_file(path: &Path) -> Result<Self, ConnectError> {
        use rustls::pki_types::pem::PemObject;
        let fail = |message: String| ConnectError::CaFile {
            path: path.into(),
            message,
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| fail(e.to_string()))? {
            let cert = cert.map_err(|e| fail(e.to_string()))?;
            roots.add(cert).map_err(|e| fail(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(fail(
                "it holds no certificate (PEM, `-----BEGIN CERTIFICATE-----`)".into(),
            ));
        }
        Ok(Self::Roots(Arc::new(roots)))
    }
}

/// The server's API: where, and over what.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub tls: ServerTls,
}

impl Endpoint {
    pub fn plain(addr: SocketAddr) -> Self {
        Self {
            addr,
            tls: ServerTls::Plain,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.tls {
            ServerTls::Plain => write!(f, "http://{}", self.addr),
            _ => write!(f, "https://{}", self.addr),
        }
    }
}

/// SHA-256 of a certificate's DER bytes.
pub fn fingerprint(der: &[u8]) -> CertFingerprint {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    CertFingerprint(out)
}

/// Accepts exactly one certificate; checks that the server holds its key as usual.
#[derive(Debug)]
struct PinVerifier {
    pin: CertFingerprint,
    /// What the server presented, for the error message.
    seen: Mutex<Option<CertFingerprint>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let found = fingerprint(end_entity);
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(found);
        }
        if found == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// An open connection, plain or TLS. Handles ([`Connection::handle`]) share it, so one part of
/// the caller can read answers while another writes (as with `TcpStream::try_clone`).
pub struct Connection {
    tcp: TcpStream,
    shared: Handle,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Connection({:?})", self.tcp.peer_addr().ok())
    }
}

/// A share of a [`Connection`] that reads and writes it.
#[derive(Clone)]
pub struct Handle(Arc<Mutex<Box<dyn Stream>>>);

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Handle")
    }
}

fn poisoned() -> io::Error {
    io::Error::other("the connection's lock was poisoned")
}

impl Read for Handle {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.lock().map_err(|_| poisoned())?.read(buf)
    }
}

impl Write for Handle {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().map_err(|_| poisoned())?.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.lock().map_err(|_| poisoned())?.flush()
    }
}

impl Connection {
    /// Connects, and over TLS completes the handshake (certificate checked) before returning.
    pub fn open(endpoint: &Endpoint, timeout: Duration) -> Result<Self, ConnectError> {
        let tcp_err = |source| ConnectError::Tcp {
            endpoint: endpoint.to_string(),
            source,
        };
        let mut tcp = TcpStream::connect_timeout(&endpoint.addr, timeout).map_err(tcp_err)?;
        tcp.set_read_timeout(Some(timeout)).map_err(tcp_err)?;
        tcp.set_write_timeout(Some(timeout)).map_err(tcp_err)?;
        tcp.set_nodelay(true).ok();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let handshake_err = |source: io::Error| ConnectError::Handshake {
            endpoint: endpoint.to_string(),
            source,
        };
        let other = |e: rustls::Error| handshake_err(io::Error::other(e));
        let builder = || {
            rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_safe_default_protocol_versions()
                .map_err(other)
        };
        let mut pin_verifier = None;
        let config = match &endpoint.tls {
            ServerTls::Plain => {
                let stream: Box<dyn Stream> = Box::new(tcp.try_clone().map_err(tcp_err)?);
                return Ok(Self {
                    tcp,
                    shared: Handle(Arc::new(Mutex::new(stream))),
                });
            }
            ServerTls::Pin(pin) => {
                let verifier = Arc::new(PinVerifier {
                    pin: *pin,
                    seen: Mutex::new(None),
                    provider: Arc::clone(&provider),
                });
                pin_verifier = Some(Arc::clone(&verifier));
                builder()?
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_no_client_auth()
            }
            ServerTls::Roots(roots) => builder()?
                .with_root_certificates(Arc::clone(roots))
                .with_no_client_auth(),
        };
        let name = ServerName::IpAddress(endpoint.addr.ip().into());
        let mut tls = rustls::ClientConnection::new(Arc::new(config), name).map_err(other)?;
        while tls.is_handshaking() {
            if let Err(e) = tls.complete_io(&mut tcp) {
                let found = pin_verifier
                    .as_ref()
                    .and_then(|v| v.seen.lock().ok().and_then(|seen| *seen));
                return Err(match (found, &endpoint.tls) {
                    (Some(found), ServerTls::Pin(expected)) if found != *expected => {
                        ConnectError::PinMismatch {
                            endpoint: endpoint.to_string(),
                            found,
                            expected: *expected,
                        }
                    }
                    _ => handshake_err(e),
                });
            }
        }
        let stream: Box<dyn Stream> = Box::new(rustls::StreamOwned::new(
            tls,
            tcp.try_clone().map_err(tcp_err)?,
        ));
        Ok(Self {
            tcp,
            shared: Handle(Arc::new(Mutex::new(stream))),
        })
    }

    /// A share that reads and writes the connection.
    pub fn handle(&self) -> Handle {
        self.shared.clone()
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.tcp.set_read_timeout(timeout)
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.tcp.set_write_timeout(timeout)
    }
}

/// Longest status or header line of an answer, and most header lines: a store (or anything
/// pretending to be one) cannot make the agent, PID 1 on the machine, allocate without bound.
const MAX_LINE: u64 = 8 << 10;
const MAX_HEADERS: usize = 100;
const MAX_BODY: u64 = 64 << 10;

/// One line of at most [`MAX_LINE`] bytes, ending in a newline.
fn bounded_line(reader: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    reader
        .by_ref()
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\n") {
        let why = if line.len() as u64 >= MAX_LINE {
            "a line of the answer is longer than 8 KiB"
        } else {
            "the answer ended in the middle of a line"
        };
        return Err(io::Error::new(io::ErrorKind::InvalidData, why));
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Status code and body (trimmed) of an HTTP response; a `100 Continue` has no body.
pub fn read_response(reader: &mut impl BufRead) -> io::Result<(u16, String)> {
    let status_line = bounded_line(reader)?;
    let status = status_line
        .split_ascii_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not an HTTP response: {:?}", status_line.trim()),
            )
        })?;
    let mut length = None;
    let mut headers = 0;
    loop {
        let line = bounded_line(reader)?;
        if line.trim().is_empty() {
            break;
        }
        headers += 1;
        if headers > MAX_HEADERS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the answer has more than 100 header lines",
            ));
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<u64>().ok();
            }
        }
    }
    if status == 100 {
        return Ok((status, String::new()));
    }
    let mut body = Vec::new();
    reader
        .take(length.unwrap_or(MAX_BODY).min(MAX_BODY))
        .read_to_end(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).trim().to_string()))
}

#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("talking to {endpoint}")]
    Io {
        endpoint: String,
        #[source]
        source: io::Error,
    },
}

/// `POST path` with a JSON body; the status and (trimmed) body of the answer.
pub fn post_json(
    server: &Endpoint,
    path: &str,
    json: &str,
    timeout: Duration,
) -> Result<(u16, String), PostError> {
    let connection = Connection::open(server, timeout)?;
    let addr = server.addr;
    let mut writer = io::BufWriter::new(connection.handle());
    write!(
        writer,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: diskcast-agent/{}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        env!("CARGO_PKG_VERSION"),
        json.len()
    )
    .and_then(|()| writer.flush())
    .and_then(|()| read_response(&mut BufReader::new(connection.handle())))
    .map_err(|source| PostError::Io {
        endpoint: server.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A TLS server on 127.0.0.1 with a fresh self-signed certificate: answers one request per
    /// connection with `201 stored`, and sends what each connection's client wrote (decrypted)
    /// down the channel.
    fn tls_server() -> (
        SocketAddr,
        CertFingerprint,
        std::sync::mpsc::Receiver<Vec<u8>>,
    ) {
        use rustls::pki_types::pem::PemObject;
        let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let cert = CertificateDer::from(made.cert.der().to_vec());
        let pin = fingerprint(&cert);
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(
            made.signing_key.serialize_pem().as_bytes(),
        )
        .unwrap();
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { continue };
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
                let conn = rustls::ServerConnection::new(Arc::clone(&config)).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                if !got.is_empty() {
                    let _ = tls.write_all(
                        b"HTTP/1.1 201 Created\r\nContent-Length: 6\r\nConnection: close\r\n\r\nstored",
                    );
                    let _ = tls.flush();
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                }
                let _ = tx.send(got);
            }
        });
        (addr, pin, rx)
    }

    #[test]
    fn the_pinned_certificate_is_talked_to_and_another_gets_nothing() {
        let (addr, pin, received) = tls_server();
        let right = Endpoint {
            addr,
            tls: ServerTls::Pin(pin),
        };
        let (status, body) = post_json(
            &right,
            "/api/v1/agent/report",
            "{\"a\":1}",
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!((status, body.as_str()), (201, "stored"));
        let seen = received.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(seen.starts_with(b"POST /api/v1/agent/report HTTP/1.1\r\n"));

        let mut other = pin;
        other.0[0] ^= 1;
        let wrong = Endpoint {
            addr,
            tls: ServerTls::Pin(other),
        };
        let err = post_json(
            &wrong,
            "/x",
            "{\"token\":\"secret\"}",
            Duration::from_secs(5),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("fingerprint {pin}, not the pinned {other}")),
            "{text}"
        );
        // The server got not one byte of the request.
        let seen = received.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(seen.is_empty(), "{:?}", String::from_utf8_lossy(&seen));

        // Plain HTTP to a TLS server is not mistaken for an answer.
        assert!(post_json(&Endpoint::plain(addr), "/x", "{}", Duration::from_secs(5)).is_err());
    }

    /// Endless bytes, as a hostile "store" would send them.
    struct Endless(u8);

    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            buf.fill(self.0);
            Ok(buf.len())
        }
    }

    #[test]
    fn answers_are_read_within_bounds() {
        // "100 " and then a status line that never ends: refused after 8 KiB, not read forever.
        let mut endless =
            BufReader::new(io::Cursor::new(b"HTTP/1.1 100 ".to_vec()).chain(Endless(b'x')));
        let err = read_response(&mut endless).unwrap_err();
        assert!(err.to_string().contains("longer than 8 KiB"), "{err}");
        let mut many = b"HTTP/1.1 201 Created\r\n".to_vec();
        for _ in 0..200 {
            many.extend_from_slice(b"X-A: b\r\n");
        }
        let err = read_response(&mut BufReader::new(&many[..])).unwrap_err();
        assert!(err.to_string().contains("100 header lines"), "{err}");
        let mut huge_body = BufReader::new(
            io::Cursor::new(
                b"HTTP/1.1 201 Created\r\nContent-Length: 99999999999\r\n\r\n".to_vec(),
            )
            .chain(Endless(b'y')),
        );
        let (status, body) = read_response(&mut huge_body).unwrap();
        assert_eq!((status, body.len()), (201, 64 << 10));
        let ok = b"HTTP/1.1 201 Created\r\nContent-Length: 6\r\n\r\nstored";
        assert_eq!(
            read_response(&mut BufReader::new(&ok[..])).unwrap(),
            (201, "stored".to_string())
        );
        let cut = b"HTTP/1.1 201 Crea";
        assert!(read_response(&mut BufReader::new(&cut[..])).is_err());
    }
}
