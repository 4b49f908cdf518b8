//! `ferrite install-cni`: what the DaemonSet's init container does on every node
//! before its pods get a network. The runtime executes, for every pod sandbox,
//! `loopback` (containerd's CRI brings up the sandbox's `lo` with it, outside any
//! conflist) and each plugin the conflist chains; all of them must be in the CNI bin
//! directory, or the sandbox fails after Ferrite's ADD succeeded and is left half
//! set up.
//!
//! For each plugin needed ([`needed_plugins`]: the conflist's `type`s and IPAM
//! `type`s but `ferrite-cni`, plus `loopback`), one decision, logged in one line:
//! - the host has it: kept, never overwritten, after asking it (`VERSION`) whether
//!   it speaks the cniVersion it will be called with;
//! - the host lacks it and the image ships it (`--plugins-from`; deploy/cni-plugins
//!   is the list the Dockerfile copies there): the image's copy is installed;
//! - a copy this installer wrote earlier (its SHA-256 in [`RECORD_FILE`] still
//!   matches): replaced by the image's, so image upgrades reach it;
//! - otherwise the node cannot run sandboxes: every such plugin is named in one
//!   error and nothing is written.
//!
//! Then `ferrite-cni` (from next to the `ferrite` binary) and last the conflist with
//! the node's name: a runtime reports the network ready once a conflist is there,
//! so a node the installer refused stays not ready instead of failing sandboxes.
//! Every file is written under a temporary name and renamed into place: the
//! runtime never executes a half-written binary or reads a half-written conflist.
use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::cni::spec::NetConf;

/// The conflist's stand-in for the node's name (deploy/10-ferrite.conflist).
pub const NODE_PLACEHOLDER: &str = "__NODE_NAME__";

/// Ferrite's own plugin: installed from next to the `ferrite` binary.
pub const FERRITE_PLUGIN: &str = "ferrite-cni";

/// Plugins the runtime runs on its own, outside any conflist, with the cniVersion
/// it hands them: containerd's CRI (go-cni's built-in loopback network) runs
/// `loopback` with 0.3.1 for every sandbox.
pub const RUNTIME_PLUGINS: [(&str, &str); 1] = [("loopback", "0.3.1")];

/// In the bin directory: `SHA-256  NAME` (`sha256sum -c` reads it) of each plugin
/// this installer copied there from the image. A file whose hash no longer matches
/// was replaced by someone else and is the host's from then on.
pub const RECORD_FILE: &str = ".ferrite-installed.sha256";

pub struct Options {
    pub node: String,
    /// The host's CNI plugin directory, as mounted (e.g. /host/opt/cni/bin).
    pub bin_dir: PathBuf,
    /// The host's CNI configuration directory, as mounted.
    pub conf_dir: PathBuf,
    /// The conflist to install, with [`NODE_PLACEHOLDER`] for the node's name.
    pub conflist: PathBuf,
    /// The plugins the image ships, if any.
    pub plugins_from: Option<PathBuf>,
    /// The `ferrite-cni` binary to install.
    pub ferrite_cni: PathBuf,
}

/// A plugin the node must have, and the cniVersions it will be called with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Need {
    pub plugin: String,
    pub versions: Vec<String>,
    /// Who calls it: "the conflist", "the runtime" or the plugin it is IPAM of.
    pub why: String,
}

