use crate::program_names;

/// Bits of the `ferrite_monitor` entry: which events listeners want.
pub const WANT_DROPS: u32 = 1;
pub const WANT_FLOWS: u32 = 2;

/// `MonitorEvent::kind`: a packet dropped, or a socket call refused.
pub const KIND_DROP: u8 = 1;
/// `MonitorEvent::kind`: a new Service flow, its backend chosen.
pub const KIND_FLOW: u8 = 2;

/// `MonitorEvent::family`: its addresses are IPv4 (the first 4 bytes of each) or IPv6.
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// Size of the ring buffer in bytes (a power of two, whole pages): 2730 events
/// of 88 bytes (with the kernel's 8-byte header) while the agent catches up.
pub const RING_BYTES: u32 = 256 * 1024;

/// The programs that report events, by `MonitorEvent::program`.
pub const PROGRAMS: [&str; 10] = [
    program_names::FROM_POD,
    program_names::FROM_OVERLAY,
    program_names::FROM_WORLD,
    program_names::FROM_UPLINK,
    program_names::TO_POD,
    program_names::FROM_HOST,
    program_names::SOCK_CONNECT4,
    program_names::SOCK_SENDMSG4,
    program_names::SOCK_CONNECT6,
    program_names::SOCK_SENDMSG6,
];

/// The index of `name` in [`PROGRAMS`] (a build error for any other name).
pub const fn program_index(name: &str) -> u8 {
    let mut i = 0;
    while i < PROGRAMS.len() {
        if str_eq(PROGRAMS[i], name) {
            return i as u8;
        }
        i += 1;
    }
    panic!("not a program that reports events")
}

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}
