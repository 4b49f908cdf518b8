//! NetworkPolicy in the datapath: every address has an identity (`ferrite_ipcache`,
//! longest prefix; key data: the IPv4 address in network order), every policed pod of the node its allowed (direction, peer
//! identity, protocol, port range) tuples (`ferrite_policy`, longest prefix over the
//! protocol and port bits, so ranges and "any" cost one lookup each). A pod's
//! isolation per direction is in its endpoint entry's flags.

/// Addresses no policy peer selects.
pub const IDENTITY_WORLD: u32 = 0;
/// In `ferrite_policy` only: every peer (a rule without `from`/`to`).
pub const IDENTITY_ANY: u32 = 1;
/// The first identity of an address class (below: reserved).
pub const IDENTITY_FIRST: u32 = 16;

/// `EndpointInfo::flags`: the pod is isolated for ingress / egress (a policy selects
/// it for that direction): what `ferrite_policy` does not allow is dropped.
pub const ENDPOINT_INGRESS_ISOLATED: u32 = 1 << 8;
pub const ENDPOINT_EGRESS_ISOLATED: u32 = 1 << 9;

/// `CtValue::policy_verdict`: nothing decided at the entry's epoch.
pub const CT_POLICY_UNKNOWN: u8 = 0;
/// No pod of this node at either end is isolated in the flow's direction.
pub const CT_POLICY_OPEN: u8 = 1;
/// A policy allows it.
pub const CT_POLICY_ALLOWED: u8 = 2;
/// The receiving pod's policies allow it not.
pub const CT_POLICY_DENIED_INGRESS: u8 = 3;
/// The sending pod's policies allow it not.
pub const CT_POLICY_DENIED_EGRESS: u8 = 4;

/// `PolicyKey::direction`.
pub const DIRECTION_INGRESS: u8 = 1;
pub const DIRECTION_EGRESS: u8 = 2;

/// Value of `ferrite_ipcache`: the identity of the prefix's addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    pub flags: u32,
}

/// Bits of a `PolicyKey` up to and including its identity: a rule for every
/// protocol and port has this prefix length.
pub const POLICY_PREFIX_ANY_PROTOCOL: u32 = 72;
/// ... up to and including its protocol: every port of one protocol.
pub const POLICY_PREFIX_ANY_PORT: u32 = 80;
/// Every bit: one port.
pub const POLICY_PREFIX_FULL: u32 = 96;

/// Key data of `ferrite_policy` (LPM trie; the key's prefix length counts its bits,
/// see `POLICY_PREFIX_*`): compared bit by bit in field order, so the prefix length
/// says how much of (protocol, port) a rule fixes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// The policed pod's address (network order).
    pub endpoint: [u8; 4],
    /// `DIRECTION_*` (of the pod: ingress is traffic to it).
    pub direction: u8,
    /// The peer's identity, big-endian (`IDENTITY_ANY`: every peer).
    pub identity: [u8; 4],
    pub protocol: u8,
    /// The pod's port (ingress) or the peer's (egress), big-endian.
    pub port: [u8; 2],
}

impl PolicyKey {
    /// The key data of one packet's lookup (with `POLICY_PREFIX_FULL`).
    pub const fn lookup(
        endpoint: [u8; 4],
        direction: u8,
        identity: u32,
        protocol: u8,
        port: u16,
    ) -> Self {
        Self {
            endpoint,
            direction,
            identity: identity.to_be_bytes(),
            protocol,
            port: port.to_be_bytes(),
        }
    }
}

/// Value of `ferrite_policy`: an allowed tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    /// Which policy allowed it (an index the agent keeps, for explain; 0: unknown).
    pub policy: u32,
}
