use crate::common::{mac, registry, Backend};
use diskcast_registry::{Error, Lease};
use std::net::Ipv4Addr;

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, last)
}

fn lease(n: u32, last: u8, expires: u64) -> Lease {
    Lease {
        mac: mac(n),
        address: ip(last),
        expires,
    }
}

fn an_address_is_held_by_one_mac(b: Backend) {
    let (_dir, reg) = registry(b, "lease-unique");
    reg.put_lease(lease(1, 5, 1000), 0).unwrap();
    assert_eq!(reg.lease_for(mac(1)).unwrap(), Some(lease(1, 5, 1000)));
    assert_eq!(reg.holder(ip(5), 999).unwrap(), Some(mac(1)));
    assert_eq!(
        reg.holder(ip(5), 1000).unwrap(),
        None,
        "expires is exclusive"
    );
    assert!(reg.ever_leased(ip(5)).unwrap());
    assert!(!reg.ever_leased(ip(6)).unwrap());

    let err = reg.put_lease(lease(2, 5, 2000), 999).unwrap_err();
    assert!(
        matches!(err, Error::AddressTaken { address, holder, expires: 1000 }
            if address == ip(5) && holder == mac(1)),
        "{err:?}"
    );
    // Renewing is fine; once expired, another MAC may take the address over.
    reg.put_lease(lease(1, 5, 1500), 999).unwrap();
    reg.put_lease(lease(2, 5, 3000), 1500).unwrap();
    assert_eq!(reg.lease_for(mac(1)).unwrap(), None);
    assert_eq!(reg.holder(ip(5), 2000).unwrap(), Some(mac(2)));
    // A MAC moving to another address keeps one lease.
    reg.put_lease(lease(2, 7, 3000), 1500).unwrap();
    assert_eq!(reg.leases().unwrap(), vec![lease(2, 7, 3000)]);
}

fn release_and_prune(b: Backend) {
    let (_dir, reg) = registry(b, "lease-prune");
    reg.put_lease(lease(1, 5, 1000), 0).unwrap();
    reg.put_lease(lease(2, 6, 2000), 0).unwrap();
    reg.put_lease(lease(3, 7, 5000), 0).unwrap();
    assert!(reg.release(mac(3)).unwrap());
    assert!(!reg.release(mac(3)).unwrap());
    // Expired for at least 500 s at 2499: only the first.
    assert_eq!(reg.prune_expired(2499, 500).unwrap(), 1);
    assert_eq!(reg.leases().unwrap(), vec![lease(2, 6, 2000)]);
    assert_eq!(reg.prune_expired(2500, 500).unwrap(), 1);
    assert_eq!(reg.leases().unwrap(), vec![]);
}

fn declined_addresses_are_unusable_until_their_time(b: Backend) {
    let (_dir, reg) = registry(b, "decline");
    reg.decline(ip(9), 1000).unwrap();
    assert!(reg.is_declined(ip(9), 999).unwrap());
    assert!(!reg.is_declined(ip(9), 1000).unwrap());
    assert!(!reg.is_declined(ip(8), 0).unwrap());
    reg.decline(ip(9), 500).unwrap();
    assert!(
        reg.is_declined(ip(9), 999).unwrap(),
        "a shorter decline does not shorten"
    );
    assert_eq!(reg.prune_expired(999, 0).unwrap(), 0);
    assert_eq!(reg.prune_expired(1000, 0).unwrap(), 1);
    assert!(!reg.is_declined(ip(9), 0).unwrap());
}

const LEGACY: &str = r#"{"leases": {
    "52:54:00:00:00:01": {"address": "10.0.0.5", "expires": 1000},
    "52-54-00-00-00-02": {"address": "10.0.0.6", "expires": 2000},
    "52:54:00:00:00:03": {"address": "10.0.0.6", "expires": 1500}
}}"#;

fn legacy_leases_are_imported_once_and_the_file_renamed(b: Backend) {
    let (dir, reg) = registry(b, "legacy");
    let path = dir.path().join("leases.json");
    let migrated = dir.path().join("leases.json.migrated");
    assert_eq!(reg.import_legacy_leases(&path).unwrap(), None);

    std::fs::write(&path, LEGACY).unwrap();
    assert_eq!(reg.import_legacy_leases(&path).unwrap(), Some(3));
    assert!(!path.exists());
    assert_eq!(std::fs::read_to_string(&migrated).unwrap(), LEGACY);
    // Two MACs on 10.0.0.6 (one lease had expired): the later-expiring one wins.
    assert_eq!(
        reg.leases().unwrap(),
        vec![lease(1, 5, 1000), lease(2, 6, 2000)]
    );
    assert_eq!(reg.import_legacy_leases(&path).unwrap(), None);

    // The file coming back (restored, or a crash after the commit and before the rename) is
    // only renamed: its stale leases never overwrite newer ones.
    reg.put_lease(lease(1, 9, 9000), 0).unwrap();
    std::fs::write(&path, LEGACY).unwrap();
    assert_eq!(reg.import_legacy_leases(&path).unwrap(), Some(0));
    assert!(!path.exists());
    assert_eq!(reg.lease_for(mac(1)).unwrap(), Some(lease(1, 9, 9000)));

    // Reopening does not import again either.
    drop(reg);
    let reg = dir.open();
    std::fs::write(&path, LEGACY).unwrap();
    assert_eq!(reg.import_legacy_leases(&path).unwrap(), Some(0));
}

fn a_corrupt_legacy_file_is_an_error_naming_it_and_nothing_is_imported(b: Backend) {
    for (i, text) in [
        "{not json",
        r#"{"leases": {"not-a-mac": {"address": "10.0.0.5", "expires": 1}}}"#,
        r#"{"leases": {"52:54:00:00:00:01": {"address": "10.0.0.500", "expires": 1}}}"#,
    ]
    .into_iter()
    .enumerate()
    {
        let (dir, reg) = registry(b, "legacy-corrupt");
        let path = dir.path().join("leases.json");
        std::fs::write(&path, text).unwrap();
        let err = reg.import_legacy_leases(&path).unwrap_err();
        assert!(
            matches!(&err, Error::LegacyCorrupt { path: p, .. } if *p == path),
            "{i}: {err:?}"
        );
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("move it away"), "{message}");
        assert!(path.exists(), "left in place");
        assert_eq!(reg.leases().unwrap(), vec![]);
        // Fixed, it imports.
        std::fs::write(&path, LEGACY).unwrap();
        assert_eq!(reg.import_legacy_leases(&path).unwrap(), Some(3));
    }
}

crate::on_both_backends!(
    an_address_is_held_by_one_mac,
    release_and_prune,
    declined_addresses_are_unusable_until_their_time,
    legacy_leases_are_imported_once_and_the_file_renamed,
    a_corrupt_legacy_file_is_an_error_naming_it_and_nothing_is_imported,
);
