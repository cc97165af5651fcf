//! A small HTTP/1.1 server: GET and HEAD of rendered iPXE scripts and of the kernel and
//! initramfs files for booting, PUT of image uploads (Content-Length or chunked transfer coding)
//! for the image store. One thread per connection, `Connection: close`, no keep-alive.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What a route answers.
#[derive(Debug)]
pub enum Response {
    Text {
        content_type: &'static str,
        body: String,
    },
    File(PathBuf),
    NotFound,
    /// Any other status, with a one-line text body.
    Status {
        code: u16,
        reason: &'static str,
        body: String,
    },
}

pub trait Routes: Send + Sync + 'static {
    fn route(&self, path: &str, client: IpAddr) -> Response;

    /// A PUT is about to send its body: `Some` refuses it up front (the client sent
    /// `Expect: 100-continue` and gets this answer instead of `100 Continue`).
    fn upload_check(&self, _path: &str) -> Option<Response> {
        None
    }

    /// A PUT: `body` yields the request body and ends where it ends.
    fn upload(&self, _path: &str, _client: IpAddr, _body: &mut dyn Read) -> Response {
        Response::Status {
            code: 405,
            reason: "Method Not Allowed",
            body: "uploads go to /images/NAME\n".into(),
        }
    }
}

/// Reads a body in HTTP/1.1 chunked transfer coding; EOF before the last chunk is an error, so a
/// cut-off upload never looks complete.
#[derive(Debug)]
pub struct ChunkedReader<R: BufRead> {
    inner: R,
    /// Bytes left in the current chunk; `None` before a size line.
    left: Option<u64>,
    done: bool,
}

impl<R: BufRead> ChunkedReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            left: None,
            done: false,
        }
    }

    fn line(&mut self) -> io::Result<String> {
        let mut line = Vec::new();
        self.inner
            .by_ref()
            .take(1024)
            .read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\n") {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "chunked body ended before its last chunk",
            ));
        }
        Ok(String::from_utf8_lossy(&line).trim().to_string())
    }
}

impl<R: BufRead> Read for ChunkedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        let left = match self.left {
            Some(left) if left > 0 => left,
            _ => {
                if self.left == Some(0) && !self.line()?.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "chunk not followed by CRLF",
                    ));
                }
                let size_line = self.line()?;
                let hex = size_line.split(';').next().unwrap_or("").trim();
                let size = u64::from_str_radix(hex, 16).map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("bad chunk size line {size_line:?}"),
                    )
                })?;
                if size == 0 {
                    // Trailer fields, then the blank line.
                    while !self.line()?.is_empty() {}
                    self.done = true;
                    return Ok(0);
                }
                size
            }
        };
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "chunked body ended inside a chunk",
            ));
        }
        self.left = Some(left - n as u64);
        Ok(n)
    }
}

/// A fixed-length body: EOF before `Content-Length` bytes is an error.
#[derive(Debug)]
struct LengthReader<R: Read> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for LengthReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("body ended {} bytes early", self.left),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

const MAX_HEADER: usize = 8192;
const UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("binding HTTP on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

pub fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr).map_err(|source| HttpError::Bind { addr, source })
}

pub fn serve(listener: TcpListener, routes: Arc<dyn Routes>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let routes = Arc::clone(&routes);
        let _ = std::thread::Builder::new()
            .name("http-conn".into())
            .spawn(move || {
                let peer = stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                if let Err(e) = handle(stream, routes.as_ref()) {
                    log::debug!("http: {peer}: {e}");
                }
            });
    }
}

