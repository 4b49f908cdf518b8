//! `ferrite install-cni` as the DaemonSet's init container runs it, against scratch
//! directories standing for the node's /opt/cni/bin and /etc/cni/net.d and for the
//! image's plugin directory (filled as deploy/Dockerfile fills it, from Debian's
//! containernetworking-plugins): everything the runtime executes for a sandbox ends
//! up on the node, a host's own plugin is kept, and a plugin that can be neither
//! found nor installed fails the installer by name before anything is written
//! (issue 23: without `loopback`, sandboxes failed after Ferrite's ADD succeeded).
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use anyhow::Result;
use ferrite_tests::{
    install_cni::{
        deploy_dir, install_cni, is_executable, script_plugin, shipped_plugins, text_of, Scratch,
    },
    lab::ferrite_bin,
};
use serde_json::Value;

const NODE: &str = "worker-1";

/// A node's CNI directories and the image's plugins, all empty but the image's.
struct Node {
    scratch: Scratch,
    bin: PathBuf,
    conf: PathBuf,
    image: PathBuf,
}

impl Node {
    fn new(label: &str) -> Result<Self> {
        let scratch = Scratch::new(label)?;
        Ok(Self {
            bin: scratch.dir("host/opt/cni/bin")?,
            conf: scratch.dir("host/etc/cni/net.d")?,
            image: scratch.image_plugins("usr/lib/ferrite/cni")?,
            scratch,
        })
    }

    /// The installer's arguments, as the DaemonSet passes them.
    fn args(&self, conflist: &Path, with_image: bool) -> Vec<String> {
        let mut args = vec![
            format!("--node={NODE}"),
            format!("--bin-dir={}", self.bin.display()),
            format!("--conf-dir={}", self.conf.display()),
            format!("--conflist={}", conflist.display()),
        ];
        if with_image {
            args.push(format!("--plugins-from={}", self.image.display()));
        }
        args
    }

    /// A conflist template of this test's own: the shipped one, changed by `edit`.
    fn conflist(&self, edit: impl FnOnce(&mut Value)) -> Result<PathBuf> {
        let mut conflist = shipped_conflist()?;
        edit(&mut conflist);
        let path = self.scratch.dir("config")?.join("10-ferrite.conflist");
        fs::write(&path, serde_json::to_string_pretty(&conflist)?)?;
        Ok(path)
    }

    fn names_in(dir: &Path) -> Result<BTreeSet<String>> {
        Ok(fs::read_dir(dir)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?)
    }
}

fn shipped_conflist_path() -> PathBuf {
    deploy_dir().join("10-ferrite.conflist")
}

fn shipped_conflist() -> Result<Value> {
    Ok(serde_json::from_str(&fs::read_to_string(
        shipped_conflist_path(),
    )?)?)
}

