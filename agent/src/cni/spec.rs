//! The CNI protocol (spec 1.1.0): environment, network configuration, result and
//! error objects, versions. Nothing here touches the system.
use std::{
    collections::BTreeMap,
    io::Read,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

pub const SPEC_VERSION: &str = "1.1.0";
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Error codes: 1-99 are the spec's, 100+ Ferrite's own.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// Wiring the pod (veth, addresses, datapath attachment, maps) failed.
    pub const WIRING_FAILED: u32 = 100;
    /// The node's pod CIDR has no free address.
    pub const NO_FREE_ADDRESS: u32 = 101;
    /// CHECK found the pod's networking different from what ADD set up.
    pub const CHECK_FAILED: u32 = 102;
    /// ADD for an attachment that already has an address (DEL it first).
    pub const ALREADY_ATTACHED: u32 = 103;
}

/// The spec's error object; printed on stdout with exit status 1.
#[derive(Debug, Serialize)]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            cni_version: SPEC_VERSION.into(),
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }
}

/// Turn internal errors into a CNI error with a code and a message; the cause chain
/// goes into `details`.
pub trait OrCode<T> {
    fn or_code(self, code: u32, msg: &str) -> Result<T, CniError>;
}

impl<T> OrCode<T> for anyhow::Result<T> {
    fn or_code(self, code: u32, msg: &str) -> Result<T, CniError> {
        self.map_err(|e| CniError::new(code, msg).details(format!("{e:#}")))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

/// What the runtime passes in the environment.
#[derive(Clone, Debug)]
pub struct Environment {
    pub command: Command,
    pub container_id: String,
    /// Empty when not given (allowed for DEL).
    pub netns: String,
    pub ifname: String,
    /// CNI_ARGS as key/value pairs (K8S_POD_NAMESPACE, K8S_POD_NAME, ...).
    pub args: BTreeMap<String, String>,
}

/// The longest CNI_CONTAINERID taken. Runtimes make 64 hex digits (containerd,
/// CRI-O, Podman) or a UUID; the spec sets no bound, but the id is stored in the
/// attachment's allocation file, which must stay far below what the plugin reads
/// back (64 KiB): a 100,000-character id made an ADD whose DEL found nothing.
pub const MAX_CONTAINER_ID: usize = 1024;

/// The most the plugin reads of stdin (the network configuration, with
/// `prevResult` or GC's `cni.dev/valid-attachments`: kilobytes in practice).
pub const MAX_INPUT: u64 = 1024 * 1024;

/// Container ids: alphanumerics plus `_ . -`, starting with an alphanumeric (spec),
/// at most [`MAX_CONTAINER_ID`] characters.
fn valid_container_id(id: &str) -> bool {
    id.len() <= MAX_CONTAINER_ID
        && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// Linux interface names: 1-15 bytes, no `/`, `:` or whitespace, not `.` or `..`.
fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

impl Environment {
    /// Read and check the variables `CNI_COMMAND` needs (error code 4 otherwise).
    pub fn parse(var: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let invalid = |msg: String| CniError::new(code::INVALID_ENVIRONMENT, msg);
        let command = match var("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("GC") => Command::Gc,
            Some("STATUS") => Command::Status,
            Some("VERSION") => Command::Version,
            Some(other) => return Err(invalid(format!("unknown CNI_COMMAND {other:?}"))),
            None => return Err(invalid("CNI_COMMAND is not set".into())),
        };
        let per_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        let needs_netns = matches!(command, Command::Add | Command::Check);
        let get = |name: &str, required: bool| -> Result<String, CniError> {
            match var(name).filter(|v| !v.is_empty()) {
                Some(value) => Ok(value),
                None if required => Err(invalid(format!("{name} is not set"))),
                None => Ok(String::new()),
            }
        };
        let container_id = get("CNI_CONTAINERID", per_attachment)?;
        let netns = get("CNI_NETNS", needs_netns)?;
        let ifname = get("CNI_IFNAME", per_attachment)?;
        if per_attachment && !valid_container_id(&container_id) {
            // Shown cut short: the id may be anything the runtime was handed.
            let shown: String = container_id.chars().take(80).collect();
            return Err(invalid(format!(
                "invalid CNI_CONTAINERID {shown:?} ({} bytes): letters, digits, '_', '.' and '-', \
                 starting with a letter or digit, at most {MAX_CONTAINER_ID}",
                container_id.len()
            )));
        }
        if per_attachment && !valid_ifname(&ifname) {
            return Err(invalid(format!("invalid CNI_IFNAME {ifname:?}")));
        }
        let args = var("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
        })
    }

    /// The Kubernetes pod (namespace, name) from CNI_ARGS, when the runtime is a kubelet.
    pub fn pod(&self) -> Option<(&str, &str)> {
        Some((
            self.args.get("K8S_POD_NAMESPACE")?.as_str(),
            self.args.get("K8S_POD_NAME")?.as_str(),
        ))
    }
}

/// An attachment named in `cni.dev/valid-attachments` (GC).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

pub const DEFAULT_MTU: u32 = 1450;
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/ferrite";

fn default_mtu() -> u32 {
    DEFAULT_MTU
}

/// Ferrite's network configuration (one plugin entry of a conflist, as the runtime
/// passes it). Unknown fields (runtimeConfig, args, other plugins' keys) are ignored.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    /// This node's name: selects the pinned datapath (/sys/fs/bpf/ferrite/<node>/).
    pub node: String,
    /// Pod addresses come from here; default: the CIDR the agent published from the
    /// node's Node object (/run/ferrite/<node>/pod-cidr).
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Option<Ipv4Net>,
    /// Dual-stack: the pod CIDRs, one per IP family, an IPv4 one among them (instead
    /// of `podCIDR`). Each pod gets an address of each.
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Option<Vec<IpNet>>,
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// IPAM state; default /var/lib/cni/ferrite (one directory per node inside).
    pub data_dir: Option<PathBuf>,
    pub prev_result: Option<serde_json::Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// Read the network configuration from `input` (stdin): at most [`MAX_INPUT`]
/// bytes. More is refused (code 7) without reading on, so a runtime (or anyone)
/// piping an endless stream cannot make the plugin's memory grow with it.
pub fn read_input(input: impl Read) -> Result<Vec<u8>, CniError> {
    let mut content = Vec::new();
    input
        .take(MAX_INPUT + 1)
        .read_to_end(&mut content)
        .map_err(|e| {
            CniError::new(code::IO_FAILURE, "cannot read the network configuration")
                .details(e.to_string())
        })?;
    if content.len() as u64 > MAX_INPUT {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("the network configuration on stdin is larger than {MAX_INPUT} bytes"),
        ));
    }
    Ok(content)
}

