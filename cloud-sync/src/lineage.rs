//! Which journal a device's events come from, and what to do when that changes: the pure
//! decision behind a birth (docs/protocol.md, "Restores, rollbacks and replaced gateways").
//!
//! The cloud's copy of a device is a prefix of one journal. Three things break that: the
//! gateway is wiped or replaced and starts a new journal under the same id (its sequences
//! restart at 1); the gateway's journal is restored from a backup (the cloud holds events the
//! journal no longer has, and the journal will write other events under those sequences); or the
//! cloud's store is restored or lost (it expects events the journal's retention already deleted).
//!
//! A birth decides the first and the last. The second shows when the journal sends an event
//! under a stored sequence with other bytes (`Store::store_events`); a birth's `last_seq` is
//! not used for it, because a retained or queued birth is older than the events after it.

use serde::{Deserialize, Serialize};

/// What the cloud remembers about a device's journal, beside its `Device` row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    /// The journal the stored events came from (0: not yet known).
    pub journal_id: u64,
    /// Events the device's journal had deleted before the cloud got them (a restored store).
    pub lost_events: u64,
    /// Events set aside because the device's journal no longer has them.
    pub archived_events: u64,
    /// How many times events were set aside; each archive keeps its own number.
    pub archives: u64,
    /// The newest archive, for operators.
    pub last_archive: Option<ArchiveNote>,
    /// The newest birth acted on: (epoch, announcement). A retained or redelivered birth is not
    /// newer and changes nothing.
    pub last_birth: (u64, u64),
    /// Journals this device id had before (newest last, at most `MAX_REPLACED`): a late birth
    /// of one of them is stale.
    pub replaced: Vec<u64>,
}

/// Replaced journal ids remembered per device.
pub const MAX_REPLACED: usize = 8;

/// One setting-aside of events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveNote {
    /// When.
    pub at_ms: u64,
    /// First sequence set aside (every stored event from it on went).
    pub from_seq: u64,
    /// Events set aside.
    pub events: u64,
    /// Why, for the log and the API.
    pub reason: String,
}

/// The facts of a birth the decision needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BirthFacts {
    /// The birth's epoch.
    pub epoch: u64,
    /// Its journal's id.
    pub journal_id: u64,
    /// Its number within the epoch.
    pub announcement: u64,
    /// The oldest sequence its journal can still send.
    pub resend_from: u64,
}

/// What to do with a birth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// False for a birth older than the newest one seen from the same journal (ignored).
    pub fresh: bool,
    /// Another journal under the same device id: the epoch starts again.
    pub new_journal: bool,
    /// Set aside every stored event from this sequence on, with why.
    pub archive_from: Option<(u64, &'static str)>,
    /// Events `[from, to)` are gone: the journal deleted them before the cloud stored them.
    pub lost: Option<(u64, u64)>,
    /// The next sequence the cloud expects afterwards.
    pub next_seq: u64,
}

/// Decides what a birth means for the stored copy of a device whose newest epoch is `epoch`
/// and whose next expected sequence is `next_seq`.
pub fn judge(epoch: u64, next_seq: u64, lineage: &Lineage, b: BirthFacts) -> Verdict {
    let mut v = Verdict {
        fresh: false,
        new_journal: false,
        archive_from: None,
        lost: None,
        next_seq,
    };
    if lineage.replaced.contains(&b.journal_id) {
        return v;
    }
    v.new_journal = lineage.journal_id != 0 && b.journal_id != lineage.journal_id;
    v.fresh = v.new_journal || b.epoch >= epoch;
    let newer = v.new_journal || (b.epoch, b.announcement) > lineage.last_birth;
    if !v.fresh || !newer {
        return v;
    }
    if v.new_journal {
        if next_seq > 1 {
            v.archive_from = Some((1, "another journal under this device id (wiped or replaced gateway)"));
        }
        v.next_seq = 1;
    }
    if v.next_seq < b.resend_from {
        v.lost = Some((v.next_seq, b.resend_from));
        v.next_seq = b.resend_from;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(epoch: u64, journal_id: u64, announcement: u64, resend_from: u64) -> BirthFacts {
        BirthFacts {
            epoch,
            journal_id,
            announcement,
            resend_from,
        }
    }

    fn known(id: u64) -> Lineage {
        Lineage {
            journal_id: id,
            ..Lineage::default()
        }
    }

    #[test]
    fn a_birth_of_the_same_journal_changes_nothing() {
        let v = judge(3, 50, &known(7), facts(4, 7, 1, 1));
        assert!(v.fresh && !v.new_journal);
        assert_eq!((v.archive_from, v.lost, v.next_seq), (None, None, 50));
    }

    #[test]
    fn an_older_epoch_of_the_same_journal_is_stale() {
        assert!(!judge(5, 50, &known(7), facts(4, 7, 1, 1)).fresh);
    }

    #[test]
    fn a_wiped_gateway_starts_a_new_stream_and_its_low_epoch_counts() {
        let v = judge(57, 10_000, &known(7), facts(1, 9, 1, 1));
        assert!(v.fresh && v.new_journal);
        assert_eq!(v.archive_from.map(|a| a.0), Some(1));
        assert_eq!(v.next_seq, 1);
    }

    #[test]
    fn a_late_birth_of_a_replaced_journal_is_stale() {
        let mut lin = known(9);
        lin.replaced = vec![7];
        let v = judge(1, 40, &lin, facts(60, 7, 1, 1));
        assert!(!v.fresh && v.archive_from.is_none());
    }

    #[test]
    fn a_first_birth_learns_the_journal() {
        let v = judge(0, 1, &Lineage::default(), facts(1, 9, 1, 1));
        assert!(v.fresh && !v.new_journal);
        assert_eq!((v.archive_from, v.next_seq), (None, 1));
    }

    #[test]
    fn a_restored_store_records_what_the_journal_already_deleted() {
        let v = judge(8, 50, &known(7), facts(9, 7, 1, 120));
        assert_eq!(v.archive_from, None);
        assert_eq!(v.lost, Some((50, 120)));
        assert_eq!(v.next_seq, 120);
    }

    #[test]
    fn a_repeated_birth_is_presence_only() {
        let mut lin = known(7);
        lin.last_birth = (9, 1);
        // The retained copy of birth (9, 1) comes again after the store moved on.
        let v = judge(9, 50, &lin, facts(9, 7, 1, 120));
        assert!(v.fresh);
        assert_eq!((v.lost, v.next_seq), (None, 50));
        // A second announcement in the same epoch is acted on.
        assert_eq!(judge(9, 50, &lin, facts(9, 7, 2, 120)).lost, Some((50, 120)));
    }

    #[test]
    fn a_lost_store_starts_from_what_the_journal_holds() {
        let v = judge(0, 1, &Lineage::default(), facts(12, 7, 1, 120));
        assert_eq!((v.lost, v.next_seq), (Some((1, 120)), 120));
    }
}