/// A user's own addition to the shipped conflist: `portmap` chained after
/// ferrite-cni (which hands it its result as prevResult).
fn chain_portmap(conflist: &mut Value) {
    conflist["plugins"]
        .as_array_mut()
        .expect("plugins")
        .push(serde_json::json!({"type": "portmap", "capabilities": {"portMappings": true}}));
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[test]
fn an_empty_node_gets_ferrite_cni_every_chained_plugin_and_loopback_from_the_image() -> Result<()> {
    let node = Node::new("icni-empty")?;
    let run = install_cni(&node.args(&shipped_conflist_path(), true))?;
    let log = text_of(&run);
    assert!(run.status.success(), "{log}");
    for plugin in ["ferrite-cni", "loopback"] {
        assert!(is_executable(&node.bin.join(plugin)), "{plugin}: {log}");
    }
    // Every plugin the image ships (loopback only: the conflist chains none).
    for plugin in shipped_plugins()? {
        assert_eq!(
            fs::read(node.bin.join(&plugin))?,
            fs::read(node.image.join(&plugin))?,
            "{plugin}"
        );
        assert!(
            log.contains(&format!("{plugin}: not on the host")),
            "{plugin}: {log}"
        );
    }
    let built = ferrite_bin().with_file_name("ferrite-cni");
    assert_eq!(
        fs::metadata(node.bin.join("ferrite-cni"))?.len(),
        fs::metadata(built)?.len()
    );
    // The conflist is the shipped one naming this node, and nothing else is left.
    let written: Value =
        serde_json::from_str(&fs::read_to_string(node.conf.join("10-ferrite.conflist"))?)?;
    let mut expected = shipped_conflist()?;
    expected["plugins"][0]["node"] = NODE.into();
    assert_eq!(written, expected);
    assert!(log.contains("conflist: wrote"), "{log}");
    assert_eq!(
        Node::names_in(&node.bin)?,
        set(&[".ferrite-installed.sha256", "ferrite-cni", "loopback"])
    );
    assert_eq!(Node::names_in(&node.conf)?, set(&["10-ferrite.conflist"]));

    // The pod restarts: the same files, each decision logged again.
    let again = install_cni(&node.args(&shipped_conflist_path(), true))?;
    let log = text_of(&again);
    assert!(again.status.success(), "{log}");
    for plugin in shipped_plugins()? {
        assert!(
            log.contains(&format!(
                "{plugin}: the image's copy installed earlier is current"
            )),
            "{log}"
        );
        assert_eq!(
            fs::read(node.bin.join(&plugin))?,
            fs::read(node.image.join(&plugin))?
        );
    }
    Ok(())
}

#[test]
fn a_plugin_the_host_has_is_kept_unless_it_cannot_speak_the_conflists_version() -> Result<()> {
    // The user chains portmap (the image ships none: hostPorts need no plugin).
    let node = Node::new("icni-host")?;
    let host_portmap = node.bin.join("portmap");
    script_plugin(&host_portmap, &["0.4.0", "1.0.0"], "the host's portmap")?;
    let host_bytes = fs::read(&host_portmap)?;
    let conflist = node.conflist(chain_portmap)?;
    let run = install_cni(&node.args(&conflist, true))?;
    let log = text_of(&run);
    assert!(run.status.success(), "{log}");
    assert_eq!(fs::read(&host_portmap)?, host_bytes, "overwritten: {log}");
    assert!(
        log.contains(&format!(
            "portmap: kept the host's {} (speaks CNI 0.4.0, 1.0.0)",
            host_portmap.display()
        )),
        "{log}"
    );
    assert!(is_executable(&node.bin.join("loopback")), "{log}");
    assert!(node.conf.join("10-ferrite.conflist").exists());

    // A host's portmap too old for the conflist: refused by name, nothing written.
    let old = Node::new("icni-old")?;
    script_plugin(
        &old.bin.join("portmap"),
        &["0.3.1", "0.4.0"],
        "an old portmap",
    )?;
    let conflist = old.conflist(chain_portmap)?;
    let run = install_cni(&old.args(&conflist, true))?;
    let log = text_of(&run);
    assert!(!run.status.success(), "{log}");
    assert!(
        log.contains("portmap") && log.contains("speaks CNI 0.3.1, 0.4.0") && log.contains("1.0.0"),
        "{log}"
    );
    assert_eq!(Node::names_in(&old.bin)?, set(&["portmap"]));
    assert_eq!(Node::names_in(&old.conf)?, set(&[]));

    // A 1.1.0 conflist needs a portmap that knows 1.1.0; the host's (Debian
    // bookworm's 1.1.1) does not, so the node is refused, the release named.
    let newer = Node::new("icni-110")?;
    fs::copy(
        Path::new(ferrite_tests::cni::SYSTEM_PLUGIN_DIR).join("portmap"),
        newer.bin.join("portmap"),
    )?;
    let conflist = newer.conflist(|c| {
        c["cniVersion"] = "1.1.0".into();
        chain_portmap(c);
    })?;
    let run = install_cni(&newer.args(&conflist, true))?;
    let log = text_of(&run);
    assert!(!run.status.success(), "{log}");
    assert!(
        log.contains("portmap") && log.contains("containernetworking-plugins 1.6.0"),
        "{log}"
    );
    assert_eq!(Node::names_in(&newer.conf)?, set(&[]));
    Ok(())
}

#[test]
fn a_plugin_neither_on_the_host_nor_in_the_image_fails_naming_it_before_anything_is_written(
) -> Result<()> {
    let node = Node::new("icni-missing")?;
    let conflist = node.conflist(|c| {
        c["plugins"]
            .as_array_mut()
            .expect("plugins")
            .push(serde_json::json!({"type": "bandwidth", "capabilities": {"bandwidth": true}}))
    })?;
    let run = install_cni(&node.args(&conflist, true))?;
    let log = text_of(&run);
    assert!(!run.status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "bandwidth: not in {} and the image does not ship it",
            node.bin.display()
        )),
        "{log}"
    );
    assert_eq!(Node::names_in(&node.bin)?, set(&[]));
    assert_eq!(Node::names_in(&node.conf)?, set(&[]));

    // Without the image's plugins, an empty node lacks loopback and the portmap a
    // user chained: both named in one error.
    let conflist = node.conflist(chain_portmap)?;
    let run = install_cni(&node.args(&conflist, false))?;
    let log = text_of(&run);
    assert!(!run.status.success(), "{log}");
    for plugin in ["loopback", "portmap"] {
        assert!(
            log.contains(&format!("{plugin}: not in {}", node.bin.display())),
            "{plugin}: {log}"
        );
    }
    assert_eq!(Node::names_in(&node.bin)?, set(&[]));
    assert_eq!(Node::names_in(&node.conf)?, set(&[]));
    Ok(())
}

#[test]
fn a_copy_installed_earlier_follows_the_image_and_one_replaced_on_the_host_is_kept() -> Result<()> {
    let node = Node::new("icni-upgrade")?;
    let args = node.args(&shipped_conflist_path(), true);
    let first = install_cni(&args)?;
    assert!(first.status.success(), "{}", text_of(&first));

    // A new image with another loopback: the copy installed before is replaced.
    script_plugin(
        &node.image.join("loopback"),
        &["0.3.1", "1.0.0"],
        "the next image's loopback",
    )?;
    let upgrade = install_cni(&args)?;
    let log = text_of(&upgrade);
    assert!(upgrade.status.success(), "{log}");
    assert_eq!(
        fs::read(node.bin.join("loopback"))?,
        fs::read(node.image.join("loopback"))?,
        "{log}"
    );
    assert!(
        log.contains("loopback: replacing the copy installed earlier"),
        "{log}"
    );
    let record = fs::read_to_string(node.bin.join(".ferrite-installed.sha256"))?;
    assert!(record.contains("  loopback"), "{record}");

    // Someone put their own loopback on the node: it is the host's from now on.
    let admins = node.bin.join("loopback");
    script_plugin(&admins, &["0.3.1", "1.0.0"], "the admin's loopback")?;
    let admins_bytes = fs::read(&admins)?;
    let again = install_cni(&args)?;
    let log = text_of(&again);
    assert!(again.status.success(), "{log}");
    assert_eq!(fs::read(&admins)?, admins_bytes, "{log}");
    assert!(log.contains("loopback: kept the host's"), "{log}");
    let record = fs::read_to_string(node.bin.join(".ferrite-installed.sha256"))?;
    assert!(!record.contains("loopback"), "{record}");
    Ok(())
}
