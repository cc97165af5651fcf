//! Helpers for tests that need the real thing.

use std::path::{Path, PathBuf};

/// A tmpfs of `size` (e.g. `"512k"`) mounted on a fresh directory, unmounted when dropped: a
/// disk that really fills up. Tests using it run as root, as CI does.
pub struct TinyFs {
    dir: PathBuf,
}

impl TinyFs {
    pub fn mount(tag: &str, size: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("diskcast-tinyfs-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            mounted,
            "mounting a tmpfs on {} failed: run the tests as root",
            dir.display()
        );
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes zeros into a file until the file system is full.
    pub fn fill(&self) -> PathBuf {
        let path = self.dir.join("filler");
        let mut filler = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        while std::io::Write::write_all(&mut filler, &[0u8; 4096]).is_ok() {}
        path
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
