//! A throwaway PostgreSQL server for tests: `initdb` in a temporary directory, run as the
//! unprivileged `nobody` (PostgreSQL refuses to run as root), listening only on a unix socket in
//! that directory. A watchdog shell stops it by its PID and removes the directory when the test
//! process exits, however it exits.
//!
//! Not used by the bootserver itself; here so the registry's and the bootserver's tests share it.

use crate::{Location, PgUrl};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A running PostgreSQL server (superuser `diskcast`, trust authentication on its socket).
#[derive(Debug)]
pub struct TempPostgres {
    dir: PathBuf,
    pid: u32,
}

/// Why the test server could not start.
#[derive(Debug, thiserror::Error)]
pub enum TempPostgresError {
    #[error(
        "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): run scripts/setup, \
         which installs Debian's postgresql package"
    )]
    NotInstalled,
    #[error("{what}: {why}")]
    Failed { what: String, why: String },
}

fn failed(what: impl Into<String>, why: impl std::fmt::Display) -> TempPostgresError {
    TempPostgresError::Failed {
        what: what.into(),
        why: why.to_string(),
    }
}

/// The newest installed PostgreSQL's `bin` directory.
pub fn bin_dir() -> Result<PathBuf, TempPostgresError> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| TempPostgresError::NotInstalled)?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().ok_or(TempPostgresError::NotInstalled)
}

fn run_as_nobody(cmd: &Path, args: &[&str]) -> Result<std::process::Output, TempPostgresError> {
    Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| failed(format!("running {}", cmd.display()), e))
}

impl TempPostgres {
    /// Starts a server in a fresh directory under the system temp directory.
    pub fn start() -> Result<Self, TempPostgresError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let bin = bin_dir()?;
        let dir = std::env::temp_dir().join(format!(
            "diskcast-pg-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| failed(format!("creating {dir:?}"), e))?;
        let chown = Command::new("chown")
            .args(["nobody:nogroup"])
            .arg(&dir)
            .status()
            .map_err(|e| failed("running chown", e))?;
        if !chown.success() {
            return Err(failed(format!("chown nobody {dir:?}"), chown));
        }
        let data = dir.join("data");
        let data_s = data.display().to_string();
        let out = run_as_nobody(
            &bin.join("initdb"),
            &[
                "-D",
                &data_s,
                "-U",
                "diskcast",
                "--auth=trust",
                "--locale=C",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        if !out.status.success() {
            return Err(failed(
                "initdb",
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        // The watchdog: starts postgres, then stops it (by PID, fast shutdown) and removes the
        // directory once the test process is gone.
        let script = format!(
            "{postgres} -D {data} -k {dir} -c listen_addresses= -c fsync=off \
               -c max_connections=200 >{dir}/log 2>&1 &
             pg=$!
             echo $pg >{dir}/pid
             while [ -d /proc/{parent} ] && [ -d /proc/$pg ]; do sleep 0.5; done
             kill -INT $pg 2>/dev/null
             while [ -d /proc/$pg ]; do sleep 0.1; done
             rm -rf {dir}",
            postgres = bin.join("postgres").display(),
            data = data_s,
            dir = dir.display(),
            parent = std::process::id(),
        );
        Command::new("runuser")
            .args(["-u", "nobody", "--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| failed("starting postgres", e))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let socket = dir.join(".s.PGSQL.5432");
        loop {
            let pid = std::fs::read_to_string(dir.join("pid"))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok());
            if let (Some(pid), true) = (pid, socket.exists()) {
                if psql_at(&dir, "postgres", "SELECT 1").is_ok() {
                    return Ok(Self { dir, pid });
                }
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
                return Err(failed("postgres did not start within 60 s", log));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The socket directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Runs `sql` with psql on database `db`; its output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, TempPostgresError> {
        psql_at(&self.dir, db, sql)
    }
}

fn psql_at(dir: &Path, db: &str, sql: &str) -> Result<String, TempPostgresError> {
    let bin = bin_dir()?;
    let host = dir.display().to_string();
    let out = Command::new(bin.join("psql"))
        .args(["-h", &host, "-U", "diskcast", "-d", db, "-tA", "-v"])
        .arg("ON_ERROR_STOP=1")
        .args(["-c", sql])
        .output()
        .map_err(|e| failed("running psql", e))?;
    if !out.status.success() {
        return Err(failed(
            format!("psql {sql:?}"),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl TempPostgres {
    /// Creates database `name` (letters, digits, `_`).
    pub fn create_db(&self, name: &str) -> Result<(), TempPostgresError> {
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .map(drop)
    }

    /// `postgres://diskcast@/NAME?host=DIR`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://diskcast@/{db}?host={}", self.dir.display())
    }

    /// The registry location of database `db`.
    pub fn location(&self, db: &str) -> Location {
        match PgUrl::parse(&self.url(db)) {
            Ok(url) => Location::Postgres(Box::new(url)),
            Err(e) => panic!("test URL {}: {e}", self.url(db)),
        }
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        // Stopping by PID: the watchdog then removes the directory.
        let _ = Command::new("kill")
            .args(["-INT", &self.pid.to_string()])
            .status();
    }
}
