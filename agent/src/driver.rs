//! The driver: the one owner of the node's state. Sources (the YAML file, the
//! Kubernetes watches) only report what changed - everything, as a snapshot,
//! "these Services changed", or "these Pods, Namespaces, NetworkPolicies changed" -
//! and the driver decides how the node syncs it: a
//! full sync at start and every resync period (reading the maps back, which
//! repairs drift), in between only what changed.
use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::model::{policy::PolicyChanges, ClusterObjects, ServiceRef, Skipped};

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

/// Only some Pods, Namespaces or NetworkPolicies changed.
#[derive(Clone, Debug, Default)]
pub struct PolicyObjectChanges {
    /// Each changed object as it is now (`None`: gone).
    pub changes: PolicyChanges,
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
    /// Only some Pods, Namespaces or NetworkPolicies changed: the policy maps are
    /// updated, unless a changed Pod of this node is wired differently.
    PolicyObjectsChanged(PolicyObjectChanges),
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

    /// Update only what the changed Pods, Namespaces and NetworkPolicies change in
    /// the policy maps. `false`: a full sync must be done instead (none done yet, a
    /// changed Pod of this node is wired differently, or this update failed).
    fn sync_policy(&mut self, changes: &PolicyObjectChanges) -> bool;

    /// Between syncs: pass on what the datapath logged.
    fn flush_logs(&mut self);

    /// A change took `lag` from being seen to being in the maps.
    fn record_event_lag(&self, lag: Duration);

    /// The driver's loop went round (once per step: at least once per resync
    /// period, while it is not stuck).
    fn loop_turned(&self);
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

    /// One turn of the loop, then its heartbeat: `/readyz` and `/healthz` judge a
    /// loop that stopped turning by it. A turn waits for events at most until the
    /// next resync is due, so it ends at least once per resync period (the first may
    /// wait longer: for the source's initial lists).
    fn step(&mut self, source: &mut dyn Source) -> Result<()> {
        self.turn(source)?;
        self.target.loop_turned();
        Ok(())
    }