impl NetConf {
    /// Parse stdin: undecodable JSON is code 6, a wrong or missing field code 7, an
    /// unsupported cniVersion code 1.
    pub fn parse(input: &[u8]) -> Result<Self, CniError> {
        let conf: NetConf = serde_json::from_slice(input).map_err(|e| {
            let code = if e.is_data() {
                code::INVALID_CONFIG
            } else {
                code::DECODE_FAILURE
            };
            CniError::new(code, "invalid network configuration").details(e.to_string())
        })?;
        let invalid = |msg: String| {
            let mut error = CniError::new(code::INVALID_CONFIG, msg);
            error.cni_version = conf.cni_version.clone();
            error
        };
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion {} is not supported", conf.cni_version),
            )
            .details(format!("supported: {}", SUPPORTED_VERSIONS.join(", "))));
        }
        if !crate::files::valid_node_name(&conf.node) {
            return Err(invalid(format!("invalid node name {:?}", conf.node)));
        }
        if conf.pod_cidr.is_some() && conf.pod_cidrs.is_some() {
            return Err(invalid(
                "podCIDR and podCIDRs are both set: give one".into(),
            ));
        }
        if let Some(cidrs) = &conf.pod_cidrs {
            PodRanges::of(cidrs).map_err(|why| invalid(format!("podCIDRs: {why}")))?;
        }
        if !(68..=65535).contains(&conf.mtu) {
            return Err(invalid(format!("mtu {} out of range 68-65535", conf.mtu)));
        }
        if conf.name.is_empty() {
            return Err(invalid("the network name is empty".into()));
        }
        // A relative path would name a directory under whatever the runtime's
        // working directory happens to be.
        if let Some(dir) = conf.data_dir.as_ref().filter(|d| !d.is_absolute()) {
            return Err(invalid(format!("dataDir {dir:?} is not an absolute path")));
        }
        Ok(conf)
    }

    /// The pod CIDRs the configuration sets, if it sets any.
    pub fn configured_ranges(&self) -> Option<PodRanges> {
        match (&self.pod_cidrs, self.pod_cidr) {
            (Some(cidrs), _) => PodRanges::of(cidrs).ok(),
            (None, Some(v4)) => Some(PodRanges { v4, v6: None }),
            (None, None) => None,
        }
    }

    /// The IPAM directory of this node.
    pub fn ipam_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
            .join(&self.node)
    }

    /// Results before 1.0.0 carry `version` in each IP; 1.1.0 adds interface MTUs.
    fn result_version(&self) -> (bool, bool) {
        let pre_1_0 = self.cni_version.starts_with("0.");
        (pre_1_0, self.cni_version == "1.1.0")
    }
}