/// The conflist with the node's name in place of [`NODE_PLACEHOLDER`], as text and
/// parsed; its `ferrite-cni` entry must be one `ferrite-cni` accepts, naming `node`.
pub fn render_conflist(template: &str, node: &str) -> Result<(String, Value)> {
    // The name goes into JSON strings: escaped as JSON (quotes stripped).
    let escaped = serde_json::to_string(node)?;
    let text = template.replace(NODE_PLACEHOLDER, &escaped[1..escaped.len() - 1]);
    let conflist: Value = serde_json::from_str(&text).context("the conflist is not JSON")?;
    let plugins = conflist["plugins"]
        .as_array()
        .context("the conflist has no \"plugins\" list")?;
    let ours = plugins
        .iter()
        .find(|p| p["type"] == FERRITE_PLUGIN)
        .with_context(|| format!("the conflist chains no {FERRITE_PLUGIN}"))?;
    // What the runtime will hand ferrite-cni (libcni adds name and cniVersion).
    let mut config = ours.clone();
    config["name"] = conflist["name"].clone();
    config["cniVersion"] = conflist["cniVersion"].clone();
    let parsed = NetConf::parse(config.to_string().as_bytes()).map_err(|e| {
        anyhow::anyhow!(
            "{FERRITE_PLUGIN} would refuse the conflist: {} {}",
            e.msg,
            e.details
        )
    })?;
    if parsed.node != node {
        bail!(
            "the conflist's {FERRITE_PLUGIN} entry names node {:?}, not {node:?}",
            parsed.node
        );
    }
    Ok((text, conflist))
}

/// Every plugin but `ferrite-cni` the runtime executes with this conflist: the
/// chained `type`s and their IPAM `type`s, with the conflist's cniVersion (and its
/// `cniVersions`: a runtime may pick any of them), and [`RUNTIME_PLUGINS`].
pub fn needed_plugins(conflist: &Value) -> Result<Vec<Need>> {
    let mut versions: Vec<String> = conflist["cniVersion"]
        .as_str()
        .map(String::from)
        .into_iter()
        .collect();
    if let Some(more) = conflist["cniVersions"].as_array() {
        versions.extend(more.iter().filter_map(|v| v.as_str().map(String::from)));
    }
    versions.sort();
    versions.dedup();
    if versions.is_empty() {
        bail!("the conflist has no cniVersion");
    }
    let mut needs: BTreeMap<String, Need> = BTreeMap::new();
    let mut need = |plugin: &Value, versions: &[String], why: String| -> Result<()> {
        let name = plugin
            .as_str()
            .with_context(|| format!("a plugin without a \"type\" ({why})"))?;
        // A type is a file name in the bin directory, never a path.
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            bail!("{name:?} is not a plugin name ({why})");
        }
        if name != FERRITE_PLUGIN {
            let entry = needs.entry(name.to_string()).or_insert_with(|| Need {
                plugin: name.to_string(),
                versions: Vec::new(),
                why: why.clone(),
            });
            entry.versions.extend_from_slice(versions);
            entry.versions.sort();
            entry.versions.dedup();
        }
        Ok(())
    };
    let plugins = conflist["plugins"]
        .as_array()
        .context("the conflist has no \"plugins\" list")?;
    for plugin in plugins {
        need(&plugin["type"], &versions, "the conflist chains it".into())?;
        if !plugin["ipam"].is_null() {
            let of = plugin["type"].as_str().unwrap_or("?");
            let why = format!("the conflist chains it as IPAM of {of}");
            need(&plugin["ipam"]["type"], &versions, why)?;
        }
    }
    for (plugin, version) in RUNTIME_PLUGINS {
        need(
            &Value::from(plugin),
            &[version.to_string()],
            "the runtime runs it for every sandbox".into(),
        )?;
    }
    Ok(needs.into_values().collect())
}

/// What a plugin answered to `VERSION`.
enum Answer {
    Supports(Vec<String>),
    /// It could not be started here (e.g. its loader is on the host only).
    NotStarted(io::Error),
}

