//! A node's agent from outside: its HTTP endpoint, `ferrite inspect` and
//! `ferrite explain` as an operator runs them.
use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result};

use super::{ferrite_bin, http_get, sh, Node};

impl Node {
    /// GET `path` from the agent's HTTP endpoint (its default port, in the node's
    /// netns): (status, body).
    pub fn agent_http(&self, path: &str) -> Result<(u16, String)> {
        self.http_on(9965, path)
    }

    /// GET `path` from kube-proxy's health endpoint the agent serves (its default
    /// port 10256, on every address of the node's netns): (status, body).
    pub fn proxy_healthz(&self, path: &str) -> Result<(u16, String)> {
        self.http_on(10256, path)
    }

    /// GET `path` from 127.0.0.1:`port` in the node's netns: (status, body).
    fn http_on(&self, port: u16, path: &str) -> Result<(u16, String)> {
        let path = path.to_string();
        self.netns.run(move || -> Result<(u16, String)> {
            let mut stream = TcpStream::connect_timeout(
                &SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into(),
                Duration::from_secs(5),
            )?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            http_get(&mut stream, &path)
        })?
    }

    /// A counter or gauge of the agent's /metrics (`name` as exported, e.g.
    /// `ferrite_syncs_total`), summed over its label sets.
    pub fn metric(&self, name: &str) -> Result<f64> {
        let (_, text) = self.agent_http("/metrics")?;
        let values: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        anyhow::ensure!(!values.is_empty(), "no metric {name}");
        Ok(values.iter().sum())
    }

    /// `ferrite inspect <table>` output for this node.
    pub fn inspect(&self, table: &str) -> Result<String> {
        sh(
            ferrite_bin().to_str().context("path")?,
            &["inspect", "--node", &self.name, table],
        )
    }

    /// `ferrite inspect --node <name> ARGS` output for this node.
    pub fn inspect_text(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["inspect", "--node", &self.name];
        all.extend_from_slice(args);
        sh(ferrite_bin().to_str().context("path")?, &all)
    }

    /// `ferrite explain --node <name> ARGS` run in the node's network namespace (as
    /// an operator runs it, with nsenter): its output.
    pub fn explain_text(&self, args: &[&str]) -> Result<String> {
        let netns = format!("--net={}", self.netns.path().display());
        let bin = ferrite_bin();
        let mut all = vec![
            netns.as_str(),
            bin.to_str().context("path")?,
            "explain",
            "--node",
            &self.name,
        ];
        all.extend_from_slice(args);
        sh("nsenter", &all)
    }

    /// `ferrite explain --node <name> ARGS -o json` in the node's netns, parsed.
    pub fn explain(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend_from_slice(&["-o", "json"]);
        let shown = self.explain_text(&all)?;
        serde_json::from_str(&shown).with_context(|| format!("not JSON:\n{shown}"))
    }

    /// `ferrite inspect diff` against this node's config file, run in its network
    /// namespace as an operator runs it, with `extra` arguments (e.g. `-o json`).
    pub fn inspect_diff(&self, extra: &[&str]) -> Result<String> {
        let netns = format!("--net={}", self.netns.path().display());
        let bin = ferrite_bin();
        let config = self.config_path();
        let mut args = vec![
            netns.as_str(),
            bin.to_str().context("path")?,
            "inspect",
            "--node",
            &self.name,
            "diff",
            "--config",
            config.to_str().context("path")?,
        ];
        args.extend_from_slice(extra);
        sh("nsenter", &args)
    }

    /// `ferrite inspect <table> -o json` output for this node, parsed.
    pub fn inspect_json(&self, table: &str) -> Result<serde_json::Value> {
        self.inspect_json_with(table, &[])
    }

    /// `ferrite inspect <table> EXTRA -o json` output for this node, parsed.
    pub fn inspect_json_with(&self, table: &str, extra: &[&str]) -> Result<serde_json::Value> {
        let mut args = vec!["inspect", "--node", &self.name, table, "-o", "json"];
        args.extend_from_slice(extra);
        let shown = sh(ferrite_bin().to_str().context("path")?, &args)?;
        serde_json::from_str(&shown).with_context(|| format!("not JSON:\n{shown}"))
    }
}
