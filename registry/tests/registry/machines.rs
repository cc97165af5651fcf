use crate::common::{deploy, mac, pxe, registry, seen, Backend};
use diskcast_registry::{Error, Firmware, MachinePatch, Sighting, Via};
use std::net::Ipv4Addr;

fn observe_discovers_then_updates_what_it_saw(b: Backend) {
    let (_dir, reg) = registry(b, "observe");
    let m = mac(1);
    let first = reg
        .observe(m, pxe(Some(Ipv4Addr::new(10, 0, 0, 5))), 100)
        .unwrap();
    assert!(!first.known);
    assert_eq!((first.first_seen, first.last_seen), (100, Some(100)));
    assert_eq!(first.firmware, Firmware::Uefi);
    assert_eq!(first.last_via, Some(Via::Pxe));

    // Unknown firmware and no address keep what was known; an older sighting does not move
    // last_seen back.
    let agent = Sighting {
        firmware: Firmware::Unknown,
        address: None,
        via: Via::Agent,
    };
    let again = reg.observe(m, agent, 200).unwrap();
    assert_eq!(again.firmware, Firmware::Uefi);
    assert_eq!(again.address, Some(Ipv4Addr::new(10, 0, 0, 5)));
    assert_eq!(again.last_via, Some(Via::Agent));
    assert_eq!((again.first_seen, again.last_seen), (100, Some(200)));
    let late = reg.observe(m, agent, 150).unwrap();
    assert_eq!(late.last_seen, Some(200));
    assert_eq!(reg.machines().unwrap(), vec![late]);
}

fn register_names_and_groups_machines(b: Backend) {
    let (_dir, reg) = registry(b, "register");
    let never_seen = reg
        .register(mac(1), Some("pc01"), Some("@room1"), 50)
        .unwrap();
    assert!(never_seen.known);
    assert_eq!(never_seen.last_seen, None);
    assert_eq!(never_seen.group.as_deref(), Some("room1"));

    // A discovered machine becomes known; None keeps what it had.
    seen(&reg, 2);
    reg.register(mac(2), None, Some("room1"), 60).unwrap();
    let m2 = reg.register(mac(2), Some("pc02"), None, 70).unwrap();
    assert!(m2.known);
    assert_eq!(m2.group.as_deref(), Some("room1"));
    assert_eq!(m2.first_seen, 100);

    // A later sighting keeps registration data.
    let m1 = reg.observe(mac(1), pxe(None), 300).unwrap();
    assert_eq!((m1.name.as_deref(), m1.known), (Some("pc01"), true));
    assert_eq!(m1.first_seen, 50);

    assert_eq!(reg.machine_by_name("pc02").unwrap().unwrap().mac, mac(2));
    assert_eq!(reg.machine_by_name("pc99").unwrap(), None);
    let names: Vec<_> = reg
        .group_members("room1")
        .unwrap()
        .into_iter()
        .map(|m| m.name.unwrap())
        .collect();
    assert_eq!(names, ["pc01", "pc02"]);

    let err = reg.register(mac(3), Some("pc01"), None, 80).unwrap_err();
    assert!(
        matches!(&err, Error::NameTaken { name, holder } if name == "pc01" && *holder == mac(1)),
        "{err:?}"
    );
    assert_eq!(reg.machine(mac(3)).unwrap(), None, "nothing written");
    // Re-registering a machine under its own name is fine.
    reg.register(mac(1), Some("pc01"), None, 80).unwrap();
}

fn names_and_groups_that_would_be_ambiguous_are_refused(b: Backend) {
    let (_dir, reg) = registry(b, "labels");
    for bad in [
        "",
        "@x",
        "52:54:00:00:00:09",
        "52-54-00-00-00-09",
        "a b",
        "a,b",
        "tab\t",
        &"x".repeat(65),
    ] {
        let err = reg.register(mac(1), Some(bad), None, 1).unwrap_err();
        assert!(matches!(err, Error::Invalid { .. }), "{bad:?}: {err:?}");
    }
    let err = reg.register(mac(1), None, Some("@"), 1).unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err:?}");
    assert_eq!(reg.machines().unwrap(), vec![]);
}

