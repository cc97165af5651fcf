//! Signing keys on disk, shared by the agent and the bootserver: a key file holds one secret
//! (see [`diskcast_proto::trust::SigningKey::key_file`]), is created readable by its owner only,
//! and is never overwritten.

use diskcast_proto::trust::{KeyError, SigningKey};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a diskcast key file")]
    Key {
        path: PathBuf,
        #[source]
        source: KeyError,
    },
    #[error("{path} exists: a key file is never overwritten (delete it first, or use it)")]
    Exists { path: PathBuf },
    #[error("drawing random bytes for a new key")]
    Random(#[source] getrandom::Error),
    #[error("{path} can be read by other users (mode {mode:o}): `chmod 600` it")]
    Readable { path: PathBuf, mode: u32 },
}

/// A fresh key from the operating system's random source.
pub fn new_key() -> Result<SigningKey, KeyFileError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(KeyFileError::Random)?;
    Ok(SigningKey::from_seed(seed))
}

/// Reads a key file; refuses one that others can read (a secret that leaked is no key).
pub fn read_key(path: &Path) -> Result<SigningKey, KeyFileError> {
    let io = |op| {
        let path = path.to_path_buf();
        move |source| KeyFileError::Io { path, op, source }
    };
    let mode = std::fs::metadata(path)
        .map_err(io("reading"))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Readable {
            path: path.into(),
            mode: mode & 0o777,
        });
    }
    let text = std::fs::read_to_string(path).map_err(io("reading"))?;
    SigningKey::from_key_file(&text).map_err(|source| KeyFileError::Key {
        path: path.into(),
        source,
    })
}

/// Writes `key` to a new file (mode 0600); an existing file is left alone and refused.
pub fn write_key(path: &Path, key: &SigningKey) -> Result<(), KeyFileError> {
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(KeyFileError::Exists { path: path.into() })
        }
        Err(source) => {
            return Err(KeyFileError::Io {
                path: path.into(),
                op: "creating",
                source,
            })
        }
    };
    file.write_all(key.key_file().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| KeyFileError::Io {
            path: path.into(),
            op: "writing",
            source,
        })
}

/// The key in `path`, made there first if there is none (a server's key on its first start).
pub fn load_or_create(path: &Path) -> Result<SigningKey, KeyFileError> {
    match read_key(path) {
        Err(KeyFileError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            let key = new_key()?;
            match write_key(path, &key) {
                Ok(()) => Ok(key),
                // Another process made it meanwhile: use theirs.
                Err(KeyFileError::Exists { .. }) => read_key(path),
                Err(e) => Err(e),
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_made_once_private_and_read_back() {
        let dir = std::env::temp_dir().join(format!("diskcast-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("signing-key");
        let made = load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create(&path).unwrap(), made, "made only once");
        assert!(matches!(
            write_key(&path, &new_key().unwrap()),
            Err(KeyFileError::Exists { .. })
        ));
        assert_eq!(read_key(&path).unwrap(), made);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_key(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        let junk = dir.join("junk");
        std::fs::write(&junk, "hello\n").unwrap();
        std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(read_key(&junk), Err(KeyFileError::Key { .. })));
        assert_ne!(new_key().unwrap(), new_key().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
