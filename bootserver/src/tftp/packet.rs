//! Typed view of TFTP packets: RFC 1350 (RRQ, WRQ, DATA, ACK, ERROR), RFC 2347 (OACK) and the
//! options of RFC 2348 (blksize), RFC 2349 (timeout, tsize) and RFC 7440 (windowsize).
//!
//! [`parse`] never panics and never allocates more than the datagram holds. A malformed *request*
//! yields a [`ParseError`] whose [`ParseError::reply_code`] and `Display` text the server sends
//! back as an ERROR packet, so a client learns why it was refused instead of timing out.
//! [`Packet::emit`] writes the canonical form: option names in lower case, numbers in decimal;
//! `parse(emit(p)) == p` for every packet `parse` accepts.

use std::fmt;

/// Longest file name accepted in a request, in bytes.
pub const MAX_FILE_NAME_LEN: usize = 255;
/// Smallest and largest block size RFC 2348 allows.
pub const BLKSIZE_RANGE: (u16, u16) = (8, 65464);
/// Longest option value kept in an error message (client-controlled text stays short).
const QUOTE_LEN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Rrq = 1,
    Wrq = 2,
    Data = 3,
    Ack = 4,
    Error = 5,
    Oack = 6,
}

impl Opcode {
    fn from_u16(code: u16) -> Option<Self> {
        Some(match code {
            1 => Self::Rrq,
            2 => Self::Wrq,
            3 => Self::Data,
            4 => Self::Ack,
            5 => Self::Error,
            6 => Self::Oack,
            _ => return None,
        })
    }

    fn is_request(self) -> bool {
        matches!(self, Self::Rrq | Self::Wrq)
    }
}

/// ERROR packet codes (RFC 1350 section 5, RFC 2347 for 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    NotDefined,
    FileNotFound,
    AccessViolation,
    DiskFull,
    IllegalOperation,
    UnknownTransferId,
    FileExists,
    NoSuchUser,
    OptionNegotiation,
    Other(u16),
}

impl ErrorCode {
    pub fn from_u16(code: u16) -> Self {
        match code {
            0 => Self::NotDefined,
            1 => Self::FileNotFound,
            2 => Self::AccessViolation,
            3 => Self::DiskFull,
            4 => Self::IllegalOperation,
            5 => Self::UnknownTransferId,
            6 => Self::FileExists,
            7 => Self::NoSuchUser,
            8 => Self::OptionNegotiation,
            other => Self::Other(other),
        }
    }

