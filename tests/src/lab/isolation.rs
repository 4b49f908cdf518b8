//! Where the lab's processes live: network namespaces and cgroup subtrees of its
//! own, removed on drop.
use std::{
    fs,
    net::{SocketAddr, TcpStream},
    os::fd::AsFd,
    path::{Path, PathBuf},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};
use ferrite_agent::datapath;

use super::{basics::run_ip, exchange};

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Result<Self> {
        run_ip(&["netns", "add", name])?;
        let ns = Self { name: name.into() };
        run_ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Run `f` on a thread that has entered this namespace. Sockets created there
    /// stay in it, wherever they are used afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = fs::File::open(self.path())?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
        })
    }

    /// One TCP request from this namespace: connect, send a line, read the answer.
    pub fn tcp_request(&self, to: impl Into<SocketAddr>, message: &str) -> Result<String> {
        let mut stream = self.tcp_connect(to)?;
        exchange(&mut stream, message)
    }

    pub fn tcp_connect(&self, to: impl Into<SocketAddr>) -> Result<TcpStream> {
        let to: SocketAddr = to.into();
        let stream =
            self.run(move || TcpStream::connect_timeout(&to, Duration::from_secs(5)))??;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(stream)
    }

    /// Run `command` in this namespace (as `nsenter --net` runs it) with `input` on
    /// its stdin (`nft -f -`, `iptables-restore`): its stdout, or what it wrote to
    /// stderr as the error.
    pub fn run_with_input(&self, command: &[&str], input: &str) -> Result<String> {
        let net = format!("--net={}", self.path().display());
        let args: Vec<&str> = [net.as_str()]
            .into_iter()
            .chain(command.iter().copied())
            .collect();
        ferrite_agent::command::run_with_input("nsenter", &args, input)
    }

    /// Like [`Netns::run`] but on a detached thread (for servers).
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
        let file = fs::File::open(self.path())?;
        Ok(std::thread::spawn(move || {
            if nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).is_ok() {
                f();
            }
        }))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run_ip(&["netns", "del", &self.name]);
    }
}

/// A cgroup v2 directory of the lab's own: a node's subtree, whose processes (its
/// pods' and its host processes' probes) get the node's socket-level load balancing.
/// Never the machine's root: the agent attaches there. Removed on drop, once the
/// processes in it are gone.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(name: &str) -> Result<Self> {
        let path = datapath::default_cgroup_root()?.join(name);
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // A probe still exiting keeps the directory busy for a moment.
        for _ in 0..100 {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            if let Ok(procs) = fs::read_to_string(self.path.join("cgroup.procs")) {
                for pid in procs
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
