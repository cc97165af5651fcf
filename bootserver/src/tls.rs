//! HTTPS for the API, the console and uploads (`[https]` in the config): the certificate and
//! key (PEM files, or a self-signed pair made once in `state_dir`), the rustls server config, and
//! what plain HTTP still answers once HTTPS is on.
//!
//! Boot files stay on plain HTTP: firmware and iPXE cannot check our certificate, and what they
//! fetch is checked another way (the agent's kernel and initramfs are what the server was given;
//! images carry signed manifests and chunk hashes). What must not cross the LAN in clear is a
//! token: the admin token, a task's one-time token, the console's login cookie. So with HTTPS on,
//! plain HTTP refuses every write, every login and every request carrying a credential, naming
//! the https:// URL to use instead.

use crate::config::{HttpsIdentity, HttpsPolicy};
use crate::http::ServerAddr;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use diskcast_proto::trust::CertFingerprint;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The generated pair: key and certificate in one file (0600), written whole or not at all.
pub const GENERATED_IDENTITY: &str = "https-identity.pem";
/// The generated certificate alone, for `curl --cacert` and browsers (public).
pub const GENERATED_CERT: &str = "https-cert.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("[https] {what} {path}: cannot read it")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("[https] {what} {path} is not PEM: {message}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("[https] cert {path} holds no certificate (`-----BEGIN CERTIFICATE-----`)")]
    NoCertificate { path: PathBuf },
    #[error("[https] key {path} holds no private key (`-----BEGIN PRIVATE KEY-----`, PKCS#8, or an RSA/EC key)")]
    NoKey { path: PathBuf },
    #[error("[https] key {key} is not usable: {message}")]
    BadKey { key: PathBuf, message: String },
    #[error("[https] key {key} does not belong to the certificate in {cert}: give the key the certificate was made for")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("[https] {path} exists but {missing} does not: restore it, or remove both to have a new self-signed certificate made (agents then need the new fingerprint)")]
    HalfGenerated { path: PathBuf, missing: PathBuf },
    #[error("making the self-signed HTTPS certificate")]
    Generate(#[source] rcgen::Error),
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up TLS: {0}")]
    Rustls(#[source] rustls::Error),
}

/// What the HTTPS listener presents.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// SHA-256 of the first certificate: what agents pin.
    pub fingerprint: CertFingerprint,
    /// Where it came from, for the log.
    pub origin: String,
}

/// SHA-256 of a certificate's DER bytes (`openssl x509 -fingerprint -sha256`).
pub fn fingerprint(der: &[u8]) -> CertFingerprint {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    CertFingerprint(out)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.into(),
        source,
    })
}

/// Certificates and key from PEM text, checked to belong together.
fn parse_pair(
    cert_pem: &[u8],
    cert_path: &Path,
    key_pem: &[u8],
    key_path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what: "cert",
            path: cert_path.into(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: key_path.into(),
        },
        e => TlsError::Pem {
            what: "key",
            path: key_path.into(),
            message: e.to_string(),
        },
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::BadKey {
            key: key_path.into(),
            message: e.to_string(),
        })?;
    match rustls::sign::CertifiedKey::new(chain.clone(), signing).keys_match() {
        Ok(()) => Ok((chain, key)),
        // The key's public half could not be derived: rustls checks again in the handshake.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok((chain, key)),
        Err(_) => Err(TlsError::Mismatch {
            cert: cert_path.into(),
            key: key_path.into(),
        }),
    }
}

fn identity(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    origin: String,
) -> Identity {
    let fingerprint = fingerprint(chain.first().map_or(&[][..], |c| c.as_ref()));
    Identity {
        chain,
        key,
        fingerprint,
        origin,
    }
}

/// Reads the configured certificate and key; checks they belong together.
pub fn load_files(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    let (chain, key_der) = parse_pair(&read_pem("cert", cert)?, cert, &read_pem("key", key)?, key)?;
    Ok(identity(chain, key_der, cert.display().to_string()))
}

/// The identity `policy` names; a self-signed one is made once in `state_dir` (naming `names`,
/// the server's addresses) and reused on every later start, so pinned agents keep trusting it.
pub fn load_or_create(
    policy: &HttpsPolicy,
    state_dir: &Path,
    names: &[String],
) -> Result<Identity, TlsError> {
    match &policy.identity {
        HttpsIdentity::Files { cert, key } => load_files(cert, key),
        HttpsIdentity::Generated => {
            if let Some(found) = load_generated(state_dir)? {
                return Ok(found);
            }
            generate(state_dir, names)?;
            load_generated(state_dir)?.ok_or_else(|| TlsError::Read {
                what: "generated identity",
                path: state_dir.join(GENERATED_IDENTITY),
                source: std::io::ErrorKind::NotFound.into(),
            })
        }
    }
}