    pub fn to_u16(self) -> u16 {
        match self {
            Self::NotDefined => 0,
            Self::FileNotFound => 1,
            Self::AccessViolation => 2,
            Self::DiskFull => 3,
            Self::IllegalOperation => 4,
            Self::UnknownTransferId => 5,
            Self::FileExists => 6,
            Self::NoSuchUser => 7,
            Self::OptionNegotiation => 8,
            Self::Other(code) => code,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
}

/// Options of a request or an OACK. Known options are typed and checked against their RFC's
/// range; unknown ones are kept (name as sent, value as sent) so that the server can ignore them
/// as RFC 2347 asks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// RFC 2348, 8..=65464.
    pub blksize: Option<u16>,
    /// RFC 2349, seconds, 1..=255. The server reads it and ignores it.
    pub timeout: Option<u8>,
    /// RFC 2349: 0 in a read request, the file's length in the OACK.
    pub tsize: Option<u64>,
    /// RFC 7440, 1..=65535.
    pub windowsize: Option<u16>,
    pub unknown: Vec<(String, String)>,
}

impl Options {
    pub fn is_empty(&self) -> bool {
        self.blksize.is_none()
            && self.timeout.is_none()
            && self.tsize.is_none()
            && self.windowsize.is_none()
            && self.unknown.is_empty()
    }
}

/// RRQ or WRQ. Only mode `octet` gets this far: other modes are a [`ParseError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    /// UTF-8, 1..=255 bytes, as the client sent it (path checks are the server's business).
    pub filename: String,
    pub options: Options,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    Request(Request),
    Data { block: u16, data: &'a [u8] },
    Ack { block: u16 },
    Error { code: ErrorCode, message: String },
    Oack(Options),
}

/// Why a datagram is not a TFTP packet we accept. For requests, every variant is meant to be sent
/// back as an ERROR packet ([`ParseError::reply_code`], message = `Display`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{len}-byte datagram is too short for a TFTP packet")]
    TooShort { len: usize },
    #[error("unknown opcode {opcode}")]
    UnknownOpcode { opcode: u16 },
    #[error("malformed {opcode:?}: {field} is not NUL-terminated")]
    Unterminated { opcode: Opcode, field: &'static str },
    #[error("{opcode:?} of {len} bytes is too short")]
    Truncated { opcode: Opcode, len: usize },
    #[error("file name is not UTF-8")]
    FileNameNotUtf8 { opcode: Opcode },
    #[error("file name of {len} bytes is too long (at most 255)")]
    FileNameTooLong { opcode: Opcode, len: usize },
    #[error("empty file name")]
    EmptyFileName { opcode: Opcode },
    #[error("mode {mode:?} is not supported: octet only")]
    UnsupportedMode { opcode: Opcode, mode: String },
    #[error("malformed {opcode:?}: option {name:?} has no value")]
    OptionWithoutValue { opcode: Opcode, name: String },
    #[error("malformed {opcode:?}: option name or value is not UTF-8")]
    OptionNotUtf8 { opcode: Opcode },
    #[error("malformed {opcode:?}: empty option name")]
    EmptyOptionName { opcode: Opcode },
    #[error("option {name} given twice")]
    DuplicateOption { opcode: Opcode, name: &'static str },
    #[error("option {name}={value:?}: {reason}")]
    BadOptionValue {
        opcode: Opcode,
        name: &'static str,
        value: String,
        reason: &'static str,
    },
}

impl ParseError {
    /// The opcode of the packet that failed, when the datagram got that far.
    pub fn opcode(&self) -> Option<Opcode> {
        match self {
            Self::TooShort { .. } | Self::UnknownOpcode { .. } => None,
            Self::Unterminated { opcode, .. }
            | Self::Truncated { opcode, .. }
            | Self::FileNameNotUtf8 { opcode }
            | Self::FileNameTooLong { opcode, .. }
            | Self::EmptyFileName { opcode }
            | Self::UnsupportedMode { opcode, .. }
            | Self::OptionWithoutValue { opcode, .. }
            | Self::OptionNotUtf8 { opcode }
            | Self::EmptyOptionName { opcode }
            | Self::DuplicateOption { opcode, .. }
            | Self::BadOptionValue { opcode, .. } => Some(*opcode),
        }
    }

    /// Whether the datagram claimed to be a request (RRQ or WRQ) and so deserves an ERROR reply;
    /// garbage of any other kind is dropped (answering it would only feed reflection).
    pub fn is_request(&self) -> bool {
        self.opcode().is_some_and(Opcode::is_request)
    }

    /// The ERROR code to answer a bad request with: 4 (illegal operation) for a malformed packet
    /// or an unsupported mode, 8 (RFC 2347) for an option value outside its RFC's range, 0 for a
    /// file name we cannot take.
    pub fn reply_code(&self) -> ErrorCode {
        match self {
            Self::FileNameNotUtf8 { .. }
            | Self::FileNameTooLong { .. }
            | Self::EmptyFileName { .. } => ErrorCode::NotDefined,
            Self::DuplicateOption { .. } | Self::BadOptionValue { .. } => {
                ErrorCode::OptionNegotiation
            }
            _ => ErrorCode::IllegalOperation,
        }
    }
}

/// Parses one datagram.
pub fn parse(datagram: &[u8]) -> Result<Packet<'_>, ParseError> {
    let (Some(&hi), Some(&lo)) = (datagram.first(), datagram.get(1)) else {
        return Err(ParseError::TooShort {
            len: datagram.len(),
        });
    };
    let code = u16::from_be_bytes([hi, lo]);
    let opcode = Opcode::from_u16(code).ok_or(ParseError::UnknownOpcode { opcode: code })?;
    let body = &datagram[2..];
    let truncated = ParseError::Truncated {
        opcode,
        len: datagram.len(),
    };
    match opcode {
        Opcode::Rrq | Opcode::Wrq => parse_request(opcode, body).map(Packet::Request),
        Opcode::Data => match body {
            [hi, lo, data @ ..] => Ok(Packet::Data {
                block: u16::from_be_bytes([*hi, *lo]),
                data,
            }),
            _ => Err(truncated),
        },
        // Bytes after the block number are tolerated (and dropped): nothing is lost by it.
        Opcode::Ack => match body {
            [hi, lo, ..] => Ok(Packet::Ack {
                block: u16::from_be_bytes([*hi, *lo]),
            }),
            _ => Err(truncated),
        },
        // A client's ERROR must end its transfer however it is written: a missing terminator is
        // tolerated and the message decoded lossily.
        Opcode::Error => match body {
            [hi, lo, rest @ ..] => {
                let text = rest.split(|&b| b == 0).next().unwrap_or_default();
                Ok(Packet::Error {
                    code: ErrorCode::from_u16(u16::from_be_bytes([*hi, *lo])),
                    message: String::from_utf8_lossy(text).into_owned(),
                })
            }
            _ => Err(truncated),
        },
        Opcode::Oack => parse_options(opcode, body).map(Packet::Oack),
    }
}

/// Splits off one NUL-terminated field.
fn field<'a>(
    rest: &mut &'a [u8],
    opcode: Opcode,
    name: &'static str,
) -> Result<&'a [u8], ParseError> {
    let end = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or(ParseError::Unterminated {
            opcode,
            field: name,
        })?;
    let (value, tail) = rest.split_at(end);
    *rest = &tail[1..];
    Ok(value)
}

