use crate::common::{registry, seen, TempDir};
use diskcast_registry::{Error, Registry, FILE_NAME, SCHEMA_VERSION};

#[test]
fn creates_the_schema_in_an_empty_file_and_reopens_it_unchanged() {
    let (dir, reg) = registry("open");
    assert_eq!(reg.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(reg.path(), dir.path().join(FILE_NAME));
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
    let (dir, reg) = registry("pragmas");
    let other = Registry::open_in(dir.path()).unwrap();
    let conn = rusqlite::Connection::open(reg.path()).unwrap();
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    let writer = std::thread::spawn(move || other.put_setting("k", "v"));
    std::thread::sleep(std::time::Duration::from_millis(300));
    conn.execute_batch("COMMIT").unwrap();
    writer.join().unwrap().unwrap();
    assert_eq!(reg.setting("k").unwrap().as_deref(), Some("v"));
}

#[test]
fn refuses_a_schema_newer_than_it_knows_naming_the_file() {
    let (dir, reg) = registry("newer");
    let path = reg.path().to_owned();
    drop(reg);
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
    let err = Registry::open_in(dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::SchemaTooNew { path: p, found, known }
            if *p == path && *found == SCHEMA_VERSION + 1 && *known == SCHEMA_VERSION),
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

#[test]
fn settings_are_a_small_key_value_store() {
    let (_dir, reg) = registry("settings");
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
