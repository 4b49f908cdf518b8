//! Host-local IPAM for one node's pod CIDR: one file per allocated address under the
//! data directory, named by the address and holding its owner as JSON. A `lock` file
//! (flock) serialises plugin runs, and `last_reserved_ip` makes allocation
//! round-robin so a released address is not handed out again at once (the
//! reference host-local plugin's layout and behaviour).
use std::{
    fs::{self, File, OpenOptions},
    net::Ipv4Addr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::files::{create_private_dir, write_private};

/// Who holds an address: the attachment (container id + interface) and the host
/// veth it was wired with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    #[serde(rename = "hostInterface")]
    pub host_interface: String,
}

/// The allocation state of one node, locked for as long as this value lives.
pub struct Store {
    dir: PathBuf,
    _lock: Flock<File>,
}

const LOCK_FILE: &str = "lock";
const LAST_RESERVED: &str = "last_reserved_ip";

impl Store {
    /// Open (creating it, mode 0700) and lock the store in `dir`; blocks while
    /// another plugin run holds it.
    pub fn lock(dir: &Path) -> Result<Self> {
        create_private_dir(dir)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join(LOCK_FILE))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| errno)
            .context("locking the IPAM store")?;
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    /// Every allocation, in address order.
    pub fn allocations(&self) -> Result<Vec<(Ipv4Addr, Owner)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let Some(ip) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let owner = serde_json::from_slice(&fs::read(&path)?)
                .with_context(|| format!("reading {}", path.display()))?;
            out.push((ip, owner));
        }
        out.sort_by_key(|(ip, _)| *ip);
        Ok(out)
    }

    /// The address held by an attachment, if any.
    pub fn find(&self, container_id: &str, ifname: &str) -> Result<Option<(Ipv4Addr, Owner)>> {
        Ok(self
            .allocations()?
            .into_iter()
            .find(|(_, o)| o.container_id == container_id && o.ifname == ifname))
    }

    /// Allocate the next free address of `cidr` after the last one handed out
    /// (skipping the network, broadcast and first address, which is left for a
    /// gateway as host-local does). `None` when the range is full.
    pub fn allocate(&self, cidr: Ipv4Net, owner: &Owner) -> Result<Option<Ipv4Addr>> {
        let usable: Vec<Ipv4Addr> = cidr.hosts().skip(1).collect();
        if usable.is_empty() {
            return Ok(None);
        }
        let taken: Vec<Ipv4Addr> = self.allocations()?.into_iter().map(|(ip, _)| ip).collect();
        let last: Option<Ipv4Addr> = fs::read_to_string(self.dir.join(LAST_RESERVED))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let start = last
            .and_then(|last| usable.iter().position(|ip| *ip == last))
            .map_or(0, |i| i + 1);
        let Some(ip) = (0..usable.len())
            .map(|i| usable[(start + i) % usable.len()])
            .find(|ip| !taken.contains(ip))
        else {
            return Ok(None);
        };
        write_private(&self.dir.join(ip.to_string()), &serde_json::to_vec(owner)?)?;
        write_private(&self.dir.join(LAST_RESERVED), ip.to_string().as_bytes())?;
        Ok(Some(ip))
    }

    /// Release an address; releasing a free one is fine (DEL is idempotent).
    pub fn release(&self, ip: Ipv4Addr) -> Result<()> {
        match fs::remove_file(self.dir.join(ip.to_string())) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(id: &str) -> Owner {
        Owner {
            container_id: id.into(),
            ifname: "eth0".into(),
            host_interface: format!("fer{id}"),
        }
    }

    fn temp_store(label: &str) -> (PathBuf, Store) {
        let dir = std::env::temp_dir().join(format!("ferrite-ipam-{label}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = Store::lock(&dir).unwrap();
        (dir, store)
    }

    #[test]
    fn allocates_round_robin_and_never_twice() {
        let (dir, store) = temp_store("rr");
        let cidr: Ipv4Net = "10.0.0.0/29".parse().unwrap();
        // .0 network, .1 gateway, .7 broadcast: .2 to .6 are usable.
        let a = store.allocate(cidr, &owner("a")).unwrap().unwrap();
        let b = store.allocate(cidr, &owner("b")).unwrap().unwrap();
        assert_eq!(
            (a, b),
            ("10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap())
        );
        store.release(a).unwrap();
        // A released address is not reused at once.
        let c = store.allocate(cidr, &owner("c")).unwrap().unwrap();
        assert_eq!(c, "10.0.0.4".parse::<Ipv4Addr>().unwrap());
        for id in ["d", "e", "f"] {
            assert!(store.allocate(cidr, &owner(id)).unwrap().is_some());
        }
        assert_eq!(store.allocate(cidr, &owner("g")).unwrap(), None);
        let (_, found) = store.find("c", "eth0").unwrap().unwrap();
        assert_eq!(found, owner("c"));
        store.release(c).unwrap();
        store.release(c).unwrap();
        assert!(store.find("c", "eth0").unwrap().is_none());
        drop(store);
        fs::remove_dir_all(dir).unwrap();
    }
}