/// Ask a plugin which spec versions it speaks (`CNI_COMMAND=VERSION`, the
/// version it will be called with on stdin, nothing else in its environment).
fn ask_versions(path: &Path, version: &str) -> Result<Answer> {
    let child = Command::new(path)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => return Ok(Answer::NotStarted(e)),
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A plugin that exits without reading stdin closes the pipe: not an error.
        let _ = stdin.write_all(format!(r#"{{"cniVersion":"{version}"}}"#).as_bytes());
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "VERSION failed ({}): {}{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let answer: Value = serde_json::from_str(&stdout)
        .with_context(|| format!("VERSION answered {:?}, not JSON", stdout.trim()))?;
    // Spec 0.1.0 plugins answer with their one version only.
    let supported = match answer["supportedVersions"].as_array() {
        Some(list) => list
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        None => answer["cniVersion"]
            .as_str()
            .map(String::from)
            .into_iter()
            .collect(),
    };
    Ok(Answer::Supports(supported))
}

/// Check that `path` speaks every version `need` is called with: what it answered,
/// or why it could not be asked from here.
fn check_versions(path: &Path, need: &Need) -> Result<Answer> {
    let newest = need.versions.last().map(String::as_str).unwrap_or("1.0.0");
    match ask_versions(path, newest).with_context(|| {
        format!(
            "{} ({}) did not answer VERSION",
            need.plugin,
            path.display()
        )
    })? {
        Answer::NotStarted(e) => Ok(Answer::NotStarted(e)),
        Answer::Supports(supported) => {
            let missing: Vec<&String> = need
                .versions
                .iter()
                .filter(|v| !supported.contains(v))
                .collect();
            if !missing.is_empty() {
                let missing: Vec<&str> = missing.iter().map(|v| v.as_str()).collect();
                // The plugins' release that vendored libcni 1.2 (go.mod of v1.6.0).
                let hint = if missing.contains(&"1.1.0") {
                    " (containernetworking-plugins 1.6.0 is the first release whose plugins do)"
                } else {
                    ""
                };
                bail!(
                    "{} ({}) speaks CNI {}, but {} with {}: install a {} that knows {} on the node{hint}",
                    need.plugin,
                    path.display(),
                    supported.join(", "),
                    need.why,
                    need.versions.join(", "),
                    need.plugin,
                    missing.join(", ")
                );
            }
            Ok(Answer::Supports(supported))
        }
    }
}

fn sha256_of(path: &Path) -> Result<String> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// [`RECORD_FILE`]: plugin name -> SHA-256 of the copy written.
fn read_record(bin_dir: &Path) -> BTreeMap<String, String> {
    let text = fs::read_to_string(bin_dir.join(RECORD_FILE)).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (hash, name) = (fields.next()?, fields.next()?);
            Some((name.to_string(), hash.to_string()))
        })
        .collect()
}

/// Write `dir/name` with `mode`: under a temporary name (a link planted there is not
/// followed), synced, then renamed over the old file.
fn write_atomically(
    dir: &Path,
    name: &str,
    mode: u32,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<()> {
    let tmp = dir.join(format!(".{name}.ferrite-tmp"));
    let _ = fs::remove_file(&tmp);
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)?;
        fill(&mut file)?;
        // Whatever the umask took away.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&tmp, dir.join(name))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing {}", dir.join(name).display()))
}

fn copy_into(from: &Path, dir: &Path, name: &str) -> Result<()> {
    let mut source = File::open(from).with_context(|| format!("opening {}", from.display()))?;
    write_atomically(dir, name, 0o755, |file| {
        io::copy(&mut source, file).map(drop)
    })
}

/// What to do about one needed plugin.
enum Decision {
    /// The host's file stays; the line to log.
    Keep(String),
    /// The host's file stays, but could not be asked its versions from here.
    KeepUnchecked(String),
    /// The image's file: copied over when `copy` (missing on the host, or an older
    /// copy of ours), else already there; recorded as ours either way.
    Install {
        from: PathBuf,
        copy: bool,
        line: String,
    },
}

