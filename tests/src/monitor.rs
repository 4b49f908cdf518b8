//! `ferrite monitor` as a user runs it: the real binary in a node's network
//! namespace, its lines read as they come.
use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, Map, MapData};
use ferrite_agent::monitor::Line;
use ferrite_common::map_names;

use crate::lab::{ferrite_bin, Node};

/// A running `ferrite monitor -o json`, killed on drop.
pub struct Monitor {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Monitor {
    /// Start `ferrite monitor -o json ARGS` for `node`, in its network namespace,
    /// and wait until the agent has subscribed it (`timeout`: a hang guard).
    pub fn start(node: &Node, args: &[&str], timeout: Duration) -> Result<Self> {
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", node.netns.path().display()))
            .arg(ferrite_bin())
            .args(["monitor", "--node", &node.name, "-o", "json"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting ferrite monitor")?;
        let lines = forward_lines(child.stdout.take().context("stdout")?);
        let stderr = forward_lines(child.stderr.take().context("stderr")?);
        let mut monitor = Self {
            child,
            lines,
            stderr,
        };
        let said = monitor.stderr_until(timeout, |line| line.contains("listening on node"))?;
        if !said {
            bail!("ferrite monitor never started listening");
        }
        Ok(monitor)
    }

    /// Read stderr lines until one satisfies `done` (`false`: it ended first).
    fn stderr_until(&mut self, timeout: Duration, done: impl Fn(&str) -> bool) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) if done(&line) => return Ok(true),
                Ok(line) => eprintln!("ferrite monitor: {line}"),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(false),
                Err(mpsc::RecvTimeoutError::Timeout) => bail!("ferrite monitor: no answer"),
            }
        }
    }

    /// The first line printed from now on that `wanted` accepts, each a JSON object
    /// (`timeout`: a hang guard).
    pub fn wait_for(&self, timeout: Duration, wanted: impl Fn(&Line) -> bool) -> Result<Line> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let text = self
                .lines
                .recv_timeout(left)
                .context("no such line from ferrite monitor")?;
            let line: Line = serde_json::from_str(&text)
                .with_context(|| format!("not one JSON object: {text:?}"))?;
            if wanted(&line) {
                return Ok(line);
            }
        }
    }

    /// Stop it as a user would (Ctrl-C).
    pub fn interrupt(mut self) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn forward_lines(from: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if send.send(line).is_err() {
                break;
            }
        }
    });
    receive
}

/// The `ferrite_monitor` entry of `node`: which events the datapath writes now.
pub fn wanted_events(node: &Node) -> Result<u32> {
    let path = node.pin_dir().join(map_names::MONITOR);
    let map = Map::from_map_data(MapData::from_pin(&path)?)?;
    let entry: Array<MapData, u32> = map.try_into()?;
    Ok(entry.get(&0, 0)?)
}