/// What agents are told about the HTTPS API, from the identity already there (none is made: for
/// the admin's commands, which change nothing). `None` with HTTPS off, or before the first start
/// made the self-signed certificate.
pub fn advertised(
    config: &crate::config::Config,
) -> Result<Option<diskcast_proto::cmdline::HttpsApi>, TlsError> {
    let Some(policy) = &config.https else {
        return Ok(None);
    };
    let identity = match &policy.identity {
        HttpsIdentity::Files { cert, key } => Some(load_files(cert, key)?),
        HttpsIdentity::Generated => load_generated(&config.state_dir)?,
    };
    Ok(identity.map(|i| diskcast_proto::cmdline::HttpsApi {
        port: policy.port,
        pin: i.fingerprint,
    }))
}

/// The self-signed identity in `state_dir`, if it was made.
pub fn load_generated(state_dir: &Path) -> Result<Option<Identity>, TlsError> {
    let path = state_dir.join(GENERATED_IDENTITY);
    let cert_path = state_dir.join(GENERATED_CERT);
    let pem = match std::fs::read(&path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if cert_path.exists() {
                return Err(TlsError::HalfGenerated {
                    path: cert_path,
                    missing: path,
                });
            }
            return Ok(None);
        }
        Err(source) => {
            return Err(TlsError::Read {
                what: "generated identity",
                path,
                source,
            })
        }
    };
    let (chain, key) = parse_pair(&pem, &path, &pem, &path)?;
    let found = identity(chain, key, format!("{} (self-signed)", path.display()));
    // The public copy is derived: rewritten when missing.
    if !cert_path.exists() {
        write_cert_copy(&cert_path, &found)?;
    }
    Ok(Some(found))
}

fn write_cert_copy(path: &Path, identity: &Identity) -> Result<(), TlsError> {
    let pem: String = identity.chain.iter().map(|c| pem_cert(c)).collect();
    std::fs::write(path, pem).map_err(|source| TlsError::Write {
        path: path.into(),
        source,
    })
}

