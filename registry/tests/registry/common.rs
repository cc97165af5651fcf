use diskcast_registry::testing::TempPostgres;
use diskcast_registry::{
    Firmware, Location, MacAddr, NewTask, Registry, Sighting, TaskKind, Via, FILE_NAME,
};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "diskcast-registry-{tag}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Which database a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The one PostgreSQL server of this test binary (stopped by its watchdog when the binary exits).
pub fn postgres() -> &'static TempPostgres {
    static SERVER: OnceLock<TempPostgres> = OnceLock::new();
    SERVER.get_or_init(|| {
        TempPostgres::start().unwrap_or_else(|e| {
            panic!("the PostgreSQL tests need a PostgreSQL server and could not start one: {e}")
        })
    })
}

/// A fresh database: a directory (with the SQLite file, or only the test's other files) and,
/// for PostgreSQL, a fresh database on the binary's server.
pub struct Db {
    dir: TempDir,
    location: Location,
}

impl Db {
    pub fn new(backend: Backend, tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let location = match backend {
            Backend::Sqlite => Location::Sqlite(dir.path().join(FILE_NAME)),
            Backend::Postgres => {
                static NEXT: AtomicU32 = AtomicU32::new(0);
                let server = postgres();
                let name = format!(
                    "t_{}_{}",
                    tag.replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                );
                server.create_db(&name).unwrap();
                server.location(&name)
            }
        };
        Self { dir, location }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    pub fn is_sqlite(&self) -> bool {
        matches!(self.location, Location::Sqlite(_))
    }

    /// Another handle on the same database (as another process or server would have).
    pub fn open(&self) -> Registry {
        Registry::open_location(&self.location, None).unwrap()
    }
}

/// A registry on a fresh database (keep the Db alive as long as the registry).
pub fn registry(backend: Backend, tag: &str) -> (Db, Registry) {
    let db = Db::new(backend, tag);
    let registry = db.open();
    (db, registry)
}

/// Runs each named test (`fn name(b: Backend)`) once per backend, as `sqlite::name` and
/// `postgres::name`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $name() { super::$name($crate::common::Backend::Sqlite) })*
        }
        mod postgres {
            $(#[test] fn $name() { super::$name($crate::common::Backend::Postgres) })*
        }
    };
}

pub fn mac(n: u32) -> MacAddr {
    let [_, a, b, c] = n.to_be_bytes();
    MacAddr([0x52, 0x54, 0, a, b, c])
}

pub fn pxe(address: Option<Ipv4Addr>) -> Sighting {
    Sighting {
        firmware: Firmware::Uefi,
        address,
        via: Via::Pxe,
    }
}

pub fn deploy(mac: MacAddr, image: &str) -> NewTask {
    NewTask {
        mac,
        kind: TaskKind::Deploy {
            image: image.into(),
        },
        options: "{}".into(),
        timeout_secs: 600,
    }
}

/// A machine seen by PXE at time 100.
pub fn seen(registry: &Registry, n: u32) -> MacAddr {
    let mac = mac(n);
    registry.observe(mac, pxe(None), 100).unwrap();
    mac
}

/// The tasks of a PostgreSQL database as text (`COPY ... TO STDOUT`, bytea as hex).
pub fn pg_dump(location: &Location) -> String {
    let Location::Postgres(url) = location else {
        panic!("not PostgreSQL: {location}")
    };
    let db = url.dbname();
    let tables = postgres()
        .psql(db, "SELECT string_agg(t::text, E'\\n') FROM tasks t")
        .unwrap();
    format!("token_hash\n{tables}")
}