fn set_changes_and_clears_fields(b: Backend) {
    let (_dir, reg) = registry(b, "set");
    let m = seen(&reg, 1);
    let changed = reg
        .set(
            m,
            MachinePatch {
                name: Some(Some("pc01".into())),
                group: Some(Some("@lab".into())),
                local_boot: Some(Some("sanboot".into())),
                disk: Some(Some("/dev/nvme0n1".into())),
                known: Some(true),
            },
        )
        .unwrap();
    assert_eq!(changed.name.as_deref(), Some("pc01"));
    assert_eq!(changed.group.as_deref(), Some("lab"));
    assert_eq!(changed.local_boot.as_deref(), Some("sanboot"));
    assert_eq!(changed.disk.as_deref(), Some("/dev/nvme0n1"));
    assert!(changed.known);

    let cleared = reg
        .set(
            m,
            MachinePatch {
                name: Some(None),
                local_boot: Some(None),
                ..MachinePatch::default()
            },
        )
        .unwrap();
    assert_eq!(cleared.name, None);
    assert_eq!(cleared.local_boot, None);
    assert_eq!(cleared.group.as_deref(), Some("lab"), "untouched");
    assert_eq!(cleared.disk.as_deref(), Some("/dev/nvme0n1"), "untouched");

    let err = reg.set(mac(9), MachinePatch::default()).unwrap_err();
    assert!(
        matches!(err, Error::NoSuchMachine { mac: x } if x == mac(9)),
        "{err:?}"
    );
    reg.register(mac(2), Some("taken"), None, 1).unwrap();
    let err = reg
        .set(
            m,
            MachinePatch {
                name: Some(Some("taken".into())),
                ..MachinePatch::default()
            },
        )
        .unwrap_err();
    assert!(matches!(err, Error::NameTaken { .. }), "{err:?}");
}

fn resolve_reads_mac_name_or_group(b: Backend) {
    let (_dir, reg) = registry(b, "resolve");
    reg.register(mac(1), Some("pc01"), Some("room1"), 1)
        .unwrap();
    reg.register(mac(2), Some("pc02"), Some("room1"), 1)
        .unwrap();
    reg.register(mac(3), Some("pc03"), Some("room2"), 1)
        .unwrap();

    assert_eq!(reg.resolve("pc02").unwrap(), vec![mac(2)]);
    assert_eq!(reg.resolve("@room1").unwrap(), vec![mac(1), mac(2)]);
    assert_eq!(reg.resolve("52-54-00-00-00-03").unwrap(), vec![mac(3)]);
    // A MAC names a machine even before the registry has it.
    assert_eq!(reg.resolve("52:54:00:00:00:63").unwrap(), vec![mac(0x63)]);

    let err = reg.resolve("pc99").unwrap_err();
    assert!(
        matches!(&err, Error::UnknownName { name } if name == "pc99"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "no machine is named \"pc99\"");
    let err = reg.resolve("@room9").unwrap_err();
    assert!(
        matches!(&err, Error::EmptyGroup { group } if group == "room9"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "group @room9 has no machines");
    for bad in ["", "@", "a b"] {
        assert!(
            matches!(reg.resolve(bad), Err(Error::Invalid { .. })),
            "{bad:?}"
        );
    }
}

fn forget_refuses_a_machine_with_an_open_task_and_drops_its_history(b: Backend) {
    let (_dir, reg) = registry(b, "forget");
    let m = seen(&reg, 1);
    let (task, _) = reg.create_task(deploy(m, "img"), 100).unwrap();
    let err = reg.forget(m).unwrap_err();
    assert!(
        matches!(err, Error::MachineBusy { mac: x, task: t, .. } if x == m && t == task.id),
        "{err:?}"
    );
    reg.cancel(task.id, 110).unwrap();
    reg.forget(m).unwrap();
    assert_eq!(reg.machine(m).unwrap(), None);
    assert_eq!(reg.task(task.id).unwrap(), None);
    assert_eq!(reg.events(task.id).unwrap(), vec![]);
    assert!(matches!(reg.forget(m), Err(Error::NoSuchMachine { .. })));
}

fn inventory_is_stored_as_json_with_its_time(b: Backend) {
    let (_dir, reg) = registry(b, "inventory");
    let m = seen(&reg, 1);
    let json = r#"{"disks":[{"name":"sda","size":1000}]}"#;
    let got = reg.record_inventory(m, json, 500).unwrap();
    let inventory = got.inventory.unwrap();
    assert_eq!((inventory.json.as_str(), inventory.at), (json, 500));
    assert_eq!(got.last_seen, Some(500));
    assert!(matches!(
        reg.record_inventory(m, "{oops", 600),
        Err(Error::InvalidJson { .. })
    ));
    assert!(matches!(
        reg.record_inventory(mac(2), "{}", 600),
        Err(Error::NoSuchMachine { .. })
    ));
}

crate::on_both_backends!(
    observe_discovers_then_updates_what_it_saw,
    register_names_and_groups_machines,
    names_and_groups_that_would_be_ambiguous_are_refused,
    set_changes_and_clears_fields,
    resolve_reads_mac_name_or_group,
    forget_refuses_a_machine_with_an_open_task_and_drops_its_history,
    inventory_is_stored_as_json_with_its_time,
);