fn parse_request(opcode: Opcode, body: &[u8]) -> Result<Request, ParseError> {
    let mut rest = body;
    let name = field(&mut rest, opcode, "file name")?;
    let mode = field(&mut rest, opcode, "mode")?;
    if name.len() > MAX_FILE_NAME_LEN {
        return Err(ParseError::FileNameTooLong {
            opcode,
            len: name.len(),
        });
    }
    let filename = std::str::from_utf8(name)
        .map_err(|_| ParseError::FileNameNotUtf8 { opcode })?
        .to_owned();
    if filename.is_empty() {
        return Err(ParseError::EmptyFileName { opcode });
    }
    if !mode.eq_ignore_ascii_case(b"octet") {
        return Err(ParseError::UnsupportedMode {
            opcode,
            mode: quote(&String::from_utf8_lossy(mode)),
        });
    }
    let kind = match opcode {
        Opcode::Wrq => RequestKind::Write,
        _ => RequestKind::Read,
    };
    Ok(Request {
        kind,
        filename,
        options: parse_options(opcode, rest)?,
    })
}

/// Option pairs up to the end of the datagram. A tail of NUL bytes alone is taken as padding.
fn parse_options(opcode: Opcode, body: &[u8]) -> Result<Options, ParseError> {
    let mut options = Options::default();
    let mut rest = body;
    while !rest.iter().all(|&b| b == 0) {
        let name = field(&mut rest, opcode, "option name")?;
        let value = match field(&mut rest, opcode, "option value") {
            Ok(value) => value,
            Err(_) => {
                return Err(ParseError::OptionWithoutValue {
                    opcode,
                    name: quote(&String::from_utf8_lossy(name)),
                })
            }
        };
        let (Ok(name), Ok(value)) = (std::str::from_utf8(name), std::str::from_utf8(value)) else {
            return Err(ParseError::OptionNotUtf8 { opcode });
        };
        let lower = name.to_ascii_lowercase();
        match lower.as_str() {
            "blksize" => {
                let n = number(
                    opcode,
                    "blksize",
                    value,
                    u64::from(BLKSIZE_RANGE.0),
                    u64::from(BLKSIZE_RANGE.1),
                )?;
                set(&mut options.blksize, opcode, "blksize", narrow(n))?;
            }
            "timeout" => {
                let n = number(opcode, "timeout", value, 1, 255)?;
                set(&mut options.timeout, opcode, "timeout", narrow(n))?;
            }
            "tsize" => {
                let n = number(opcode, "tsize", value, 0, u64::MAX)?;
                set(&mut options.tsize, opcode, "tsize", n)?;
            }
            "windowsize" => {
                let n = number(opcode, "windowsize", value, 1, 65535)?;
                set(&mut options.windowsize, opcode, "windowsize", narrow(n))?;
            }
            "" => return Err(ParseError::EmptyOptionName { opcode }),
            // RFC 2347: options the server does not know are ignored, not refused.
            _ => options.unknown.push((name.to_owned(), value.to_owned())),
        }
    }
    Ok(options)
}

/// A value already checked to fit.
fn narrow<T: TryFrom<u64> + Default>(n: u64) -> T {
    T::try_from(n).unwrap_or_default()
}

fn set<T>(
    slot: &mut Option<T>,
    opcode: Opcode,
    name: &'static str,
    value: T,
) -> Result<(), ParseError> {
    if slot.is_some() {
        return Err(ParseError::DuplicateOption { opcode, name });
    }
    *slot = Some(value);
    Ok(())
}

