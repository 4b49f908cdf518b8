//! `cargo xtask audit [--advisory-db DIR]`: cargo-deny over both Cargo.lock files.
use std::{path::PathBuf, process::Command};

use anyhow::Result;

use crate::process::{cargo, root, run, stdout_of};

const CARGO_DENY_VERSION: &str = "0.20.2";
/// Where cargo-deny fetches the RustSec advisory database from by default.
const ADVISORY_DB_HOST: &str = "github.com:443";
/// The directory cargo-deny (this version) keeps its clone of that database in.
const ADVISORY_DB_DIR: &str = "advisory-db-3157b0e258782691";

pub fn command(advisory_db: Option<PathBuf>) -> Result<()> {
    let advisory_db =
        advisory_db.or_else(|| std::env::var_os("FERRITE_ADVISORY_DB").map(Into::into));
    if !stdout_of(cargo().args(["deny", "--version"])).contains(CARGO_DENY_VERSION) {
        println!("audit: installing cargo-deny {CARGO_DENY_VERSION} (takes a few minutes)");
        run(cargo().args([
            "install",
            "cargo-deny",
            "--locked",
            "--version",
            CARGO_DENY_VERSION,
        ]))?;
    }
    let mut config = root().join("deny.toml");
    let mut checks = vec!["bans", "licenses", "sources"];
    let mut offline = false;
    match advisory_db {
        Some(db) => {
            // cargo-deny looks for its clone of the default database here; put a clone
            // of the local copy there and tell it not to fetch.
            let dbs = root().join("target/advisory-dbs");
            let clone = dbs.join(ADVISORY_DB_DIR);
            let _ = std::fs::remove_dir_all(&clone);
            std::fs::create_dir_all(&dbs)?;
            run(Command::new("git")
                .args(["clone", "--quiet"])
                .arg(&db)
                .arg(&clone))?;
            let local = root().join("target/deny-local-db.toml");
            let rules = std::fs::read_to_string(&config)?;
            let db_path = format!("[advisories]\ndb-path = \"{}\"\n", dbs.display());
            std::fs::write(&local, rules.replace("[advisories]\n", &db_path))?;
            config = local;
            offline = true;
            checks.push("advisories");
        }
        None if reachable(ADVISORY_DB_HOST) => checks.push("advisories"),
        None => println!(
            "audit: NOT checking advisories: {ADVISORY_DB_HOST} (the RustSec database) is \
             unreachable from this machine; pass --advisory-db <clone of rustsec/advisory-db>"
        ),
    }
    for manifest in [
        root().join("Cargo.toml"),
        root().join("datapath-ebpf/Cargo.toml"),
    ] {
        println!("audit: {} ({})", manifest.display(), checks.join(", "));
        let mut deny = cargo();
        deny.arg("deny");
        if offline {
            deny.arg("--offline");
        }
        run(deny
            .arg("--manifest-path")
            .arg(&manifest)
            .arg("--config")
            .arg(&config)
            .arg("check")
            .args(&checks))?;
    }
    Ok(())
}

/// Whether a TCP connection to `host:port` opens within a few seconds.
fn reachable(address: &str) -> bool {
    use std::net::ToSocketAddrs;
    address
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .is_some_and(|addr| {
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5)).is_ok()
        })
}
