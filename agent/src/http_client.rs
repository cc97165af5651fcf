//! The agent's HTTP/1.1 client for the bootserver: uploads (capture) and task reports. Small on
//! purpose: PID 1 cannot afford a TLS stack it does not use, and every answer is read within
//! bounds, so a hostile "server" cannot make the agent allocate without limit.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

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

/// `POST path` with a JSON body; the status and (trimmed) body of the answer.
pub fn post_json(
    server: SocketAddr,
    path: &str,
    json: &str,
    timeout: Duration,
) -> io::Result<(u16, String)> {
    let stream = TcpStream::connect_timeout(&server, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut writer = io::BufWriter::new(stream.try_clone()?);
    write!(
        writer,
        "POST {path} HTTP/1.1\r\nHost: {server}\r\nUser-Agent: diskcast-agent/{}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        env!("CARGO_PKG_VERSION"),
        json.len()
    )?;
    writer.flush()?;
    read_response(&mut BufReader::new(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

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
