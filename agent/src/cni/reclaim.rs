//! Reclaiming a full range. A pod whose sandbox went without a DEL (a runtime that
//! crashed, a node rebooted with `/var/lib/cni` kept; with a 1.0.0 conflist no
//! runtime sends GC) keeps its address file for ever, and once the range is full
//! every ADD fails with 101: host-local's "no IP addresses available" leak. An ADD
//! that finds the range full releases, as their DELs would have, the attachments
//! whose pod is provably gone, and tries the allocation once more.
//!
//! An attachment is gone when all of these hold:
//! - its namespace: the CNI_NETNS path recorded at ADD no longer names the recorded
//!   namespace (nothing there, not a namespace, or a namespace of another device and
//!   inode: a recycled path). Files written before namespaces were recorded are
//!   kept, as is anything that cannot be inspected.
//! - its interface: no host veth of the recorded name that may be its own (alias
//!   naming its container, or no alias) exists. A veth pair lives and dies as one:
//!   a host end still there means the pod end lives, in a namespace that does too
//!   (one unmounted from its path but held by a process, say, or one the kernel is
//!   still tearing down).
//! - its address: the endpoint entry of its IPv4 address names no interface of the
//!   node, or there is none (a live entry is a pod of another store, or of this
//!   one).
//!
//! A dual-stack attachment is judged whole, whichever of its ranges is full, and
//! releases both its addresses.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use anyhow::Result;
use ferrite_common::EndpointKey;
use ipnet::IpNet;

use super::{
    host_veth_may_be_its,
    ipam::{Held, Owner, Store},
    release_host_side,
};
use crate::{host, maps::NodeMaps};

/// What the node shows now of one attachment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// What the recorded CNI_NETNS path holds: a namespace, `None` (nothing, or no
    /// namespace), or why it could not be inspected.
    pub netns: Result<Option<host::netns::NetnsId>, String>,
    /// A host veth of the recorded name exists that may be the attachment's.
    pub host_veth: bool,
    /// The interface index the address's endpoint entry names, and whether the
    /// node has an interface of that index.
    pub endpoint: Option<(u32, bool)>,
}

/// Why an attachment counts as alive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Alive {
    /// Written before namespaces were recorded: whether its namespace is gone
    /// cannot be told.
    Unrecorded,
    /// Its namespace path could not be inspected.
    Uninspectable(String),
    /// The recorded path still names the recorded namespace.
    NamespaceExists,
    /// Its host veth is still there.
    HostVeth,
    /// Its address's endpoint entry names a live interface (this index).
    EndpointLive(u32),
}

impl Alive {
    /// The kind, as the summary of a full range counts it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unrecorded => "that recorded no namespace (older version)",
            Self::Uninspectable(_) => "whose namespace could not be inspected",
            Self::NamespaceExists => "whose namespace exists",
            Self::HostVeth => "whose host veth exists",
            Self::EndpointLive(_) => "whose endpoint entry names a live interface",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Alive(Alive),
    /// Reclaimable; why, for the log.
    Gone(String),
}

/// The decision for one attachment (see the module docs).
pub fn judge(owner: &Owner, seen: &Seen) -> Verdict {
    let Some(record) = &owner.netns else {
        return Verdict::Alive(Alive::Unrecorded);
    };
    let namespace = match &seen.netns {
        Err(why) => return Verdict::Alive(Alive::Uninspectable(why.clone())),
        Ok(Some(id)) if *id == record.id => return Verdict::Alive(Alive::NamespaceExists),
        Ok(Some(id)) => format!(
            "{} names another network namespace (inode {}, was {})",
            record.path, id.ino, record.id.ino
        ),
        Ok(None) => format!(
            "network namespace {} is gone (no namespace at the path)",
            record.path
        ),
    };
    if seen.host_veth {
        return Verdict::Alive(Alive::HostVeth);
    }
    let endpoint = match seen.endpoint {
        Some((ifindex, true)) => return Verdict::Alive(Alive::EndpointLive(ifindex)),
        Some((ifindex, false)) => {
            format!("its endpoint entry names interface index {ifindex}, which is gone")
        }
        None => "it has no endpoint entry".to_string(),
    };
    Verdict::Gone(format!(
        "{namespace}, its host veth {} is gone and {endpoint}",
        owner.host_interface
    ))
}

/// What one pass over a full range did.
#[derive(Debug, Default)]
pub struct Pass {
    pub reclaimed: Vec<IpAddr>,
    /// Attachments kept, by why they count as alive.
    pub kept: BTreeMap<&'static str, usize>,
    /// Gone attachments whose release failed (reported on stderr; still taken).
    pub failed: usize,
}

impl Pass {
    /// For the 101 error's details: who holds the range.
    pub fn summary(&self) -> String {
        let mut parts: Vec<String> = self
            .kept
            .iter()
            .map(|(kind, count)| format!("{count} {kind}"))
            .collect();
        if self.failed > 0 {
            parts.push(format!(
                "{} gone but not released (see the plugin's log)",
                self.failed
            ));
        }
        if parts.is_empty() {
            return "no attachment of this store holds an address of the range \
                    (unreadable allocation files or other stores' pods do)"
                .into();
        }
        match self.reclaimed.len() {
            0 => format!("no attachment holding it is gone: {}", parts.join(", ")),
            n => format!("reclaimed {n}, still held: {}", parts.join(", ")),
        }
    }
}

