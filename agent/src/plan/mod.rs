//! From the desired state to map writes, without touching BPF: compute what the maps
//! should hold (reusing the ids already in them, so a restart changes nothing that is
//! still right), diff that against what they hold, and order the writes so the
//! datapath never sees a half-written Service:
//! 0. node config and routes, 1. backends and rev-NAT entries, 2. backend slots,
//! 3. Maglev tables and source ranges, 4. Service master entries (count last, so
//! every slot it covers exists), 5. endpoints; the IPv6 Service maps (lb6) step by
//! step with the IPv4 ones;
//!
//! then removals in reverse: master entries, Maglev tables and source ranges, slots,
//! rev-NAT, backends, endpoints, routes. A route change touches only its own entry: flows to other nodes go on.
mod desired;
mod diff;
mod ids;
mod image;
mod lb_family;
mod node_state;
mod policy;
mod service_entries;
mod settings;
#[cfg(test)]
mod test_support;
mod update;

pub use desired::{desired_contents, desired_contents_keeping_ids, settle_pod_claims};
pub use diff::{diff, drift, ended_pairs, removed_backends};
pub use image::{
    backend_value, describe_policy_rule, describe_service6_key, describe_service_key,
    maglev_digest, maglev_key, op_map, rev_nat_value, FrontendEntries, MapContents, Op, PolicyRule,
    Route6Key, RouteKey, SourceRange,
};
pub use lb_family::LbFamily;
pub use node_state::{FullPlan, NodeState, PolicyPlan, ServicesPlan, SharedPolicy};
pub use policy::rules_of;
pub use settings::{
    overlay_address, overlay_address6, Capacities, Interface, NodeSettings, Routing, Uplink,
    UplinkXdp,
};
pub use update::{service_update, Changed, Written};
