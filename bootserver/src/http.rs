//! A small HTTP/1.1 server for iPXE: GET and HEAD of rendered scripts and of the kernel and
//! initramfs files. One thread per connection, `Connection: close`, no keep-alive.

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
}

pub trait Routes: Send + Sync + 'static {
    fn route(&self, path: &str, client: IpAddr) -> Response;
}

const MAX_HEADER: usize = 8192;

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

/// Reads the request line and headers; returns (method, path).
fn read_request(reader: &mut impl BufRead) -> io::Result<Option<(String, String)>> {
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
    let mut words = text.lines().next().unwrap_or("").split_ascii_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(method), Some(path), Some(version)) if version.starts_with("HTTP/1.") => {
            Ok(Some((method.to_string(), path.to_string())))
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
    let Some((method, path)) = read_request(&mut reader)? else {
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
    let head_only = match method.as_str() {
        "GET" => false,
        "HEAD" => true,
        _ => {
            log::info!("http: {client} {method} {path} 405");
            return status_line(&mut stream, 405, "Method Not Allowed", "text/plain", 0);
        }
    };
    let path = path.split('?').next().unwrap_or("");
    match routes.route(path, client) {
        Response::Text { content_type, body } => {
            log::info!("http: {client} {method} {path} 200 ({} bytes)", body.len());
            status_line(&mut stream, 200, "OK", content_type, body.len() as u64)?;
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
                status_line(&mut stream, 200, "OK", "application/octet-stream", len)?;
                if !head_only {
                    io::copy(&mut file, &mut stream)?;
                }
            }
            Err(e) => {
                log::error!(
                    "http: {client} {method} {path}: cannot open {}: {e}",
                    file_path.display()
                );
                status_line(&mut stream, 500, "Internal Server Error", "text/plain", 0)?;
            }
        },
        Response::NotFound => {
            log::info!("http: {client} {method} {path} 404");
            let body = "not found\n";
            status_line(
                &mut stream,
                404,
                "Not Found",
                "text/plain",
                body.len() as u64,
            )?;
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
    }

    fn exchange(request: &[u8]) -> String {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            handle(stream, &Fixed).unwrap();
        });
        let mut client = TcpStream::connect(addr).unwrap();
        client.write_all(request).unwrap();
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
}
