//! Ferrite's node agent: Kubernetes objects -> one desired-state model -> ordered
//! writes to the pinned BPF maps of the datapath.
pub mod agent;
pub mod cni;
pub mod conntrack_gc;
pub mod datapath;
pub mod files;
pub mod healthcheck;
pub mod hostnet;
pub mod inspect;
pub mod kube_source;
pub mod limits;
pub mod maglev;
pub mod maps;
pub mod model;
pub mod plan;
pub mod podnet;
pub mod source;
pub mod telemetry;
