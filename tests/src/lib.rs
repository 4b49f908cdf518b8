//! Shared by Ferrite's end-to-end tests, demo and benchmark.
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
pub mod tunnel_shim;
pub mod verdict_model;