fn decide(
    need: &Need,
    bin_dir: &Path,
    plugins_from: Option<&Path>,
    record: &BTreeMap<String, String>,
) -> Result<Decision> {
    let name = &need.plugin;
    let target = bin_dir.join(name);
    let shipped = plugins_from
        .map(|dir| dir.join(name))
        .filter(|p| p.is_file());
    // For the log: what a plugin answered.
    let speaks = |answer: Answer| match answer {
        Answer::Supports(supported) => format!("speaks CNI {}", supported.join(", ")),
        Answer::NotStarted(e) => format!("could not run it here to ask its versions: {e}"),
    };
    let meta = match fs::symlink_metadata(&target) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let Some(from) = shipped else {
                let image = match plugins_from {
                    Some(dir) => format!("the image does not ship it (not in {})", dir.display()),
                    None => "no --plugins-from to install it from".into(),
                };
                bail!(
                    "{name}: not in {} and {image}; {}: install it on the node (containernetworking-plugins)",
                    bin_dir.display(),
                    need.why
                );
            };
            let answer = speaks(check_versions(&from, need)?);
            let line = format!(
                "{name}: not on the host ({}): installing the image's copy from {} ({answer})",
                need.why,
                from.display()
            );
            return Ok(Decision::Install {
                from,
                copy: true,
                line,
            });
        }
        Err(e) => return Err(e).with_context(|| format!("{name}: {}", target.display())),
    };
    if meta.is_symlink() {
        let to = fs::read_link(&target).unwrap_or_default();
        return Ok(Decision::KeepUnchecked(format!(
            "{name}: kept the host's {} (a link to {}, on the host: not checked from here)",
            target.display(),
            to.display()
        )));
    }
    if !meta.is_file() {
        bail!("{name}: {} is not a file", target.display());
    }
    if let (Some(from), Some(hash)) = (&shipped, record.get(name)) {
        if sha256_of(&target)? == *hash {
            let answer = speaks(check_versions(from, need)?);
            let copy = sha256_of(from)? != *hash;
            let line = if copy {
                format!(
                    "{name}: replacing the copy installed earlier with the image's from {} ({answer})",
                    from.display()
                )
            } else {
                format!(
                    "{name}: the image's copy installed earlier is current ({})",
                    target.display()
                )
            };
            return Ok(Decision::Install {
                from: from.clone(),
                copy,
                line,
            });
        }
    }
    if meta.permissions().mode() & 0o111 == 0 {
        bail!("{name}: the host's {} is not executable", target.display());
    }
    let answer = check_versions(&target, need)?;
    let checked = matches!(answer, Answer::Supports(_));
    let line = format!(
        "{name}: kept the host's {} ({})",
        target.display(),
        speaks(answer)
    );
    Ok(if checked {
        Decision::Keep(line)
    } else {
        Decision::KeepUnchecked(line)
    })
}

