//! The driver: the one owner of the node's state. Sources (the YAML file, the
//! Kubernetes watches) only report what changed - everything, as a snapshot, or
//! "these Services changed" - and the driver decides how the node syncs it: a
//! full sync at start and every resync period (reading the maps back, which
//! repairs drift), in between only what changed.
use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::model::{ClusterObjects, ServiceRef, Skipped};

/// Everything a source holds now.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub objects: ClusterObjects,
    /// What the source already had to leave out (documents of the file that do not
    /// parse).
    pub skipped: Vec<Skipped>,
    /// When the oldest change this snapshot reflects was seen (for the lag metric).
    pub oldest_change: Option<Instant>,
}

/// Only these Services changed.
#[derive(Clone, Debug, Default)]
pub struct ServiceChanges {
    pub services: BTreeSet<ServiceRef>,
    /// Their objects now: Services and EndpointSlices, nothing else. A Service
    /// named in `services` but absent here is gone.
    pub objects: ClusterObjects,
    /// When the oldest of these changes was seen (for the lag metric).
    pub oldest_change: Option<Instant>,
}

/// What a source reports.
#[derive(Clone, Debug)]
pub enum SourceEvent {
    /// Anything may have changed: the whole model is synced.
    Snapshot(Snapshot),
    /// Only some Services changed: just those are updated.
    ServicesChanged(ServiceChanges),
}

/// Where the node's objects come from: the YAML file or the Kubernetes API.
pub trait Source {
    /// Wait until the objects change or `deadline` passes. `None`: nothing changed by
    /// then - or, for a source that polls, in one poll. The driver uses such quiet
    /// ticks to retry a sync that was waiting for pod interfaces.
    fn next_event(&mut self, deadline: Instant) -> Result<Option<SourceEvent>>;

    /// Everything the source holds now, for a full sync; `None`: nothing yet (a
    /// config file that never parsed).
    fn snapshot(&mut self) -> Result<Option<Snapshot>>;
}

/// How a sync of the whole model compares it with the maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FullSync {
    /// After a change: diff against what the node last wrote (cheap).
    AfterChange,
    /// At start and every resync period: read every map back, which repairs drift,
    /// and do the periodic housekeeping (conntrack garbage, pod wiring).
    Resync,
}

/// How a full sync ended, as far as the driver cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Synced {
    Done,
    /// Pods whose interface is not there yet: worth retrying soon.
    WaitingForInterfaces,
    /// Logged by the node; its maps keep their last good state.
    Failed,
}

/// What the driver syncs: the node's datapath (`agent::NodeAgent`), or a recording
/// fake in tests.
pub trait SyncTarget {
    fn sync_all(&mut self, snapshot: &Snapshot, how: FullSync) -> Synced;

    /// Update only the Services changed. `false`: a full sync must be done instead
    /// (none done yet, or this update failed).
    fn sync_services(&mut self, changes: &ServiceChanges) -> bool;

    /// Between syncs: pass on what the datapath logged.
    fn flush_logs(&mut self);

    /// A change took `lag` from being seen to being in the maps.
    fn record_event_lag(&self, lag: Duration);
}

/// Turns one source's events into syncs of one node.
pub struct Driver<T> {
    target: T,
    /// How often a full sync runs even if nothing changed.
    resync: Duration,
    /// When the next full sync is due; `None`: none has run yet.
    next_resync: Option<Instant>,
    /// The last full sync found pods without their interface.
    retry_soon: bool,
}

impl<T: SyncTarget> Driver<T> {
    pub fn new(target: T, resync: Duration) -> Self {
        Self {
            target,
            resync,
            next_resync: None,
            retry_soon: false,
        }
    }

    /// Sync `source`'s objects for good; returns only the source's errors.
    pub fn run(mut self, source: &mut dyn Source) -> Result<()> {
        loop {
            self.step(source)?;
        }
    }

    /// One full sync when one is due, else wait for one event and sync it.
    fn step(&mut self, source: &mut dyn Source) -> Result<()> {
        let now = Instant::now();
        if self.resync_due(now) {
            if let Some(snapshot) = source.snapshot()? {
                self.sync_all(&snapshot, FullSync::Resync);
                self.target.flush_logs();
                return Ok(());
            }
        }
        // Full syncs come every `resync` even while changes keep arriving: a
        // deadline, not a timer restarted by each event.
        let deadline = self
            .next_resync
            .filter(|due| *due > now)
            .unwrap_or(now + self.resync);
        match source.next_event(deadline)? {
            Some(SourceEvent::Snapshot(snapshot)) => {
                let how = if self.resync_due(Instant::now()) {
                    FullSync::Resync
                } else {
                    FullSync::AfterChange
                };
                self.sync_all(&snapshot, how);
            }
            Some(SourceEvent::ServicesChanged(changes)) => {
                if self.target.sync_services(&changes) {
                    self.record_lag(changes.oldest_change);
                } else if let Some(mut snapshot) = source.snapshot()? {
                    snapshot.oldest_change =
                        earliest(snapshot.oldest_change, changes.oldest_change);
                    self.sync_all(&snapshot, FullSync::AfterChange);
                }
            }
            None if self.retry_soon => {
                if let Some(snapshot) = source.snapshot()? {
                    self.sync_all(&snapshot, FullSync::Resync);
                }
            }
            None => {}
        }
        self.target.flush_logs();
        Ok(())
    }

    fn resync_due(&self, now: Instant) -> bool {
        self.next_resync.is_none_or(|due| now >= due)
    }

    fn sync_all(&mut self, snapshot: &Snapshot, how: FullSync) {
        if how == FullSync::Resync {
            self.next_resync = Some(Instant::now() + self.resync);
        }
        let synced = self.target.sync_all(snapshot, how);
        self.retry_soon = synced == Synced::WaitingForInterfaces;
        if synced != Synced::Failed {
            self.record_lag(snapshot.oldest_change);
        }
    }

    fn record_lag(&self, oldest_change: Option<Instant>) {
        if let Some(seen) = oldest_change {
            self.target.record_event_lag(seen.elapsed());
        }
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