#[derive(Debug)]
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads the request line and headers.
fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Request>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = reader
            .by_ref()
            .take((MAX_HEADER + 1 - head.len()) as u64)
            .read_until(b'\n', &mut line)?;
        if n == 0 || head.len() + n > MAX_HEADER {
            return Ok(None);
        }
        let blank = line == b"\r\n" || line == b"\n";
        head.extend_from_slice(&line);
        if blank {
            break;
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.lines();
    let mut words = lines.next().unwrap_or("").split_ascii_whitespace();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_string(), value.trim().to_string()))
        .collect();
    match (words.next(), words.next(), words.next()) {
        (Some(method), Some(path), Some(version)) if version.starts_with("HTTP/1.") => {
            Ok(Some(Request {
                method: method.to_string(),
                path: path.to_string(),
                headers,
            }))
        }
        _ => Ok(None),
    }
}

fn status_line(
    stream: &mut TcpStream,
    code: u16,
    reason: &str,
    content_type: &str,
    len: u64,
) -> io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nServer: diskcast-bootserver\r\nContent-Type: {content_type}\r\n\
         Content-Length: {len}\r\nConnection: close\r\n\r\n"
    )
}

pub fn handle(stream: TcpStream, routes: &dyn Routes) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let client = stream.peer_addr()?.ip();
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut stream = stream;
    let Some(request) = read_request(&mut reader)? else {
        let body = "bad request\n";
        status_line(
            &mut stream,
            400,
            "Bad Request",
            "text/plain",
            body.len() as u64,
        )?;
        return stream.write_all(body.as_bytes());
    };
    let (method, path) = (request.method.as_str(), request.path.as_str());
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        "PUT" => {
            // Uploads are long and bursty (a capture pauses while it reads a region of zeros).
            stream.set_read_timeout(Some(UPLOAD_IDLE_TIMEOUT))?;
            let chunked = request
                .header("Transfer-Encoding")
                .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
            let length = request
                .header("Content-Length")
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(refusal) = routes.upload_check(path) {
                return respond(&mut stream, method, path, client, refusal, false);
            }
            if request
                .header("Expect")
                .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
            {
                stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            }
            let response = match (chunked, length) {
                (true, _) => routes.upload(path, client, &mut ChunkedReader::new(&mut reader)),
                (false, Some(left)) => routes.upload(
                    path,
                    client,
                    &mut LengthReader {
                        inner: &mut reader,
                        left,
                    },
                ),
                (false, None) => Response::Status {
                    code: 411,
                    reason: "Length Required",
                    body: "send Content-Length or Transfer-Encoding: chunked\n".into(),
                },
            };
            return respond(&mut stream, method, path, client, response, false);
        }
        _ => {
            log::info!("http: {client} {method} {path} 405");
            return status_line(&mut stream, 405, "Method Not Allowed", "text/plain", 0);
        }
    };
    let path = path.split('?').next().unwrap_or("");
    let response = routes.route(path, client);
    respond(&mut stream, method, path, client, response, head_only)
}