/// The ranges pods of this node get addresses from: always an IPv4 one (the
/// datapath is IPv4), and an IPv6 one on a dual-stack node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodRanges {
    pub v4: Ipv4Net,
    pub v6: Option<Ipv6Net>,
}

impl PodRanges {
    /// One CIDR per family, an IPv4 one among them.
    pub fn of(cidrs: &[IpNet]) -> Result<Self, String> {
        let (mut v4, mut v6) = (None, None);
        for cidr in cidrs {
            let twice = match cidr.trunc() {
                IpNet::V4(net) => v4.replace(net).is_some(),
                IpNet::V6(net) => v6.replace(net).is_some(),
            };
            if twice {
                return Err(format!("more than one CIDR of {cidr}'s family"));
            }
        }
        let v4 = v4.ok_or("no IPv4 CIDR (IPv6-only pods are not supported)")?;
        Ok(Self { v4, v6 })
    }

    /// As the agent publishes them: one per line.
    pub fn parse_lines(text: &str) -> Result<Self, String> {
        let cidrs = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| {
                l.parse::<IpNet>()
                    .map_err(|_| format!("{l:?} is not a CIDR"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::of(&cidrs)
    }
}

impl std::fmt::Display for PodRanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.v4)?;
        match self.v6 {
            Some(v6) => write!(f, ",{v6}"),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct IpConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<&'static str>,
    pub address: String,
    pub gateway: String,
    pub interface: usize,
}

#[derive(Debug, Serialize)]
pub struct Route {
    pub dst: String,
    pub gw: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Dns {}

/// The ADD result.
#[derive(Debug, Serialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

/// What ADD set up, for the result.
pub struct Wired {
    pub host_interface: String,
    pub host_mac: String,
    pub pod_interface: String,
    pub pod_mac: String,
    pub sandbox: String,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    /// Dual-stack: the pod's IPv6 address and its link-local gateway.
    pub ip6: Option<(Ipv6Addr, Ipv6Addr)>,
}

impl CniResult {
    pub fn new(conf: &NetConf, wired: &Wired) -> Self {
        let (pre_1_0, with_mtu) = conf.result_version();
        let mtu = with_mtu.then_some(conf.mtu);
        Self {
            cni_version: conf.cni_version.clone(),
            interfaces: vec![
                Interface {
                    name: wired.host_interface.clone(),
                    mac: wired.host_mac.clone(),
                    mtu,
                    sandbox: None,
                },
                Interface {
                    name: wired.pod_interface.clone(),
                    mac: wired.pod_mac.clone(),
                    mtu,
                    sandbox: Some(wired.sandbox.clone()),
                },
            ],
            ips: std::iter::once(IpConfig {
                version: pre_1_0.then_some("4"),
                address: format!("{}/32", wired.ip),
                gateway: wired.gateway.to_string(),
                interface: 1,
            })
            .chain(wired.ip6.map(|(ip, gateway)| IpConfig {
                version: pre_1_0.then_some("6"),
                address: format!("{ip}/128"),
                gateway: gateway.to_string(),
                interface: 1,
            }))
            .collect(),
            routes: std::iter::once(Route {
                dst: "0.0.0.0/0".into(),
                gw: wired.gateway.to_string(),
            })
            .chain(wired.ip6.map(|(_, gateway)| Route {
                dst: "::/0".into(),
                gw: gateway.to_string(),
            }))
            .collect(),
            dns: Dns::default(),
        }
    }
}

/// The VERSION command's answer.
pub fn version_info() -> serde_json::Value {
    serde_json::json!({
        "cniVersion": SPEC_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Environment, CniError> {
        Environment::parse(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn environment_requires_what_each_command_needs() {
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=web;K8S_POD_NAME=api-0",
            ),
        ];
        let parsed = env(&add).unwrap();
        assert_eq!(parsed.pod(), Some(("web", "api-0")));
        assert_eq!(env(&add[..3]).unwrap_err().code, code::INVALID_ENVIRONMENT);
        assert_eq!(
            env(&[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "abc"),
                ("CNI_IFNAME", "eth0")
            ])
            .unwrap()
            .netns,
            ""
        );
        assert!(env(&[("CNI_COMMAND", "VERSION")]).is_ok());
        assert!(env(&[("CNI_COMMAND", "GC")]).is_ok());
        for bad in [
            [("CNI_COMMAND", "FROB"), ("", "")],
            [("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "-x")],
        ] {
            assert_eq!(env(&bad).unwrap_err().code, code::INVALID_ENVIRONMENT);
        }
        // Container ids up to the cap; one longer is refused, named cut short.
        let mut long_id = add;
        let longest = "c".repeat(MAX_CONTAINER_ID);
        long_id[1] = ("CNI_CONTAINERID", &longest);
        assert!(env(&long_id).is_ok());
        let too_long = "c".repeat(100_000);
        long_id[1] = ("CNI_CONTAINERID", &too_long);
        let error = env(&long_id).unwrap_err();
        assert_eq!(error.code, code::INVALID_ENVIRONMENT);
        assert!(error.msg.len() < 400, "{}", error.msg);
        assert!(error.msg.contains("100000 bytes"), "{}", error.msg);
        let mut bad_ifname = add;
        bad_ifname[3] = ("CNI_IFNAME", "eth0/../x");
        assert_eq!(
            env(&bad_ifname).unwrap_err().code,
            code::INVALID_ENVIRONMENT
        );
        assert_eq!(env(&[]).unwrap_err().code, code::INVALID_ENVIRONMENT);
    }

    #[test]
    fn configuration_errors_have_the_spec_codes() {
        let ok = br#"{"cniVersion":"1.0.0","name":"ferrite","type":"ferrite-cni","node":"n1",
            "runtimeConfig":{"portMappings":[]},"prevResult":{"ips":[]}}"#;
        let conf = NetConf::parse(ok).unwrap();
        assert_eq!(conf.mtu, DEFAULT_MTU);
        assert_eq!(conf.ipam_dir(), PathBuf::from("/var/lib/cni/ferrite/n1"));
        let cases: [(&[u8], u32); 7] = [
            (b"{not json", code::DECODE_FAILURE),
            (b"", code::DECODE_FAILURE),
            (
                br#"{"cniVersion":"1.0.0","name":"f"}"#,
                code::INVALID_CONFIG,
            ),
            (
                br#"{"cniVersion":"9.9.9","name":"f","node":"n1"}"#,
                code::INCOMPATIBLE_VERSION,
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"f","node":"../etc"}"#,
                code::INVALID_CONFIG,
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"f","node":"n1","podCIDR":"nope"}"#,
                code::INVALID_CONFIG,
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"f","node":"n1","dataDir":"var/lib/cni"}"#,
                code::INVALID_CONFIG,
            ),
        ];
        for (input, expected) in cases {
            let error = NetConf::parse(input).unwrap_err();
            assert_eq!(error.code, expected, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn stdin_is_read_up_to_the_cap_and_no_further() {
        let config = br#"{"cniVersion":"1.0.0","name":"f","node":"n1"}"#;
        assert_eq!(read_input(&config[..]).unwrap(), config);
        let exactly = vec![b' '; MAX_INPUT as usize];
        assert_eq!(read_input(&exactly[..]).unwrap().len(), exactly.len());
        // An endless stream: refused after one byte more than the cap.
        let mut endless = std::io::repeat(0);
        let error = read_input(&mut endless).unwrap_err();
        assert_eq!(error.code, code::INVALID_CONFIG);
        assert!(
            error.msg.contains("larger than 1048576 bytes"),
            "{}",
            error.msg
        );
    }

    #[test]
    fn results_follow_the_requested_version() {
        let wired = Wired {
            host_interface: "fer0123456789ab".into(),
            host_mac: "ee:ee:ee:ee:ee:ee".into(),
            pod_interface: "eth0".into(),
            pod_mac: "0a:58:0a:f4:01:02".into(),
            sandbox: "/var/run/netns/p".into(),
            ip: Ipv4Addr::new(10, 244, 1, 2),
            gateway: Ipv4Addr::new(169, 254, 1, 1),
            ip6: None,
        };
        let conf = |version: &str| {
            NetConf::parse(
                format!(r#"{{"cniVersion":"{version}","name":"f","node":"n1"}}"#).as_bytes(),
            )
            .unwrap()
        };
        let old = serde_json::to_value(CniResult::new(&conf("0.3.1"), &wired)).unwrap();
        assert_eq!(old["ips"][0]["version"], "4");
        assert!(old["interfaces"][1].get("mtu").is_none());
        let new = serde_json::to_value(CniResult::new(&conf("1.1.0"), &wired)).unwrap();
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["ips"][0]["address"], "10.244.1.2/32");
        assert_eq!(new["ips"][0]["interface"], 1);
        assert_eq!(new["interfaces"][1]["sandbox"], "/var/run/netns/p");
        assert_eq!(new["interfaces"][1]["mtu"], 1450);
        assert_eq!(new["routes"][0]["gw"], "169.254.1.1");
        assert_eq!(new["ips"].as_array().unwrap().len(), 1);
        let dual = Wired {
            ip6: Some((
                "fd00:10:244::2".parse().unwrap(),
                "fe80::ecee:eeff:feee:eeee".parse().unwrap(),
            )),
            ..wired
        };
        let new = serde_json::to_value(CniResult::new(&conf("1.0.0"), &dual)).unwrap();
        assert_eq!(new["ips"][1]["address"], "fd00:10:244::2/128");
        assert_eq!(new["ips"][1]["gateway"], "fe80::ecee:eeff:feee:eeee");
        assert_eq!(new["routes"][1]["dst"], "::/0");
        let old = serde_json::to_value(CniResult::new(&conf("0.4.0"), &dual)).unwrap();
        assert_eq!(old["ips"][1]["version"], "6");
    }

    #[test]
    fn pod_cidrs_take_one_per_family_with_an_ipv4_one() {
        let conf = |cidrs: &str| {
            NetConf::parse(
                format!(r#"{{"cniVersion":"1.0.0","name":"f","node":"n1",{cidrs}}}"#).as_bytes(),
            )
        };
        let dual = conf(r#""podCIDRs":["10.244.0.0/24","fd00:10:244::/64"]"#).unwrap();
        assert_eq!(
            dual.configured_ranges().unwrap().to_string(),
            "10.244.0.0/24,fd00:10:244::/64"
        );
        for bad in [
            r#""podCIDRs":["fd00:10:244::/64"]"#,
            r#""podCIDRs":["10.244.0.0/24","10.244.1.0/24"]"#,
            r#""podCIDRs":["10.244.0.0/24","fd00::/64","fd01::/64"]"#,
            r#""podCIDRs":["10.244.0.0/24"],"podCIDR":"10.244.0.0/24""#,
            r#""podCIDRs":["nope"]"#,
        ] {
            assert_eq!(conf(bad).unwrap_err().code, code::INVALID_CONFIG, "{bad}");
        }
        assert_eq!(
            PodRanges::parse_lines("10.244.0.0/24\nfd00:10:244::/64\n").unwrap(),
            dual.configured_ranges().unwrap()
        );
        assert!(PodRanges::parse_lines("10.244.0.0/24\n10.244.1.0/24\n").is_err());
    }
}
