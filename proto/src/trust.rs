//! Who may send a session and who made a stored image: Ed25519 keys, the statements they sign,
//! and what a receiver trusts.
//!
//! A multicast group on a lab LAN is open to anyone, and a slave overwrites its whole disk with
//! what the group carries. So the sender signs what steers a receiver — every Announce, the
//! Welcome to each receiver, the DoneAck and the End — and the receiver checks the signature
//! against the keys it trusts before it joins, acts or writes. The Announce names the image hash,
//! the hash covers the manifest, the manifest holds a BLAKE3 hash per chunk, and a chunk is
//! checked before it is written: one signature authenticates every byte, without per-datagram
//! cryptography on the data path.
//!
//! What a signature covers (its *statement*) always starts with a domain string, so a signature
//! made for one purpose never verifies for another:
//!
//! - a datagram: `"diskcast session v3\0"`, the sender's socket address as the receiver sees it
//!   (family byte 4 or 6, address, port), for Welcome and DoneAck the receiver's incarnation,
//!   then the datagram without its signature field and CRC. The address binds a session to the
//!   host that announced it: a copy replayed from another host does not verify. The incarnation
//!   binds a Welcome to one run of a receiver: a Welcome recorded for an earlier run cannot end
//!   the next one.
//! - a stored image: `"diskcast image v1\0"` and the image hash; the signature sits in the
//!   manifest's signature field.
//!
//! Keys travel as 64 hex digits: a public key on a kernel command line (`diskcast.trust=`) or a
//! CLI (`--trust`); a secret key (its 32-byte seed) in a key file readable by its owner only.

use crate::manifest::{Hash, Manifest};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// Bytes of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
const SESSION_DOMAIN: &[u8] = b"diskcast session v3\0";
const IMAGE_DOMAIN: &[u8] = b"diskcast image v1\0";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("{what} must be 64 hex digits (32 bytes), got {len} characters")]
    Length { what: &'static str, len: usize },
    #[error("{what} is not hex (use 0-9 and a-f)")]
    NotHex { what: &'static str },
    #[error("{what} is not a valid Ed25519 public key")]
    NotAPoint { what: &'static str },
    #[error("the key file holds no key line (64 hex digits)")]
    EmptyKeyFile,
}

fn decode_hex32(text: &str, what: &'static str) -> Result<[u8; 32], KeyError> {
    let text = text.trim();
    if text.len() != 64 {
        return Err(KeyError::Length {
            what,
            len: text.chars().count(),
        });
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        let pair = text
            .get(2 * i..2 * i + 2)
            .ok_or(KeyError::NotHex { what })?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| KeyError::NotHex { what })?;
    }
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An Ed25519 key that signs sessions and images. Its secret never appears in debug output.
#[derive(Clone)]
pub struct SigningKey(ed25519_dalek::SigningKey);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey {{ public: {}, secret: … }}", self.public())
    }
}

impl PartialEq for SigningKey {
    fn eq(&self, other: &Self) -> bool {
        self.public() == other.public()
    }
}
impl Eq for SigningKey {}

impl SigningKey {
    /// The key made from 32 random bytes (the caller owns the randomness: this crate does no I/O).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// A key from its 64 hex digits (the seed), as `diskcast.sign=` carries it.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        decode_hex32(text, "a signing key").map(Self::from_seed)
    }

    /// The seed as 64 hex digits: the secret. Only for key files and a master's command line.
    pub fn secret_hex(&self) -> String {
        hex(&self.0.to_bytes())
    }

    /// A key file: comment lines (`#`) and one line with the seed's hex digits.
    pub fn from_key_file(text: &str) -> Result<Self, KeyError> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or(KeyError::EmptyKeyFile)?;
        Self::from_hex(line)
    }

    /// What [`SigningKey::from_key_file`] reads back.
    pub fn key_file(&self) -> String {
        format!(
            "# diskcast signing key (secret: keep this file readable by its owner only)\n\
             # public key: {}\n{}\n",
            self.public(),
            self.secret_hex()
        )
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// A key of its own for `purpose`, derived from this one (BLAKE3 key derivation): whoever
    /// holds this key can make it again, nobody else can. The bootserver gives each peer
    /// master task one, so the server's own secret never leaves the server.
    pub fn derive(&self, purpose: &str) -> SigningKey {
        let seed = blake3::derive_key(
            &format!("diskcast derived key: {purpose}"),
            &self.0.to_bytes(),
        );
        Self::from_seed(seed)
    }

    pub fn sign(&self, statement: &[u8]) -> [u8; SIGNATURE_LEN] {
        use ed25519_dalek::Signer;
        self.0.sign(statement).to_bytes()
    }
}

/// An Ed25519 public key; shown and parsed as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(self.0.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(text: &str) -> Result<Self, KeyError> {
        let what = "a public key";
        let bytes = decode_hex32(text, what)?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|_| KeyError::NotAPoint { what })
    }
}

impl PublicKey {
    /// The first 16 hex digits: enough to tell keys apart in a log line.
    pub fn short(&self) -> String {
        hex(&self.0.as_bytes()[..8])
    }

