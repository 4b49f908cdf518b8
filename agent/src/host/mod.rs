//! The node's own networking: everything Ferrite sets up in the node's network
//! namespace besides the BPF maps and programs (which `datapath` loads, pins and
//! attaches). One file per kind of setting, so a new host setting has one place:
//! - `interfaces`: what the namespace's interfaces are (index, MAC, MTU, driver,
//!   addresses, aliases);
//! - `netns`: network namespaces (identity, running code inside one);
//! - `pods`: a pod's veth pair, its addresses and routes on both ends;
//! - `overlay`: the VXLAN device and the node's own place on the overlay;
//! - `nft`: the nftables rules (masquerade, no conntrack for the overlay's UDP);
//! - `sysctl`: the kernel settings the datapath relies on.
//!
//! Links, addresses, routes and neighbours go through `netlink`; nothing here spawns
//! `ip`. Runtime files (the pod CIDR for the CNI plugin) are `files`'.
pub mod interfaces;
pub mod netns;
pub mod nft;
pub mod overlay;
pub mod pods;
pub mod sysctl;

/// Remove Ferrite's nftables table and VXLAN device (uninstall).
pub fn remove_all() {
    nft::remove_table();
    overlay::remove_vxlan_device();
}