fn pem_cert(der: &[u8]) -> String {
    let b64 = base64(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Makes the self-signed pair and writes it in one file, atomically (temporary file, rename):
/// a crash leaves either nothing or the whole pair.
fn generate(state_dir: &Path, names: &[String]) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut names: Vec<String> = names.to_vec();
    names.push("diskcast-bootserver".into());
    let made = rcgen::generate_simple_self_signed(names).map_err(TlsError::Generate)?;
    let pem = format!("{}{}", made.signing_key.serialize_pem(), made.cert.pem());
    let path = state_dir.join(GENERATED_IDENTITY);
    let temporary = state_dir.join(format!("{GENERATED_IDENTITY}.partial"));
    let write_err = |source| TlsError::Write {
        path: temporary.clone(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(write_err)?;
    let _ = std::fs::remove_file(&temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(write_err)?;
    file.write_all(pem.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(write_err)?;
    std::fs::rename(&temporary, &path).map_err(|source| TlsError::Write {
        path: path.clone(),
        source,
    })?;
    log::info!(
        "https: made a self-signed certificate in {} (kept across restarts)",
        path.display()
    );
    Ok(())
}

/// The rustls server config for `identity`: TLS 1.2 and 1.3, HTTP/1.1.
pub fn server_config(identity: &Identity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(TlsError::Rustls)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Where plain HTTP sends what it refuses.
#[derive(Debug, Clone, Copy)]
pub struct HttpsPort(pub u16);

/// Whether a plain-HTTP request would put a credential or a change on the wire in clear.
fn needs_https(request: &Request) -> bool {
    let safe_method = matches!(*request.method(), Method::GET | Method::HEAD);
    let headers = request.headers();
    !safe_method
        || headers.contains_key(header::AUTHORIZATION)
        || crate::console::login::cookie(headers).is_some()
        || request
            .uri()
            .query()
            .is_some_and(|q| q.to_ascii_lowercase().contains("token"))
}

/// On the plain-HTTP listener when HTTPS is on: boot files and open reads pass; writes, logins
/// and anything carrying a token are refused with the https:// URL to use. The console's page
/// is sent to HTTPS, where its login works.
pub async fn refuse_in_clear(
    State(HttpsPort(port)): State<HttpsPort>,
    Extension(ServerAddr(local)): Extension<ServerAddr>,
    request: Request,
    next: Next,
) -> Response {
    let path_and_query = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let url = format!("https://{}:{port}{path_and_query}", local.ip());
    if request.uri().path() == "/" && !needs_https(&request) {
        let mut response = StatusCode::PERMANENT_REDIRECT.into_response();
        if let Ok(location) = HeaderValue::from_str(&url) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        return response;
    }
    if !needs_https(&request) {
        return next.run(request).await;
    }
    let message = format!(
        "this server takes writes, logins and tokens only over HTTPS, so that no credential \
         crosses the network in clear: use {url} (`bootserver key https` on the server prints \
         its certificate's SHA-256 fingerprint, for `agent capture --pin` or `curl`)"
    );
    log::warn!(
        "http: refused {} {} in clear (HTTPS is on); if it carried a token, that token crossed the network unencrypted",
        request.method(),
        request.uri().path()
    );
    let mut response = if request.uri().path().starts_with("/api/") {
        (
            StatusCode::FORBIDDEN,
            axum::Json(serde_json::json!({ "error": message })),
        )
            .into_response()
    } else {
        (
            StatusCode::FORBIDDEN,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("{message}\n"),
        )
            .into_response()
    };
    // The body is the whole answer: a client that sent `Expect: 100-continue` (a capture) gets it
    // before sending its disk.
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// On the HTTPS listener: cookies it sets are `Secure`, so a browser never sends the login back
/// over plain HTTP.
pub async fn secure_cookies(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let cookies: Vec<HeaderValue> = response
        .headers_mut()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| HeaderValue::from_str(&format!("{v}; Secure")).ok())
        .collect();
    if !cookies.is_empty() {
        response.headers_mut().remove(header::SET_COOKIE);
        for cookie in cookies {
            response.headers_mut().append(header::SET_COOKIE, cookie);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let made = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let (cert, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("diskcast-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn configured_files_are_checked_with_errors_naming_the_file() {
        let dir = scratch("files");
        let (cert, key) = pair(&dir, "a");
        let (_, other_key) = pair(&dir, "b");
        let loaded = load_files(&cert, &key).unwrap();
        let der = loaded.chain[0].as_ref().to_vec();
        assert_eq!(loaded.fingerprint, fingerprint(&der));
        server_config(&loaded).unwrap();

        let missing = dir.join("gone.key");
        let err = load_files(&cert, &missing).unwrap_err().to_string();
        assert!(err.contains("key") && err.contains("gone.key"), "{err}");

        let err = load_files(&cert, &other_key).unwrap_err().to_string();
        assert!(
            err.contains("does not belong to the certificate") && err.contains("b.key"),
            "{err}"
        );
        // Swapped: the key file holds a certificate, the cert file a key.
        let err = load_files(&key, &cert).unwrap_err().to_string();
        assert!(err.contains("holds no certificate"), "{err}");
        let err = load_files(&cert, &cert).unwrap_err().to_string();
        assert!(err.contains("holds no private key"), "{err}");
        std::fs::write(dir.join("junk.crt"), "-----BEGIN CERTIFICATE-----\n!!!\n").unwrap();
        let err = load_files(&dir.join("junk.crt"), &key)
            .unwrap_err()
            .to_string();
        assert!(err.contains("junk.crt"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_self_signed_certificate_is_made_once_and_kept() {
        let dir = scratch("generated");
        let policy = HttpsPolicy {
            port: 8443,
            identity: HttpsIdentity::Generated,
        };
        let first = load_or_create(&policy, &dir, &["10.77.0.1".into()]).unwrap();
        let again = load_or_create(&policy, &dir, &["10.99.0.1".into()]).unwrap();
        assert_eq!(first.fingerprint, again.fingerprint);
        let public = std::fs::read(dir.join(GENERATED_CERT)).unwrap();
        let copy: Vec<_> = CertificateDer::pem_slice_iter(&public)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(copy, first.chain, "the public copy is the certificate");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(GENERATED_IDENTITY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is readable by its owner only");
        // The certificate without its key is not silently replaced by a new one.
        std::fs::remove_file(dir.join(GENERATED_IDENTITY)).unwrap();
        let err = load_or_create(&policy, &dir, &[]).unwrap_err().to_string();
        assert!(err.contains("remove both"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