    /// Strict verification (no malleable or small-order signatures).
    pub fn verifies(&self, statement: &[u8], signature: &[u8]) -> bool {
        let Ok(bytes) = <[u8; SIGNATURE_LEN]>::try_from(signature) else {
            return false;
        };
        let signature = ed25519_dalek::Signature::from_bytes(&bytes);
        self.0.verify_strict(statement, &signature).is_ok()
    }
}

/// Why a signed thing is not trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    #[error("it is unsigned")]
    Unsigned,
    #[error("it is not signed by a key this receiver trusts")]
    UnknownKey,
}

/// Whose signatures a receiver accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Anyone's, and no signature at all: only on a network nobody else can reach.
    Any,
    /// Only these keys' (none: nothing is trusted).
    Keys(Vec<PublicKey>),
}

impl Default for Trust {
    /// Nothing: an edge that forgets to say whom it trusts joins no session.
    fn default() -> Self {
        Self::Keys(Vec::new())
    }
}

impl Trust {
    /// `Ok` with the key that signed, or `Ok(None)` when anything is trusted.
    pub fn check(
        &self,
        statement: &[u8],
        signature: &[u8],
    ) -> Result<Option<PublicKey>, Untrusted> {
        match self {
            Self::Any => Ok(None),
            Self::Keys(_) if signature.is_empty() => Err(Untrusted::Unsigned),
            Self::Keys(keys) => keys
                .iter()
                .find(|k| k.verifies(statement, signature))
                .map(|k| Some(*k))
                .ok_or(Untrusted::UnknownKey),
        }
    }

    pub fn is_any(&self) -> bool {
        matches!(self, Self::Any)
    }
}

/// The statement a datagram's signature covers; `content` is the datagram without its signature
/// field and CRC, `incarnation` the receiver's for Welcome and DoneAck.
pub fn datagram_statement(sender: SocketAddr, incarnation: Option<u32>, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SESSION_DOMAIN.len() + 24 + content.len());
    out.extend_from_slice(SESSION_DOMAIN);
    match sender {
        SocketAddr::V4(a) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            out.push(6);
            out.extend_from_slice(&a.ip().octets());
        }
    }
    out.extend_from_slice(&sender.port().to_be_bytes());
    if let Some(incarnation) = incarnation {
        out.extend_from_slice(&incarnation.to_be_bytes());
    }
    out.extend_from_slice(content);
    out
}

/// The statement a stored image's signature covers.
pub fn image_statement(image_hash: &Hash) -> Vec<u8> {
    [IMAGE_DOMAIN, image_hash.as_slice()].concat()
}

/// Signs a manifest (its signature field; the image hash does not change).
pub fn sign_manifest(manifest: &mut Manifest, key: &SigningKey) {
    manifest.signature = key.sign(&image_statement(&manifest.image_hash())).to_vec();
}

/// Which of `keys` signed `manifest`.
pub fn manifest_signer(manifest: &Manifest, keys: &[PublicKey]) -> Result<PublicKey, Untrusted> {
    Trust::Keys(keys.to_vec())
        .check(
            &image_statement(&manifest.image_hash()),
            &manifest.signature,
        )?
        .ok_or(Untrusted::UnknownKey)
}

/// A comma-separated list of public keys, as `diskcast.trust=` and `--trust` take several.
pub fn parse_key_list(text: &str) -> Result<Vec<PublicKey>, KeyError> {
    text.split(',')
        .filter(|k| !k.trim().is_empty())
        .map(|k| k.trim().parse())
        .collect()
}

/// The SHA-256 fingerprint of a TLS certificate (of its DER bytes, as `openssl x509
/// -fingerprint -sha256` prints it): what an agent pins to trust the bootserver's HTTPS API
/// without a certificate authority (`diskcast.pin=`, `agent capture --pin`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CertFingerprint(pub [u8; 32]);

impl CertFingerprint {
    /// What the error messages call the value.
    pub const EXPECTED: &'static str =
        "a SHA-256 certificate fingerprint: 64 hex digits, optionally in pairs separated by `:`";
}

impl fmt::Display for CertFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for CertFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertFingerprint({self})")
    }
}

impl FromStr for CertFingerprint {
    type Err = KeyError;

