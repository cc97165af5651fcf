//! The lease table of full DHCP mode as the DHCP server works with it, in memory. The registry
//! (`diskcast-registry`, one SQLite file in the state directory) keeps it across restarts: the
//! server's edge saves each change there before it answers (see [`crate::dhcp_server::LeaseChange`]).

use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Lease {
    pub address: Ipv4Addr,
    /// Unix time in seconds.
    pub expires: u64,
}

/// MAC (canonical form) → lease, and addresses clients declined (RFC 2131 4.3.3: in use by
/// somebody else, so not handed out until the time given).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LeaseTable {
    pub leases: BTreeMap<String, Lease>,
    #[serde(skip)]
    pub declined: HashMap<Ipv4Addr, u64>,
}

impl LeaseTable {
    /// The MAC holding `address` with a lease still valid at `now`.
    pub fn holder(&self, address: Ipv4Addr, now: u64) -> Option<&str> {
        self.leases
            .iter()
            .find(|(_, l)| l.address == address && l.expires > now)
            .map(|(mac, _)| mac.as_str())
    }

    pub fn ever_leased(&self, address: Ipv4Addr) -> bool {
        self.leases.values().any(|l| l.address == address)
    }

    pub fn is_declined(&self, address: Ipv4Addr, now: u64) -> bool {
        self.declined
            .get(&address)
            .is_some_and(|until| *until > now)
    }

    /// Forgets leases expired more than `keep_secs` ago (their holders may still come back for
    /// the same address until then) and declines that ran out.
    pub fn prune(&mut self, now: u64, keep_secs: u64) -> usize {
        let before = self.leases.len();
        self.leases
            .retain(|_, l| l.expires.saturating_add(keep_secs) > now);
        self.declined.retain(|_, until| *until > now);
        before - self.leases.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_expiry_declines_and_pruning() {
        let mut table = LeaseTable::default();
        let address = Ipv4Addr::new(10, 0, 0, 5);
        table.leases.insert(
            "52:54:00:00:00:01".into(),
            Lease {
                address,
                expires: 1000,
            },
        );
        assert_eq!(table.holder(address, 999), Some("52:54:00:00:00:01"));
        assert_eq!(table.holder(address, 1000), None);
        assert!(table.ever_leased(address));
        table.declined.insert(Ipv4Addr::new(10, 0, 0, 6), 2000);
        assert!(table.is_declined(Ipv4Addr::new(10, 0, 0, 6), 1999));
        assert_eq!(table.prune(1500, 1000), 0);
        assert_eq!(table.prune(2500, 1000), 1);
        assert!(table.leases.is_empty() && table.declined.is_empty());
    }
}
