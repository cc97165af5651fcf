//! Verifications of stored images an admin asked for (the console's "verify", `POST
//! /api/v1/images/NAME/verify`): every chunk decompressed and hashed again. Every image was
//! verified once when it was stored; this records later checks, in memory, by image name and
//! hash (an image deleted and stored again under its name is not the one that was checked).

use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Where the last check of an image stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum CheckState {
    Running { since: u64 },
    Verified { at: u64 },
    Failed { at: u64, reason: String },
}

#[derive(Debug, Default)]
pub struct ImageChecks {
    by_name: Mutex<HashMap<String, ([u8; 32], CheckState)>>,
    /// Counts changes, so live views know to read again.
    changes: AtomicU64,
}

impl ImageChecks {
    /// The last check of image `name` whose hash is `hash`.
    pub fn get(&self, name: &str, hash: &[u8; 32]) -> Option<CheckState> {
        let by_name = self.by_name.lock().ok()?;
        by_name
            .get(name)
            .filter(|(checked, _)| checked == hash)
            .map(|(_, state)| state.clone())
    }

    /// Marks a check of `name` as running; false when one already is.
    pub fn start(&self, name: &str, hash: [u8; 32], now: u64) -> bool {
        let Ok(mut by_name) = self.by_name.lock() else {
            return false;
        };
        if matches!(by_name.get(name), Some((_, CheckState::Running { .. }))) {
            return false;
        }
        by_name.insert(name.into(), (hash, CheckState::Running { since: now }));
        self.changes.fetch_add(1, Ordering::Relaxed);
        true
    }

    pub fn finish(&self, name: &str, hash: [u8; 32], state: CheckState) {
        if let Ok(mut by_name) = self.by_name.lock() {
            by_name.insert(name.into(), (hash, state));
        }
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// Changes so far.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_check_at_a_time_and_only_for_the_same_image() {
        let checks = ImageChecks::default();
        assert!(checks.start("golden", [1; 32], 10));
        assert!(!checks.start("golden", [1; 32], 11), "already running");
        assert_eq!(
            checks.get("golden", &[1; 32]),
            Some(CheckState::Running { since: 10 })
        );
        checks.finish("golden", [1; 32], CheckState::Verified { at: 12 });
        assert_eq!(
            checks.get("golden", &[1; 32]),
            Some(CheckState::Verified { at: 12 })
        );
        assert_eq!(
            checks.get("golden", &[2; 32]),
            None,
            "another image, same name"
        );
        assert!(checks.start("golden", [1; 32], 13), "checked again");
        assert_eq!(checks.changes(), 3);
    }
}