    /// 64 hex digits, either case, with or without the `:` between pairs that OpenSSL prints.
    fn from_str(text: &str) -> Result<Self, KeyError> {
        let what = "a certificate fingerprint";
        let text = text.trim();
        let text = text
            .strip_prefix("sha256:")
            .or_else(|| text.strip_prefix("SHA256:"))
            .unwrap_or(text);
        let plain: String = if text.contains(':') {
            let pairs: Vec<&str> = text.split(':').collect();
            if pairs.iter().any(|p| p.len() != 2) {
                return Err(KeyError::NotHex { what });
            }
            pairs.concat()
        } else {
            text.into()
        };
        decode_hex32(&plain.to_ascii_lowercase(), what).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_read_plain_and_openssl_forms_and_print_plain() {
        let plain = "ab".repeat(32);
        let pin: CertFingerprint = plain.parse().unwrap();
        assert_eq!(pin.to_string(), plain);
        let openssl = vec!["AB"; 32].join(":");
        assert_eq!(openssl.parse::<CertFingerprint>(), Ok(pin));
        assert_eq!(
            format!("sha256:{plain}").parse::<CertFingerprint>(),
            Ok(pin)
        );
        for bad in ["", "ab", "a:bab", &"zz".repeat(32), &"ab".repeat(33)] {
            assert!(bad.parse::<CertFingerprint>().is_err(), "{bad}");
        }
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_seed([seed; 32])
    }

    #[test]
    fn keys_round_trip_as_hex_and_key_files_and_secrets_stay_out_of_debug() {
        let k = key(7);
        let public: PublicKey = k.public().to_string().parse().unwrap();
        assert_eq!(public, k.public());
        assert_eq!(SigningKey::from_hex(&k.secret_hex()).unwrap(), k);
        assert_eq!(SigningKey::from_key_file(&k.key_file()).unwrap(), k);
        assert!(!format!("{k:?}").contains(&k.secret_hex()));
        assert!(format!("{k:?}").contains(&public.to_string()));
        for (bad, want) in [
            ("abc", "64 hex digits"),
            (&"zz".repeat(32)[..], "not hex"),
            (&"é".repeat(32)[..], "not hex"),
        ] {
            let err = bad.parse::<PublicKey>().unwrap_err().to_string();
            assert!(err.contains(want), "{bad}: {err}");
        }
        assert_eq!(
            SigningKey::from_key_file("# only a comment\n"),
            Err(KeyError::EmptyKeyFile)
        );
        let list = parse_key_list(&format!("{},{}", key(1).public(), key(2).public())).unwrap();
        assert_eq!(list, [key(1).public(), key(2).public()]);
        assert!(parse_key_list("00,11").is_err());
    }

    #[test]
    fn a_signature_verifies_only_for_its_key_statement_and_context() {
        let (k, other) = (key(1), key(2));
        let from = SocketAddr::from(([10, 0, 0, 1], 4000));
        let statement = datagram_statement(from, None, b"announce");
        let signature = k.sign(&statement);
        let trust = Trust::Keys(vec![other.public(), k.public()]);
        assert_eq!(trust.check(&statement, &signature), Ok(Some(k.public())));
        assert_eq!(trust.check(&statement, &[]), Err(Untrusted::Unsigned));
        let only_other = Trust::Keys(vec![other.public()]);
        assert_eq!(
            only_other.check(&statement, &signature),
            Err(Untrusted::UnknownKey)
        );
        assert_eq!(
            Trust::default().check(&statement, &signature),
            Err(Untrusted::UnknownKey)
        );
        assert_eq!(Trust::Any.check(&statement, &[]), Ok(None));
        // Another host, another run of the receiver, other content: none verifies.
        let elsewhere =
            datagram_statement(SocketAddr::from(([10, 0, 0, 2], 4000)), None, b"announce");
        let other_port =
            datagram_statement(SocketAddr::from(([10, 0, 0, 1], 4001)), None, b"announce");
        let with_incarnation = datagram_statement(from, Some(1), b"announce");
        for changed in [
            elsewhere,
            other_port,
            with_incarnation,
            datagram_statement(from, None, b"announcE"),
        ] {
            assert!(trust.check(&changed, &signature).is_err());
        }
        let mut flipped = signature;
        flipped[10] ^= 1;
        assert!(trust.check(&statement, &flipped).is_err());
        assert!(trust.check(&statement, &signature[..63]).is_err());
        // An image signature is not a datagram signature, and the other way round.
        let hash = [9u8; 32];
        let image_sig = k.sign(&image_statement(&hash));
        assert!(!k
            .public()
            .verifies(&datagram_statement(from, None, &hash), &image_sig));
    }

    #[test]
    fn manifests_are_signed_without_changing_their_hash() {
        let mut manifest = Manifest {
            image_size: 8192,
            chunk_size: 4096,
            chunks: vec![
                crate::manifest::ChunkKind::Zero,
                crate::manifest::ChunkKind::Data([3; 32]),
            ],
            signature: Vec::new(),
        };
        let hash = manifest.image_hash();
        let k = key(5);
        assert_eq!(
            manifest_signer(&manifest, &[k.public()]),
            Err(Untrusted::Unsigned)
        );
        sign_manifest(&mut manifest, &k);
        assert_eq!(manifest.image_hash(), hash);
        assert_eq!(
            manifest_signer(&manifest, &[key(6).public(), k.public()]),
            Ok(k.public())
        );
        assert_eq!(
            manifest_signer(&manifest, &[key(6).public()]),
            Err(Untrusted::UnknownKey)
        );
        // Any change to the content breaks the signature.
        manifest.chunks[0] = crate::manifest::ChunkKind::Absent;
        assert_eq!(
            manifest_signer(&manifest, &[k.public()]),
            Err(Untrusted::UnknownKey)
        );
    }
}
