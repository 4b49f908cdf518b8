//! One family's frontends as last built, indexed by Service: what an update of some
//! Services replaces, so that it leaves the model a full sync would build.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{L4Addr, ServiceFrontend, ServiceRef};
use crate::family::Family;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendIndex<A: Family> {
    frontends: BTreeMap<L4Addr<A>, ServiceFrontend<A>>,
    of_service: HashMap<ServiceRef, Vec<L4Addr<A>>>,
}

impl<A: Family> Default for FrontendIndex<A> {
    fn default() -> Self {
        Self {
            frontends: BTreeMap::new(),
            of_service: HashMap::new(),
        }
    }
}

impl<A: Family> FrontendIndex<A> {
    /// A full sync's frontends.
    pub fn new(frontends: BTreeMap<L4Addr<A>, ServiceFrontend<A>>) -> Self {
        let mut index = Self::default();
        index.insert(frontends);
        index
    }

    pub fn frontends(&self) -> &BTreeMap<L4Addr<A>, ServiceFrontend<A>> {
        &self.frontends
    }

    /// The frontends the Service `service` has.
    pub fn of_service(&self, service: &ServiceRef) -> &[L4Addr<A>] {
        self.of_service.get(service).map_or(&[], Vec::as_slice)
    }

    /// Whether `built` (the frontends of the Services `changed`, built anew) claims
    /// a frontend a Service outside `changed` has: only a full sync decides that.
    pub fn taken_elsewhere(
        &self,
        built: &BTreeMap<L4Addr<A>, ServiceFrontend<A>>,
        changed: &BTreeSet<ServiceRef>,
    ) -> bool {
        built.keys().any(|frontend| {
            self.frontends
                .get(frontend)
                .is_some_and(|owner| !changed.contains(&owner.service))
        })
    }

    /// The Services `changed` have `built` now, in place of what they had.
    pub fn replace(
        &mut self,
        changed: &BTreeSet<ServiceRef>,
        built: BTreeMap<L4Addr<A>, ServiceFrontend<A>>,
    ) {
        for service in changed {
            for frontend in self.of_service.remove(service).unwrap_or_default() {
                if self.frontends.get(&frontend).map(|f| &f.service) == Some(service) {
                    self.frontends.remove(&frontend);
                }
            }
        }
        self.insert(built);
    }

    fn insert(&mut self, frontends: BTreeMap<L4Addr<A>, ServiceFrontend<A>>) {
        for (frontend, entry) in frontends {
            self.of_service
                .entry(entry.service.clone())
                .or_default()
                .push(frontend);
            self.frontends.insert(frontend, entry);
        }
    }
}