/// Release every attachment of `attachments` with an address in `cidr` that is
/// gone, as its DEL would have (endpoint entry, link pins, address files; its host
/// veth, routes and neighbours went with the veth), each named on stderr.
pub(super) fn reclaim_gone(
    store: &Store,
    pin_dir: &Path,
    cidr: IpNet,
    attachments: &[Held],
) -> Result<Pass> {
    let live: BTreeSet<u32> = host::interfaces::interfaces()?
        .values()
        .map(|i| i.ifindex)
        .collect();
    let endpoints = NodeMaps::open(pin_dir)?.endpoint_entries()?;
    let mut pass = Pass::default();
    for held in attachments
        .iter()
        .filter(|h| h.addresses().any(|ip| cidr.contains(&ip)))
    {
        let owner = &held.owner;
        let seen = Seen {
            netns: match &owner.netns {
                Some(record) => {
                    host::netns::netns_id(Path::new(&record.path)).map_err(|e| format!("{e:#}"))
                }
                None => Ok(None),
            },
            host_veth: host_veth_may_be_its(owner),
            endpoint: held
                .v4
                .and_then(|ip| {
                    endpoints.get(&EndpointKey {
                        address: ip.octets(),
                    })
                })
                .map(|e| (e.ifindex, live.contains(&e.ifindex))),
        };
        let who = format!(
            "{} of {}/{}",
            held.shown(),
            owner.container_id,
            owner.ifname
        );
        match judge(owner, &seen) {
            Verdict::Alive(why) => {
                if let Alive::Uninspectable(e) = &why {
                    eprintln!("ferrite-cni: {cidr} is full: keeping {who}: {e}");
                }
                *pass.kept.entry(why.kind()).or_default() += 1;
            }
            Verdict::Gone(why) => {
                match release_host_side(pin_dir, held).and_then(|_| store.release_all(held)) {
                    Ok(()) => {
                        eprintln!(
                            "ferrite-cni: {cidr} is full: reclaimed {who}, gone without a DEL: {why}"
                        );
                        pass.reclaimed.extend(held.addresses());
                    }
                    Err(e) => {
                        eprintln!(
                            "ferrite-cni: {cidr} is full: reclaiming {who} failed, it stays taken ({why}): {e:#}"
                        );
                        pass.failed += 1;
                    }
                }
            }
        }
    }
    Ok(pass)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cni::ipam::NetnsRecord, host::netns::NetnsId};

    const RECORDED: NetnsId = NetnsId {
        dev: 4,
        ino: 4026532174,
    };
    const OTHER: NetnsId = NetnsId {
        dev: 4,
        ino: 4026532999,
    };

    fn owner(recorded: bool) -> Owner {
        Owner {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            host_interface: "fer0123456789ab".into(),
            netns: recorded.then(|| NetnsRecord {
                path: "/run/netns/cni-1".into(),
                id: RECORDED,
            }),
        }
    }

    /// Everything gone: nothing at the path, no veth, no entry.
    fn gone() -> Seen {
        Seen {
            netns: Ok(None),
            host_veth: false,
            endpoint: None,
        }
    }

    fn alive(owner: &Owner, seen: Seen) -> Alive {
        match judge(owner, &seen) {
            Verdict::Alive(why) => why,
            Verdict::Gone(why) => panic!("{seen:?} reclaimed: {why}"),
        }
    }

    #[test]
    fn only_an_attachment_whose_namespace_interface_and_entry_are_all_gone_is_reclaimed() {
        let owner = owner(true);
        for seen in [
            gone(),
            // A recycled path: another namespace is mounted there now.
            Seen {
                netns: Ok(Some(OTHER)),
                ..gone()
            },
            // The entry names an interface index the node no longer has.
            Seen {
                endpoint: Some((41, false)),
                ..gone()
            },
        ] {
            assert!(matches!(judge(&owner, &seen), Verdict::Gone(_)), "{seen:?}");
        }
    }

    #[test]
    fn an_attachment_whose_namespace_may_live_is_never_reclaimed() {
        let owner = owner(true);
        // The namespace is still at its path: even with its interface and entry gone.
        let seen = Seen {
            netns: Ok(Some(RECORDED)),
            ..gone()
        };
        assert_eq!(alive(&owner, seen), Alive::NamespaceExists);
        // Unmounted from its path but held open: its veth pair is still there.
        let seen = Seen {
            host_veth: true,
            ..gone()
        };
        assert_eq!(alive(&owner, seen), Alive::HostVeth);
        // A live interface holds the address (another store's pod, say).
        let seen = Seen {
            endpoint: Some((7, true)),
            ..gone()
        };
        assert_eq!(alive(&owner, seen), Alive::EndpointLive(7));
        // The path cannot be inspected.
        let seen = Seen {
            netns: Err("permission denied".into()),
            ..gone()
        };
        assert_eq!(
            alive(&owner, seen),
            Alive::Uninspectable("permission denied".into())
        );
        // Written before namespaces were recorded: never judged gone.
        assert_eq!(
            alive(&super::tests::owner(false), gone()),
            Alive::Unrecorded
        );
    }

    #[test]
    fn the_reason_names_the_path_the_veth_and_the_entry() {
        let owner = owner(true);
        let seen = Seen {
            endpoint: Some((41, false)),
            ..gone()
        };
        let Verdict::Gone(why) = judge(&owner, &seen) else {
            panic!("kept")
        };
        assert_eq!(
            why,
            "network namespace /run/netns/cni-1 is gone (no namespace at the path), \
             its host veth fer0123456789ab is gone and its endpoint entry names interface index 41, \
             which is gone"
        );
        let pass = Pass {
            reclaimed: vec![],
            kept: [
                (Alive::NamespaceExists.kind(), 4),
                (Alive::HostVeth.kind(), 1),
            ]
            .into(),
            failed: 0,
        };
        assert_eq!(
            pass.summary(),
            "no attachment holding it is gone: 1 whose host veth exists, 4 whose namespace exists"
        );
    }
}
