//! Shared by Ferrite's end-to-end tests, demo and benchmark.
pub mod bench_families;
pub mod bench_node;
pub mod cluster;
pub mod cni;
pub mod containerd;
pub mod fake_apiserver;
pub mod flannel;
pub mod frames;
pub mod frames6;
pub mod install_cni;
pub mod kube_proxy_layout;
pub mod kubelet;
pub mod lab;
pub mod monitor;
pub mod testbed;
pub mod testbed6;
pub mod tunnel_shim;
pub mod verdict_model;

/// For each story function `case(source: ObjectSource) -> anyhow::Result<()>`, a module
/// of that name with two tests: the agents reading a YAML file, and the agents
/// watching an API server (the fake one), where every change is the watch events of
/// the objects that changed.
#[macro_export]
macro_rules! from_both_sources {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[test]
            fn from_a_file() -> anyhow::Result<()> {
                super::$case($crate::lab::ObjectSource::File)
            }

            #[test]
            fn from_the_api_server() -> anyhow::Result<()> {
                super::$case($crate::lab::ObjectSource::Kubernetes)
            }
        }
    )*};
}