/// A decimal number within `min..=max` (RFC 2347: ASCII digits; no sign, no spaces).
fn number(
    opcode: Opcode,
    name: &'static str,
    value: &str,
    min: u64,
    max: u64,
) -> Result<u64, ParseError> {
    let bad = |reason| ParseError::BadOptionValue {
        opcode,
        name,
        value: quote(value),
        reason,
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("not a decimal number"));
    }
    let n: u64 = value.parse().map_err(|_| bad("out of range"))?;
    if n < min || n > max {
        return Err(bad("out of range"));
    }
    Ok(n)
}

/// Client-controlled text for an error message, cut to a few dozen characters.
fn quote(text: &str) -> String {
    text.chars().take(QUOTE_LEN).collect()
}

impl Packet<'_> {
    /// Appends the packet's bytes to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        match self {
            Self::Request(request) => {
                let opcode = match request.kind {
                    RequestKind::Read => Opcode::Rrq,
                    RequestKind::Write => Opcode::Wrq,
                };
                out.extend_from_slice(&(opcode as u16).to_be_bytes());
                push_field(out, request.filename.as_bytes());
                push_field(out, b"octet");
                emit_options(&request.options, out);
            }
            Self::Data { block, data } => {
                out.extend_from_slice(&(Opcode::Data as u16).to_be_bytes());
                out.extend_from_slice(&block.to_be_bytes());
                out.extend_from_slice(data);
            }
            Self::Ack { block } => {
                out.extend_from_slice(&(Opcode::Ack as u16).to_be_bytes());
                out.extend_from_slice(&block.to_be_bytes());
            }
            Self::Error { code, message } => {
                out.extend_from_slice(&(Opcode::Error as u16).to_be_bytes());
                out.extend_from_slice(&code.to_u16().to_be_bytes());
                // A NUL inside would end the message early: cut there.
                let text = message
                    .as_bytes()
                    .split(|&b| b == 0)
                    .next()
                    .unwrap_or_default();
                push_field(out, text);
            }
            Self::Oack(options) => {
                out.extend_from_slice(&(Opcode::Oack as u16).to_be_bytes());
                emit_options(options, out);
            }
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.emit(&mut out);
        out
    }
}

fn push_field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(bytes);
    out.push(0);
}

fn emit_options(options: &Options, out: &mut Vec<u8>) {
    let mut pair = |name: &str, value: &dyn fmt::Display| {
        push_field(out, name.as_bytes());
        push_field(out, value.to_string().as_bytes());
    };
    if let Some(n) = options.blksize {
        pair("blksize", &n);
    }
    if let Some(n) = options.timeout {
        pair("timeout", &n);
    }
    if let Some(n) = options.tsize {
        pair("tsize", &n);
    }
    if let Some(n) = options.windowsize {
        pair("windowsize", &n);
    }
    for (name, value) in &options.unknown {
        pair(name, value);
    }
}