/// Install Ferrite's CNI plugin and configuration on the node (see the module).
pub fn install(options: &Options) -> Result<()> {
    let template = fs::read_to_string(&options.conflist)
        .with_context(|| format!("reading {}", options.conflist.display()))?;
    let (text, conflist) = render_conflist(&template, &options.node)?;
    let needs = needed_plugins(&conflist)?;
    let record = read_record(&options.bin_dir);

    let mut decisions = Vec::new();
    let mut refusals = Vec::new();
    for need in &needs {
        match decide(
            need,
            &options.bin_dir,
            options.plugins_from.as_deref(),
            &record,
        ) {
            Ok(decision) => decisions.push((need, decision)),
            Err(e) => refusals.push(format!("{e:#}")),
        }
    }
    if !refusals.is_empty() {
        bail!(
            "this node cannot run pod sandboxes with {}; nothing installed: {}",
            options.conflist.display(),
            refusals.join("; ")
        );
    }

    let mut installed = BTreeMap::new();
    for (need, decision) in decisions {
        match decision {
            Decision::Keep(line) => info!("{line}"),
            Decision::KeepUnchecked(line) => warn!("{line}"),
            Decision::Install { from, copy, line } => {
                if copy {
                    copy_into(&from, &options.bin_dir, &need.plugin)?;
                }
                installed.insert(need.plugin.clone(), sha256_of(&from)?);
                info!("{line}");
            }
        }
    }
    // Earlier copies of plugins no longer needed stay recorded while unchanged.
    for (name, hash) in record {
        let current = options.bin_dir.join(&name);
        if !installed.contains_key(&name) && sha256_of(&current).is_ok_and(|h| h == hash) {
            installed.insert(name, hash);
        }
    }
    let lines: String = installed
        .iter()
        .map(|(name, hash)| format!("{hash}  {name}\n"))
        .collect();
    write_atomically(&options.bin_dir, RECORD_FILE, 0o644, |file| {
        file.write_all(lines.as_bytes())
    })?;

    copy_into(&options.ferrite_cni, &options.bin_dir, FERRITE_PLUGIN)?;
    info!(
        "{FERRITE_PLUGIN}: installed {} from {}",
        options.bin_dir.join(FERRITE_PLUGIN).display(),
        options.ferrite_cni.display()
    );
    let file_name = options
        .conflist
        .file_name()
        .context("the conflist path has no file name")?
        .to_string_lossy()
        .into_owned();
    write_atomically(&options.conf_dir, &file_name, 0o644, |file| {
        file.write_all(text.as_bytes())
    })?;
    // The renames themselves survive a crash.
    File::open(&options.bin_dir)?.sync_all()?;
    File::open(&options.conf_dir)?.sync_all()?;
    info!(
        "conflist: wrote {} for node {} (cniVersion {}, plugins {})",
        options.conf_dir.join(&file_name).display(),
        options.node,
        conflist["cniVersion"].as_str().unwrap_or("?"),
        conflist["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["type"].as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_needed_plugins_come_from_the_conflist_and_the_runtime() {
        let conflist = json!({
            "cniVersion": "1.0.0",
            "cniVersions": ["1.0.0", "1.1.0"],
            "name": "n",
            "plugins": [
                {"type": "ferrite-cni", "node": "n1"},
                {"type": "portmap", "capabilities": {"portMappings": true}},
                {"type": "bandwidth", "ipam": {"type": "host-local"}},
            ],
        });
        let needs = needed_plugins(&conflist).unwrap();
        let names: Vec<(&str, Vec<&str>)> = needs
            .iter()
            .map(|n| {
                (
                    n.plugin.as_str(),
                    n.versions.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                ("bandwidth", vec!["1.0.0", "1.1.0"]),
                ("host-local", vec!["1.0.0", "1.1.0"]),
                ("loopback", vec!["0.3.1"]),
                ("portmap", vec!["1.0.0", "1.1.0"]),
            ]
        );
        for hostile in ["../../bin/sh", "", "a/b", ".."] {
            let conflist = json!({"cniVersion": "1.0.0", "plugins": [{"type": hostile}]});
            assert!(needed_plugins(&conflist).is_err(), "{hostile:?}");
        }
        assert!(needed_plugins(&json!({"plugins": []})).is_err());
    }

    #[test]
    fn the_rendered_conflist_names_the_node_or_is_refused() {
        let template = r#"{"cniVersion":"1.0.0","name":"ferrite",
            "plugins":[{"type":"ferrite-cni","node":"__NODE_NAME__"}]}"#;
        let (_, conflist) = render_conflist(template, "worker-1").unwrap();
        assert_eq!(conflist["plugins"][0]["node"], "worker-1");
        // Not a node name ferrite-cni takes; quotes do not break out of the string.
        for bad in ["Worker", "a\",\"x\":\"", "../etc", ""] {
            assert!(render_conflist(template, bad).is_err(), "{bad:?}");
        }
        let other = template.replace("__NODE_NAME__", "worker-2");
        let refused = render_conflist(&other, "worker-1").unwrap_err().to_string();
        assert!(refused.contains("worker-2"), "{refused}");
        let without = r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"bridge"}]}"#;
        assert!(render_conflist(without, "worker-1").is_err());
    }
}