fn respond(
    stream: &mut TcpStream,
    method: &str,
    path: &str,
    client: IpAddr,
    response: Response,
    head_only: bool,
) -> io::Result<()> {
    match response {
        Response::Status { code, reason, body } => {
            log::info!("http: {client} {method} {path} {code} {}", body.trim());
            status_line(stream, code, reason, "text/plain", body.len() as u64)?;
            if !head_only {
                stream.write_all(body.as_bytes())?;
            }
        }
        Response::Text { content_type, body } => {
            log::info!("http: {client} {method} {path} 200 ({} bytes)", body.len());
            status_line(stream, 200, "OK", content_type, body.len() as u64)?;
            if !head_only {
                stream.write_all(body.as_bytes())?;
            }
        }
        Response::File(file_path) => match std::fs::File::open(&file_path) {
            Ok(mut file) => {
                let len = file.metadata()?.len();
                log::info!(
                    "http: {client} {method} {path} 200 ({len} bytes from {})",
                    file_path.display()
                );
                status_line(stream, 200, "OK", "application/octet-stream", len)?;
                if !head_only {
                    io::copy(&mut file, stream)?;
                }
            }
            Err(e) => {
                log::error!(
                    "http: {client} {method} {path}: cannot open {}: {e}",
                    file_path.display()
                );
                status_line(stream, 500, "Internal Server Error", "text/plain", 0)?;
            }
        },
        Response::NotFound => {
            log::info!("http: {client} {method} {path} 404");
            let body = "not found\n";
            status_line(stream, 404, "Not Found", "text/plain", body.len() as u64)?;
            if !head_only {
                stream.write_all(body.as_bytes())?;
            }
        }
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl Routes for Fixed {
        fn route(&self, path: &str, _client: IpAddr) -> Response {
            match path {
                "/hello" => Response::Text {
                    content_type: "text/plain",
                    body: "hi\n".into(),
                },
                _ => Response::NotFound,
            }
        }

        fn upload(&self, path: &str, _client: IpAddr, body: &mut dyn Read) -> Response {
            let mut bytes = Vec::new();
            match body.read_to_end(&mut bytes) {
                Ok(_) => Response::Status {
                    code: 201,
                    reason: "Created",
                    body: format!("{path} {}\n", String::from_utf8_lossy(&bytes)),
                },
                Err(e) => Response::Status {
                    code: 400,
                    reason: "Bad Request",
                    body: format!("{e}\n"),
                },
            }
        }
    }

    fn exchange(request: &[u8]) -> String {
        exchange_closing(request, false)
    }

    /// Sends `request`; `half_close`: then closes the sending half, as a client that died
    /// mid-upload.
    fn exchange_closing(request: &[u8], half_close: bool) -> String {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            handle(stream, &Fixed).unwrap();
        });
        let mut client = TcpStream::connect(addr).unwrap();
        client.write_all(request).unwrap();
        if half_close {
            client.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let mut response = String::new();
        client.read_to_string(&mut response).unwrap();
        server.join().unwrap();
        response
    }

    #[test]
    fn serves_routes_and_rejects_the_rest() {
        let ok = exchange(b"GET /hello?x=1 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("Content-Length: 3\r\n") && ok.ends_with("\r\n\r\nhi\n"),
            "{ok}"
        );
        let head = exchange(b"HEAD /hello HTTP/1.0\r\n\r\n");
        assert!(
            head.contains("Content-Length: 3\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        assert!(exchange(b"GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(exchange(b"POST /hello HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(exchange(b"garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
    }

    #[test]
    fn uploads_in_chunks_or_with_a_length_and_cut_offs_are_errors() {
        let chunked = exchange(
            b"PUT /images/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n",
        );
        assert!(chunked.starts_with("HTTP/1.1 201"), "{chunked}");
        assert!(chunked.ends_with("/images/x hello, world\n"), "{chunked}");
        let sized = exchange(b"PUT /images/y HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
        assert!(sized.ends_with("/images/y abc\n"), "{sized}");
        for cut in [
            &b"PUT /i HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"[..],
            b"PUT /i HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            b"PUT /i HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"PUT /i HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc",
        ] {
            let response = exchange_closing(cut, true);
            assert!(response.starts_with("HTTP/1.1 400"), "{response}");
        }
        assert!(exchange(b"PUT /i HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 411"));
    }

    #[test]
    fn mutated_chunked_bodies_never_panic() {
        let valid = b"5\r\nhello\r\n1a;x=y\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nT: 1\r\n\r\n";
        let mut body = Vec::new();
        ChunkedReader::new(&valid[..])
            .read_to_end(&mut body)
            .unwrap();
        assert_eq!(body, b"helloabcdefghijklmnopqrstuvwxyz");
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut bytes = valid.to_vec();
            for _ in 0..1 + next() % 3 {
                let at = (next() as usize) % bytes.len();
                match next() % 3 {
                    0 => bytes[at] = next() as u8,
                    1 => bytes.insert(at, b"0f\r\n;"[(next() % 5) as usize]),
                    _ => {
                        bytes.remove(at);
                    }
                }
            }
            let mut body = Vec::new();
            if ChunkedReader::new(&bytes[..])
                .read_to_end(&mut body)
                .is_ok()
            {
                assert!(body.len() <= bytes.len());
            }
        }
    }
}
