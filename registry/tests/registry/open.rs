use crate::common::{postgres, registry, seen, Backend, Db, TempDir};
use diskcast_registry::{Error, Location, PgUrl, Registry, FILE_NAME, SCHEMA_VERSION};

#[test]
fn creates_the_schema_in_an_empty_file_and_reopens_it_unchanged() {
    let (dir, reg) = registry(Backend::Sqlite, "open");
    assert_eq!(reg.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(
        reg.location(),
        &Location::Sqlite(dir.path().join(FILE_NAME))
    );
    let mac = seen(&reg, 1);
    drop(reg);
    for _ in 0..2 {
        let reg = Registry::open_in(dir.path()).unwrap();
        assert_eq!(reg.schema_version().unwrap(), SCHEMA_VERSION);
        assert!(reg.machine(mac).unwrap().is_some());
    }
    let conn = rusqlite::Connection::open(dir.path().join(FILE_NAME)).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn a_writer_waits_for_another_connections_write_lock_instead_of_failing() {
    let (dir, reg) = registry(Backend::Sqlite, "pragmas");
    let other = Registry::open_in(dir.path()).unwrap();
    let conn = rusqlite::Connection::open(dir.path().join(FILE_NAME)).unwrap();
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    let writer = std::thread::spawn(move || other.put_setting("k", "v"));
    std::thread::sleep(std::time::Duration::from_millis(300));
    conn.execute_batch("COMMIT").unwrap();
    writer.join().unwrap().unwrap();
    assert_eq!(reg.setting("k").unwrap().as_deref(), Some("v"));
}

#[test]
fn refuses_a_schema_newer_than_it_knows_naming_the_file() {
    let (dir, reg) = registry(Backend::Sqlite, "newer");
    let path = dir.path().join(FILE_NAME);
    drop(reg);
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
    let err = Registry::open_in(dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::SchemaTooNew { at, found, known }
            if *at == path.display().to_string() && *found == SCHEMA_VERSION + 1 && *known == SCHEMA_VERSION),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("newer"), "{message}");
}

#[test]
fn open_errors_name_the_path() {
    let dir = TempDir::new("open-errors");
    let missing = dir.path().join("no-such-dir").join(FILE_NAME);
    let err = Registry::open(&missing).unwrap_err();
    assert!(matches!(err, Error::Open { .. }), "{err:?}");
    assert!(err.to_string().contains(&missing.display().to_string()));

    let garbage = dir.path().join("garbage.sqlite");
    std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
    let err = Registry::open(&garbage).unwrap_err();
    assert!(err.to_string().contains("garbage.sqlite"), "{err}");
}

fn settings_are_a_small_key_value_store(b: Backend) {
    let (_dir, reg) = registry(b, "settings");
    assert_eq!(reg.setting("admin_token_hash").unwrap(), None);
    reg.put_setting("admin_token_hash", "abc").unwrap();
    reg.put_setting("admin_token_hash", "def").unwrap();
    assert_eq!(
        reg.setting("admin_token_hash").unwrap().as_deref(),
        Some("def")
    );
    assert!(reg.remove_setting("admin_token_hash").unwrap());
    assert!(!reg.remove_setting("admin_token_hash").unwrap());
    assert_eq!(reg.setting("admin_token_hash").unwrap(), None);
}

#[test]
fn postgres_creates_the_schema_and_reopens_it_unchanged() {
    let db = Db::new(Backend::Postgres, "pg-open");
    let reg = db.open();
    assert_eq!(reg.schema_version().unwrap(), SCHEMA_VERSION);
    let mac = seen(&reg, 1);
    drop(reg);
    // Two servers starting at once: one applies the migrations, the other finds them done.
    let opening: Vec<_> = (0..2)
        .map(|_| {
            let location = db.location().clone();
            std::thread::spawn(move || Registry::open_location(&location, None).unwrap())
        })
        .collect();
    for handle in opening {
        let reg = handle.join().unwrap();
        assert_eq!(reg.schema_version().unwrap(), SCHEMA_VERSION);
        assert!(reg.machine(mac).unwrap().is_some());
    }
    let fresh = Db::new(Backend::Postgres, "pg-race");
    let racing: Vec<_> = (0..3)
        .map(|_| {
            let location = fresh.location().clone();
            std::thread::spawn(move || Registry::open_location(&location, None).map(drop))
        })
        .collect();
    for handle in racing {
        handle.join().unwrap().unwrap();
    }
}

#[test]
fn postgres_refuses_a_schema_newer_than_it_knows_naming_the_database() {
    let db = Db::new(Backend::Postgres, "pg-newer");
    drop(db.open());
    let Location::Postgres(url) = db.location() else {
        unreachable!()
    };
    let dbname = url.dbname();
    postgres()
        .psql(
            dbname,
            &format!(
                "UPDATE diskcast_schema SET version = {}",
                SCHEMA_VERSION + 1
            ),
        )
        .unwrap();
    let err = Registry::open_location(db.location(), None).unwrap_err();
    assert!(
        matches!(&err, Error::SchemaTooNew { found, known, .. }
            if *found == SCHEMA_VERSION + 1 && *known == SCHEMA_VERSION),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains(dbname), "{message}");
    assert!(message.contains("newer"), "{message}");
}

#[test]
fn postgres_connection_errors_say_what_is_wrong_and_never_show_the_password() {
    let server = postgres();
    // Nothing listens there.
    let nowhere = Location::parse(
        "postgres://diskcast:s3cret-pw@/registry?host=/nonexistent-diskcast-dir&connect_timeout=2",
    )
    .unwrap();
    let err = Registry::open_location(&nowhere, None).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(message.contains("cannot be reached"), "{message}");
    assert!(!message.contains("s3cret-pw"), "{message}");
    assert!(!format!("{err:?}").contains("s3cret-pw"), "{err:?}");
    assert!(!format!("{nowhere:?} {nowhere}").contains("s3cret-pw"));

    // A user the server does not know.
    let url = format!(
        "postgres://nobody-here:s3cret-pw@/postgres?host={}",
        server.dir().display()
    );
    let err = Registry::open_location(&Location::parse(&url).unwrap(), None).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("authentication failed"), "{message}");
    assert!(!message.contains("s3cret-pw"), "{message}");

    // A database that does not exist.
    let err = Registry::open_location(&server.location("no_such_db"), None).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");

    // Malformed URLs.
    for bad in [
        "postgres://diskcast@host",
        "postgres://diskcast@host:notaport/db",
    ] {
        let err = PgUrl::parse(bad).unwrap_err();
        assert!(matches!(err, Error::BadUrl { .. }), "{bad}: {err:?}");
    }
}

crate::on_both_backends!(settings_are_a_small_key_value_store);