    /// One full sync when one is due, else wait for one event and sync it.
    fn turn(&mut self, source: &mut dyn Source) -> Result<()> {
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
            Some(SourceEvent::PolicyObjectsChanged(changes)) => {
                if self.target.sync_policy(&changes) {
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
        let synced = self.target.sync_all(snapshot, how);
        // The period counts from the end: a full sync longer than the period (the
        // first at 65,000 Services) must not be followed at once by another, which
        // would make the changes that came meanwhile wait for it too.
        if how == FullSync::Resync {
            self.next_resync = Some(Instant::now() + self.resync);
        }
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

#[cfg(test)]
mod tests {
    use std::{
        cell::Cell,
        collections::VecDeque,
        sync::Arc,
        thread::sleep,
        time::{Duration, Instant},
    };

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::model::objects::Service;

    /// What the driver asked of the node.
    #[derive(Debug, PartialEq, Eq)]
    enum Call {
        SyncAll(FullSync, Vec<String>),
        SyncServices(Vec<String>),
        UpdatePolicy(usize),
    }

    /// A node that records the driver's calls and answers as told.
    #[derive(Default)]
    struct RecordingNode {
        calls: Vec<Call>,
        /// Answers of the next full syncs (then `Done`).
        full_sync_answers: VecDeque<Synced>,
        service_updates_fail: bool,
        policy_updates_fail: bool,
        log_flushes: usize,
        lags_recorded: Cell<usize>,
        turns: Cell<usize>,
        /// How long each full sync takes.
        full_sync_takes: Duration,
    }

    impl SyncTarget for RecordingNode {
        fn sync_all(&mut self, snapshot: &Snapshot, how: FullSync) -> Synced {
            self.calls
                .push(Call::SyncAll(how, service_names(&snapshot.objects)));
            sleep(self.full_sync_takes);
            self.full_sync_answers.pop_front().unwrap_or(Synced::Done)
        }

        fn sync_services(&mut self, changes: &ServiceChanges) -> bool {
            self.calls
                .push(Call::SyncServices(service_names(&changes.objects)));
            !self.service_updates_fail
        }

        fn sync_policy(&mut self, changes: &PolicyObjectChanges) -> bool {
            self.calls
                .push(Call::UpdatePolicy(changes.changes.pods.len()));
            !self.policy_updates_fail
        }

        fn flush_logs(&mut self) {
            self.log_flushes += 1;
        }

        fn record_event_lag(&self, _: Duration) {
            self.lags_recorded.set(self.lags_recorded.get() + 1);
        }

        fn loop_turned(&self) {
            self.turns.set(self.turns.get() + 1);
        }
    }

    /// What the scripted source does when the driver waits for an event.
    enum Next {
        Event(SourceEvent),
        /// Returns at once with nothing (a polling source's quiet tick).
        Quiet,
        /// Nothing changes before the deadline.
        NothingUntilDeadline,
    }

    /// A source that plays a script and always has `snapshot` ready.
    struct ScriptedSource {
        script: VecDeque<Next>,
        snapshot: Option<Snapshot>,
        deadlines: Vec<Instant>,
    }

    impl ScriptedSource {
        fn new(snapshot: Option<Snapshot>, script: impl IntoIterator<Item = Next>) -> Self {
            Self {
                script: script.into_iter().collect(),
                snapshot,
                deadlines: Vec::new(),
            }
        }
    }

    impl Source for ScriptedSource {
        fn next_event(&mut self, deadline: Instant) -> Result<Option<SourceEvent>> {
            self.deadlines.push(deadline);
            match self
                .script
                .pop_front()
                .expect("the driver waited past the script")
            {
                Next::Event(event) => Ok(Some(event)),
                Next::Quiet => Ok(None),
                Next::NothingUntilDeadline => {
                    sleep(deadline.saturating_duration_since(Instant::now()));
                    Ok(None)
                }
            }
        }

        fn snapshot(&mut self) -> Result<Option<Snapshot>> {
            Ok(self.snapshot.clone())
        }
    }

    fn objects(names: &[&str]) -> ClusterObjects {
        ClusterObjects {
            services: names
                .iter()
                .map(|name| {
                    Arc::new(Service {
                        metadata: ObjectMeta {
                            name: Some(name.to_string()),
                            namespace: Some("default".into()),
                            ..ObjectMeta::default()
                        },
                        ..Service::default()
                    })
                })
                .collect(),
            ..ClusterObjects::default()
        }
    }

    fn service_names(objects: &ClusterObjects) -> Vec<String> {
        objects
            .services
            .iter()
            .filter_map(|s| s.metadata.name.clone())
            .collect()
    }

    fn snapshot(names: &[&str]) -> Snapshot {
        Snapshot {
            objects: objects(names),
            ..Snapshot::default()
        }
    }

    fn changed(names: &[&str]) -> Next {
        Next::Event(SourceEvent::ServicesChanged(ServiceChanges {
            objects: objects(names),
            oldest_change: Some(Instant::now()),
            ..ServiceChanges::default()
        }))
    }

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    const AN_HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_resync_of_the_snapshot_comes_first_then_changes_are_synced_as_they_come() {
        let mut source = ScriptedSource::new(
            Some(snapshot(&["a", "b"])),
            [
                changed(&["b"]),
                changed(&["a", "c"]),
                Next::Event(SourceEvent::Snapshot(snapshot(&["a", "b", "c"]))),
                Next::Quiet,
            ],
        );
        let mut driver = Driver::new(RecordingNode::default(), AN_HOUR);
        for _ in 0..5 {
            driver.step(&mut source).unwrap();
        }
        assert_eq!(
            driver.target.calls,
            [
                Call::SyncAll(FullSync::Resync, names(&["a", "b"])),
                Call::SyncServices(names(&["b"])),
                Call::SyncServices(names(&["a", "c"])),
                Call::SyncAll(FullSync::AfterChange, names(&["a", "b", "c"])),
            ]
        );
        // The lag of each change synced that was seen at a known time.
        assert_eq!(driver.target.lags_recorded.get(), 2);
        assert_eq!(driver.target.log_flushes, 5, "once after every step");
        assert_eq!(driver.target.turns.get(), 5, "a heartbeat after every step");
    }

    #[test]
    fn a_failed_service_update_is_followed_by_a_full_sync_of_the_snapshot() {
        let mut source = ScriptedSource::new(Some(snapshot(&["a", "b"])), [changed(&["b"])]);
        let node = RecordingNode {
            service_updates_fail: true,
            ..RecordingNode::default()
        };
        let mut driver = Driver::new(node, AN_HOUR);
        driver.step(&mut source).unwrap();
        driver.step(&mut source).unwrap();
        assert_eq!(
            driver.target.calls[1..],
            [
                Call::SyncServices(names(&["b"])),
                Call::SyncAll(FullSync::AfterChange, names(&["a", "b"])),
            ]
        );
        assert_eq!(
            driver.target.lags_recorded.get(),
            1,
            "the change's lag, once it is synced"
        );
    }

    fn pod_changed() -> Next {
        let key = crate::model::policy::ObjectKey {
            namespace: "default".into(),
            name: "p".into(),
        };
        Next::Event(SourceEvent::PolicyObjectsChanged(PolicyObjectChanges {
            changes: PolicyChanges {
                pods: vec![(key, None)],
                ..PolicyChanges::default()
            },
            oldest_change: Some(Instant::now()),
        }))
    }

    #[test]
    fn policy_object_changes_are_policy_updates_and_a_failed_one_a_full_sync() {
        let mut source =
            ScriptedSource::new(Some(snapshot(&["a"])), [pod_changed(), pod_changed()]);
        let mut driver = Driver::new(RecordingNode::default(), AN_HOUR);
        driver.step(&mut source).unwrap();
        driver.step(&mut source).unwrap();
        driver.target.policy_updates_fail = true;
        driver.step(&mut source).unwrap();
        assert_eq!(
            driver.target.calls,
            [
                Call::SyncAll(FullSync::Resync, names(&["a"])),
                Call::UpdatePolicy(1),
                Call::UpdatePolicy(1),
                Call::SyncAll(FullSync::AfterChange, names(&["a"])),
            ]
        );
        assert_eq!(driver.target.lags_recorded.get(), 2, "both changes synced");
    }

    #[test]
    fn a_resync_comes_every_period_however_many_changes_arrive_in_between() {
        let resync = Duration::from_millis(100);
        let mut source = ScriptedSource::new(
            Some(snapshot(&["a"])),
            [changed(&["a"]), Next::NothingUntilDeadline],
        );
        let mut driver = Driver::new(RecordingNode::default(), resync);
        let start = Instant::now();
        for _ in 0..4 {
            driver.step(&mut source).unwrap();
        }
        assert_eq!(
            driver.target.calls,
            [
                Call::SyncAll(FullSync::Resync, names(&["a"])),
                Call::SyncServices(names(&["a"])),
                Call::SyncAll(FullSync::Resync, names(&["a"])),
            ]
        );
        // The change did not push the deadline back.
        assert_eq!(source.deadlines[0], source.deadlines[1]);
        assert!(start.elapsed() >= resync);
    }

    /// A full sync longer than the period (the first at 65,000 Services) is not
    /// followed at once by another: the change that came meanwhile is an update, not
    /// the next resync's (which wrote it, and looked like a resync finding writes).
    #[test]
    fn the_resync_period_counts_from_the_end_of_a_full_sync_that_outlasts_it() {
        let resync = Duration::from_millis(100);
        let mut source = ScriptedSource::new(
            Some(snapshot(&["a", "b"])),
            [changed(&["b"]), Next::NothingUntilDeadline],
        );
        let node = RecordingNode {
            full_sync_takes: 2 * resync,
            ..RecordingNode::default()
        };
        let mut driver = Driver::new(node, resync);
        let first_done = {
            driver.step(&mut source).unwrap();
            Instant::now()
        };
        driver.step(&mut source).unwrap();
        assert_eq!(
            driver.target.calls,
            [
                Call::SyncAll(FullSync::Resync, names(&["a", "b"])),
                Call::SyncServices(names(&["b"])),
            ]
        );
        assert!(source.deadlines[0] >= first_done + resync - Duration::from_millis(5));
    }

    #[test]
    fn a_full_sync_waiting_for_pod_interfaces_is_retried_at_the_next_quiet_tick() {
        let mut source = ScriptedSource::new(
            Some(snapshot(&["a"])),
            [Next::Quiet, Next::Quiet, changed(&["a"]), Next::Quiet],
        );
        let node = RecordingNode {
            full_sync_answers: [Synced::WaitingForInterfaces, Synced::Done].into(),
            ..RecordingNode::default()
        };
        let mut driver = Driver::new(node, AN_HOUR);
        for _ in 0..5 {
            driver.step(&mut source).unwrap();
        }
        assert_eq!(
            driver.target.calls,
            [
                Call::SyncAll(FullSync::Resync, names(&["a"])),
                // The retry; then the interfaces were there.
                Call::SyncAll(FullSync::Resync, names(&["a"])),
                Call::SyncServices(names(&["a"])),
            ]
        );
    }

    #[test]
    fn a_failed_full_sync_records_no_lag_and_waits_for_the_next_change_or_resync() {
        let mut source = ScriptedSource::new(None, [Next::Quiet, Next::Quiet]);
        let mut failing = snapshot(&["a"]);
        failing.oldest_change = Some(Instant::now());
        source
            .script
            .push_front(Next::Event(SourceEvent::Snapshot(failing)));
        let node = RecordingNode {
            full_sync_answers: [Synced::Failed].into(),
            ..RecordingNode::default()
        };
        let mut driver = Driver::new(node, AN_HOUR);
        for _ in 0..3 {
            driver.step(&mut source).unwrap();
        }
        assert_eq!(
            driver.target.calls,
            [Call::SyncAll(FullSync::Resync, names(&["a"]))]
        );
        assert_eq!(driver.target.lags_recorded.get(), 0);
    }

    #[test]
    fn until_the_source_has_objects_the_driver_waits_and_the_first_ones_get_a_resync() {
        // A config file that does not parse yet: no snapshot.
        let mut source = ScriptedSource::new(
            None,
            [
                Next::Quiet,
                Next::Event(SourceEvent::Snapshot(snapshot(&["a"]))),
                Next::Event(SourceEvent::Snapshot(snapshot(&["a", "b"]))),
            ],
        );
        let mut driver = Driver::new(RecordingNode::default(), AN_HOUR);
        for _ in 0..3 {
            driver.step(&mut source).unwrap();
        }
        assert_eq!(
            driver.target.calls,
            [
                Call::SyncAll(FullSync::Resync, names(&["a"])),
                Call::SyncAll(FullSync::AfterChange, names(&["a", "b"])),
            ]
        );
    }
}