/// An ERROR packet's bytes.
pub fn error_packet(code: ErrorCode, message: &str) -> Vec<u8> {
    Packet::Error {
        code,
        message: message.to_owned(),
    }
    .to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rrq(name: &str, options: Options) -> Packet<'static> {
        Packet::Request(Request {
            kind: RequestKind::Read,
            filename: name.into(),
            options,
        })
    }

    fn samples() -> Vec<Packet<'static>> {
        let all = Options {
            blksize: Some(1468),
            timeout: Some(255),
            tsize: Some(0),
            windowsize: Some(16),
            unknown: vec![
                ("Multicast".into(), String::new()),
                ("x".into(), "y".into()),
            ],
        };
        vec![
            rrq("undionly.kpxe", Options::default()),
            rrq("/boot/ipxe.efi", all.clone()),
            Packet::Request(Request {
                kind: RequestKind::Write,
                filename: "up".into(),
                options: Options {
                    tsize: Some(123_456_789_012),
                    ..Options::default()
                },
            }),
            Packet::Data {
                block: 1,
                data: &[],
            },
            Packet::Data {
                block: 65535,
                data: &[0; 512],
            },
            Packet::Ack { block: 0 },
            Packet::Ack { block: 65535 },
            Packet::Error {
                code: ErrorCode::FileNotFound,
                message: "file not found".into(),
            },
            Packet::Error {
                code: ErrorCode::Other(99),
                message: String::new(),
            },
            Packet::Oack(all),
            Packet::Oack(Options::default()),
        ]
    }

    #[test]
    fn round_trips() {
        for packet in samples() {
            let bytes = packet.to_bytes();
            assert_eq!(parse(&bytes), Ok(packet.clone()), "{bytes:?}");
        }
    }

    #[test]
    fn golden_bytes() {
        let packet = rrq(
            "a",
            Options {
                blksize: Some(1468),
                tsize: Some(0),
                ..Options::default()
            },
        );
        assert_eq!(
            packet.to_bytes(),
            b"\0\x01a\0octet\0blksize\x001468\0tsize\x000\0".to_vec()
        );
        assert_eq!(
            Packet::Data {
                block: 258,
                data: b"hi"
            }
            .to_bytes(),
            b"\0\x03\x01\x02hi".to_vec()
        );
        assert_eq!(
            error_packet(ErrorCode::NotDefined, "server busy, try again"),
            b"\0\x05\0\0server busy, try again\0".to_vec()
        );
    }

    #[test]
    fn names_and_modes_are_case_insensitive_and_padding_is_tolerated() {
        let parsed = parse(b"\0\x01f\0OcTeT\0BLKSIZE\x001024\0WindowSize\x004\0\0\0").unwrap();
        assert_eq!(
            parsed,
            rrq(
                "f",
                Options {
                    blksize: Some(1024),
                    windowsize: Some(4),
                    ..Options::default()
                }
            )
        );
        // Trailing bytes after an ACK's block number, and an ERROR without its NUL.
        assert_eq!(parse(b"\0\x04\0\x07xyz"), Ok(Packet::Ack { block: 7 }));
        assert_eq!(
            parse(b"\0\x05\0\x08no tsize"),
            Ok(Packet::Error {
                code: ErrorCode::OptionNegotiation,
                message: "no tsize".into()
            })
        );
    }

    /// Offsets where a request (`is_request`: after file name and mode) or an OACK may be cut
    /// and still be a packet: after its fixed part and after each option value.
    fn pair_boundaries(bytes: &[u8], is_request: bool) -> Vec<usize> {
        let nuls = (2..bytes.len()).filter(|&i| bytes[i] == 0);
        // Every second NUL ends a pair (requests: the mode's, then each value's).
        let ends = nuls.skip(1).step_by(2).map(|at| at + 1);
        if is_request {
            ends.collect()
        } else {
            std::iter::once(2).chain(ends).collect()
        }
    }

    #[test]
    fn every_truncation_is_an_error_unless_it_ends_a_field() {
        for packet in samples() {
            let bytes = packet.to_bytes();
            let boundaries = match &packet {
                Packet::Request(_) => pair_boundaries(&bytes, true),
                Packet::Oack(_) => pair_boundaries(&bytes, false),
                _ => Vec::new(),
            };
            for cut in 0..bytes.len() {
                let prefix = &bytes[..cut];
                let result = parse(prefix);
                match (&packet, result) {
                    (Packet::Request(_) | Packet::Oack(_), Ok(shorter)) => {
                        assert!(
                            boundaries.contains(&cut),
                            "{prefix:?} parsed as {shorter:?}"
                        );
                        assert_eq!(shorter.to_bytes(), prefix);
                    }
                    (Packet::Request(_) | Packet::Oack(_), Err(_)) => {
                        assert!(!boundaries.contains(&cut), "{prefix:?} refused");
                    }
                    // DATA may be shorter, an ERROR's text may be cut: only the header counts.
                    (Packet::Data { .. } | Packet::Error { .. }, result) => {
                        assert_eq!(result.is_ok(), cut >= 4, "{prefix:?}");
                    }
                    (_, result) => assert!(result.is_err(), "{prefix:?}"),
                }
            }
        }
    }

    fn refused(datagram: &[u8]) -> (ErrorCode, String) {
        let error = parse(datagram).unwrap_err();
        assert!(error.is_request(), "{error:?}");
        (error.reply_code(), error.to_string())
    }

    #[test]
    fn bad_requests_get_a_reason() {
        let long = format!("\0\x01{}\0octet\0", "a".repeat(300));
        let cases: Vec<(Vec<u8>, ErrorCode, &str)> = vec![
            (
                b"\0\x01\xff\xfe.bin\0octet\0".to_vec(),
                ErrorCode::NotDefined,
                "not UTF-8",
            ),
            (
                long.into_bytes(),
                ErrorCode::NotDefined,
                "300 bytes is too long",
            ),
            (
                b"\0\x01\0octet\0".to_vec(),
                ErrorCode::NotDefined,
                "empty file name",
            ),
            (
                b"\0\x01f\0netascii\0".to_vec(),
                ErrorCode::IllegalOperation,
                "\"netascii\" is not supported",
            ),
            (
                b"\0\x02f\0mail\0".to_vec(),
                ErrorCode::IllegalOperation,
                "\"mail\" is not supported",
            ),
            (
                b"\0\x01f\0octet".to_vec(),
                ErrorCode::IllegalOperation,
                "mode is not NUL-terminated",
            ),
            (
                b"\0\x01f".to_vec(),
                ErrorCode::IllegalOperation,
                "file name is not NUL-terminated",
            ),
            (
                b"\0\x01f\0octet\0blksize\0".to_vec(),
                ErrorCode::IllegalOperation,
                "\"blksize\" has no value",
            ),
            (
                b"\0\x01f\0octet\0\x00512\0".to_vec(),
                ErrorCode::IllegalOperation,
                "empty option name",
            ),
            (
                b"\0\x01f\0octet\0b\xffz\0x\0".to_vec(),
                ErrorCode::IllegalOperation,
                "not UTF-8",
            ),
            (
                b"\0\x01f\0octet\0blksize\0abc\0".to_vec(),
                ErrorCode::OptionNegotiation,
                "not a decimal number",
            ),
            (
                b"\0\x01f\0octet\0blksize\0-1\0".to_vec(),
                ErrorCode::OptionNegotiation,
                "not a decimal number",
            ),
            (
                b"\0\x01f\0octet\0blksize\x004\0".to_vec(),
                ErrorCode::OptionNegotiation,
                "out of range",
            ),
            (
                b"\0\x01f\0octet\0blksize\x0065465\0".to_vec(),
                ErrorCode::OptionNegotiation,
                "out of range",
            ),
            (
                b"\0\x01f\0octet\0timeout\x000\0".to_vec(),
                ErrorCode::OptionNegotiation,
                "out of range",
            ),
            (
                b"\0\x01f\0octet\0timeout\x00256\0".to_vec(),
                ErrorCode::OptionNegotiation,
                "out of range",
            ),
            (
                b"\0\x01f\0octet\0windowsize\x000\0".to_vec(),
                ErrorCode::OptionNegotiation,
                "out of range",
            ),
            (
                b"\0\x01f\0octet\0tsize\x0099999999999999999999\0".to_vec(),
                ErrorCode::OptionNegotiation,
                "out of range",
            ),
            (
                b"\0\x01f\0octet\0blksize\x00512\0BlkSize\x00512\0".to_vec(),
                ErrorCode::OptionNegotiation,
                "given twice",
            ),
        ];
        for (datagram, code, text) in cases {
            let (got_code, message) = refused(&datagram);
            assert_eq!(got_code, code, "{datagram:?}: {message}");
            assert!(
                message.contains(text),
                "{datagram:?}: {message:?} lacks {text:?}"
            );
            assert!(message.len() < 120, "{message:?}");
        }
        // A client's option value is quoted, not copied whole.
        let huge = format!("\0\x01f\0octet\0blksize\0{}\0", "9".repeat(400));
        assert!(refused(huge.as_bytes()).1.len() < 120);
    }

    #[test]
    fn garbage_that_is_not_a_request_is_not_answered() {
        for datagram in [
            &b""[..],
            b"\0",
            b"\0\x07xx",
            b"\xff\xff",
            b"\0\x04\0",
            b"\0\x03\x01",
        ] {
            let error = parse(datagram).unwrap_err();
            assert!(!error.is_request(), "{datagram:?}: {error}");
        }
    }

    /// xorshift64*: deterministic, dependency-free noise for the mutation test.
    struct Noise(u64);

    impl Noise {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    #[test]
    fn random_mutations_never_panic_and_reparse_identically() {
        let seeds: Vec<Vec<u8>> = samples().iter().map(Packet::to_bytes).collect();
        let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let mut bytes = seeds[noise.below(seeds.len())].clone();
            for _ in 0..=noise.below(4) {
                let at = noise.below(bytes.len() + 1);
                match noise.below(5) {
                    0 if at < bytes.len() => bytes[at] = noise.next() as u8,
                    1 => bytes.insert(at, noise.next() as u8),
                    2 => bytes.insert(at, 0),
                    3 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    _ => bytes.truncate(at),
                }
            }
            if let Ok(packet) = parse(&bytes) {
                accepted += 1;
                assert_eq!(parse(&packet.to_bytes()), Ok(packet), "{bytes:?}");
            }
        }
        assert!(
            accepted > 1000,
            "mutations too destructive to test emit: {accepted}"
        );
    }
}
