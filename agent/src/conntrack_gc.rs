//! Conntrack garbage collection. `ferrite_ct` is an LRU map, so it never fills, but
//! without collection finished flows stay until evicted, and under connection churn
//! the LRU would evict idle long-lived flows first. Lifetimes (the one place they
//! are written down: [`Lifetimes::default`]) are Cilium's for Service flows: TCP 6 h
//! idle, 60 s while its client has not completed the handshake (Cilium's SYN
//! timeout: a SYN flood's flows, each holding a SNAT port, must not live 6 hours),
//! 10 s once both sides sent FIN/RST, everything else 60 s idle.
//!
//! A flow has two entries (forward, reply) touched by packets of one direction each,
//! so a one-way stream keeps only one of them fresh: entries are judged per flow, by
//! the latest packet either way, never one by one (and never by age: cilium#29667).
use std::{collections::HashMap, time::Duration};

use ferrite_common::{
    CtKey, CtValue, CT_FLAG_CLOSING, CT_FLAG_REPLY, CT_FLAG_SNAT, CT_FLAG_UNESTABLISHED,
    CT_FLAG_VIA_STACK, PROTO_TCP,
};

/// How long a flow may stay idle (no packet either way) before collection.
#[derive(Clone, Copy, Debug)]
pub struct Lifetimes {
    /// An established TCP flow.
    pub tcp: Duration,
    /// A TCP flow whose client never completed its handshake (`CT_FLAG_UNESTABLISHED`
    /// on every entry of the flow).
    pub tcp_unestablished: Duration,
    /// A TCP flow both of whose entries saw FIN or RST.
    pub tcp_closing: Duration,
    /// UDP and everything else.
    pub other: Duration,
}

impl Default for Lifetimes {
    /// Cilium's: `CT_CONNECTION_LIFETIME_TCP` 21600 s, `CT_SYN_TIMEOUT` 60 s,
    /// `CT_CLOSE_TIMEOUT` 10 s, `CT_CONNECTION_LIFETIME_NONTCP` 60 s.
    fn default() -> Self {
        Self {
            tcp: Duration::from_secs(6 * 3600),
            tcp_unestablished: Duration::from_secs(60),
            tcp_closing: Duration::from_secs(10),
            other: Duration::from_secs(60),
        }
    }
}

/// What both entries of a flow share: the backend's end and the peer's end as the
/// backend sees it (the client, or this node's SNAT address and port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FlowId {
    proto: u8,
    backend: ([u8; 4], u16),
    peer: ([u8; 4], u16),
}

fn flow_id(key: &CtKey, value: &CtValue) -> FlowId {
    // A flow the stack forwarded has one entry, under its reply tuple.
    if value.flags & (CT_FLAG_REPLY | CT_FLAG_VIA_STACK) != 0 {
        return FlowId {
            proto: key.proto,
            backend: (key.saddr, key.sport),
            peer: (key.daddr, key.dport),
        };
    }
    let peer = if value.flags & CT_FLAG_SNAT != 0 {
        (value.nat_address, value.nat_port)
    } else {
        (key.saddr, key.sport)
    };
    FlowId {
        proto: key.proto,
        backend: (value.backend_address, value.backend_port),
        peer,
    }
}

#[derive(Default)]
struct Flow {
    last_seen: u64,
    all_closing: bool,
    /// No entry says the handshake completed (an entry without the flag: completed,
    /// or recorded before the datapath tracked it).
    unestablished: bool,
    /// Each entry's key and its own last-seen time.
    entries: Vec<(CtKey, u64)>,
}

/// The entries whose flow has been idle longer than its lifetime at `now` (the
/// datapath's clock: jiffies, `hz` of them a second), each with the last-seen time it
/// was judged by.
pub fn expired(
    entries: &[(CtKey, CtValue)],
    now: u64,
    hz: u64,
    lifetimes: &Lifetimes,
) -> Vec<(CtKey, u64)> {
    let mut flows: HashMap<FlowId, Flow> = HashMap::new();
    for (key, value) in entries {
        let flow = flows.entry(flow_id(key, value)).or_insert(Flow {
            all_closing: true,
            unestablished: true,
            ..Flow::default()
        });
        flow.last_seen = flow.last_seen.max(value.last_seen_jiffies);
        flow.all_closing &= value.flags & CT_FLAG_CLOSING != 0;
        flow.unestablished &= value.flags & CT_FLAG_UNESTABLISHED != 0;
        flow.entries.push((*key, value.last_seen_jiffies));
    }
    let ticks = |lifetime: Duration| lifetime.as_millis() as u64 * hz / 1000;
    flows
        .into_iter()
        .filter(|(id, flow)| {
            let lifetime = match (id.proto, flow.all_closing, flow.unestablished) {
                (PROTO_TCP, true, _) => lifetimes.tcp_closing,
                (PROTO_TCP, false, true) => lifetimes.tcp_unestablished,
                (PROTO_TCP, false, false) => lifetimes.tcp,
                _ => lifetimes.other,
            };
            now.saturating_sub(flow.last_seen) > ticks(lifetime)
        })
        .flat_map(|(_, flow)| flow.entries)
        .collect()
}

/// Values of `CONFIG_HZ` Linux is built with.
const HZ_VALUES: [u64; 4] = [100, 250, 300, 1000];

/// The kernel's HZ from `ticks` jiffies counted over `elapsed`: the nearest value
/// Linux is built with.
pub fn hz_from(ticks: u64, elapsed: Duration) -> u64 {
    let measured = ticks as f64 / elapsed.as_secs_f64();
    HZ_VALUES
        .into_iter()
        .min_by(|a, b| {
            (*a as f64 - measured)
                .abs()
                .total_cmp(&(*b as f64 - measured).abs())
        })
        .expect("not empty")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrite_common::{CT_FLAG_EXTERNAL, PROTO_UDP};

    /// Ticks of a second in these tests (a kernel built with HZ=250).
    const SECOND: u64 = 250;
    const CLIENT: [u8; 4] = [10, 244, 0, 2];
    const VIP: [u8; 4] = [10, 96, 0, 10];
    const BACKEND: [u8; 4] = [10, 244, 1, 11];
    const NODE: [u8; 4] = [198, 51, 100, 1];

    fn key(saddr: [u8; 4], sport: u16, daddr: [u8; 4], dport: u16, proto: u8) -> CtKey {
        CtKey {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            _pad: 0,
            _pad2: 0,
        }
    }

    /// The two entries of a client's flow to the VIP, each last touched at the given
    /// second, with extra `flags` on both.
    fn flow(
        client_port: u16,
        proto: u8,
        forward_s: u64,
        reply_s: u64,
        flags: u16,
    ) -> Vec<(CtKey, CtValue)> {
        let value = |flags, seen_s: u64| CtValue {
            flags,
            backend_address: BACKEND,
            backend_port: 8080,
            last_seen_jiffies: seen_s * SECOND,
            ..CtValue::default()
        };
        vec![
            (
                key(CLIENT, client_port, VIP, 80, proto),
                value(flags, forward_s),
            ),
            (
                key(BACKEND, 8080, CLIENT, client_port, proto),
                value(flags | CT_FLAG_REPLY, reply_s),
            ),
        ]
    }

    #[test]
    fn a_flow_lives_as_long_as_either_direction_is_fresh() {
        let lifetimes = Lifetimes::default();
        let now = 100_000 * SECOND;
        // A one-way UDP stream: only the forward entry is touched; its reply entry
        // (ready for the answer that may come) must stay too.
        let streaming = flow(1000, PROTO_UDP, 99_999, 10, 0);
        // Idle UDP for 61 s: both go.
        let idle_udp = flow(1001, PROTO_UDP, now / SECOND - 61, now / SECOND - 70, 0);
        // TCP idle an hour: kept (6 h); closed both ways 11 s ago: gone.
        let quiet_tcp = flow(1002, PROTO_TCP, now / SECOND - 3600, now / SECOND - 3600, 0);
        let closed_tcp = flow(
            1003,
            PROTO_TCP,
            now / SECOND - 11,
            now / SECOND - 12,
            CT_FLAG_CLOSING,
        );
        // FIN from the client only (half-closed): still a TCP flow, 6 h.
        let mut half_closed = flow(1004, PROTO_TCP, now / SECOND - 60, now / SECOND - 60, 0);
        half_closed[0].1.flags |= CT_FLAG_CLOSING;
        let entries: Vec<_> = [
            streaming,
            idle_udp.clone(),
            quiet_tcp,
            closed_tcp.clone(),
            half_closed,
        ]
        .concat();

        let mut got: Vec<CtKey> = expired(&entries, now, SECOND, &lifetimes)
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        got.sort();
        let mut want: Vec<CtKey> = idle_udp
            .iter()
            .chain(&closed_tcp)
            .map(|(k, _)| *k)
            .collect();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn an_snated_external_flow_is_one_flow_with_its_reply_entry() {
        let now = 1_000 * SECOND;
        let forward = (
            key([203, 0, 113, 10], 40000, NODE, 30080, PROTO_UDP),
            CtValue {
                flags: CT_FLAG_EXTERNAL | CT_FLAG_SNAT,
                backend_address: BACKEND,
                backend_port: 8080,
                nat_address: NODE,
                nat_port: 61000,
                last_seen_jiffies: now - 5 * SECOND,
                ..CtValue::default()
            },
        );
        let reply = (
            key(BACKEND, 8080, NODE, 61000, PROTO_UDP),
            CtValue {
                flags: CT_FLAG_EXTERNAL | CT_FLAG_SNAT | CT_FLAG_REPLY,
                last_seen_jiffies: now - 500 * SECOND,
                ..CtValue::default()
            },
        );
        let entries = [forward, reply];
        assert!(expired(&entries, now, SECOND, &Lifetimes::default()).is_empty());
        assert_eq!(
            expired(&entries, now + 60 * SECOND, SECOND, &Lifetimes::default()).len(),
            2
        );
    }

    #[test]
    fn flows_the_stack_forwarded_to_one_pod_are_judged_each_by_its_own_client() {
        let now = 1_000 * SECOND;
        // Two clients' connections to one pod's hostPort: one entry each, under the
        // reply tuple, naming the pod they reached.
        let via_stack = |client_port: u16, flags: u16, seen_s: u64| {
            (
                key(BACKEND, 8080, CLIENT, client_port, PROTO_TCP),
                CtValue {
                    flags: CT_FLAG_VIA_STACK | flags,
                    backend_address: BACKEND,
                    backend_port: 8080,
                    last_seen_jiffies: now - seen_s * SECOND,
                    ..CtValue::default()
                },
            )
        };
        let closed = via_stack(40000, CT_FLAG_CLOSING, 11);
        let live = via_stack(40001, 0, 1);
        let got = expired(&[closed, live], now, SECOND, &Lifetimes::default());
        assert_eq!(got, vec![(closed.0, now - 11 * SECOND)]);
    }

    /// A SYN flood's flows (the backend answered, the client never did) go after
    /// Cilium's SYN timeout, 60 s idle, not the 6 h of established flows, so their
    /// SNAT ports come back; a flow whose client completed the handshake, one
    /// recorded before the datapath tracked handshakes, and one with either entry
    /// established keep the TCP lifetime.
    #[test]
    fn flows_that_never_completed_their_handshake_go_after_the_syn_lifetime() {
        let lifetimes = Lifetimes::default();
        let now = 100_000 * SECOND;
        let idle = |seconds: u64| now / SECOND - seconds;
        let half_open = flow(2000, PROTO_TCP, idle(61), idle(61), CT_FLAG_UNESTABLISHED);
        let young_half_open = flow(2001, PROTO_TCP, idle(59), idle(59), CT_FLAG_UNESTABLISHED);
        let established = flow(2002, PROTO_TCP, idle(3600), idle(3600), 0);
        // The reply entry is cleared first: a race can leave the forward one behind.
        let mut half_cleared = flow(2003, PROTO_TCP, idle(61), idle(61), 0);
        half_cleared[0].1.flags |= CT_FLAG_UNESTABLISHED;
        // Closed before the handshake completed (a refused SYN, RST both ways): 10 s.
        let refused = flow(
            2004,
            PROTO_TCP,
            idle(11),
            idle(11),
            CT_FLAG_UNESTABLISHED | CT_FLAG_CLOSING,
        );
        // A one-way UDP stream is no half-open TCP flow.
        let udp = flow(2005, PROTO_UDP, idle(30), idle(30), 0);
        let entries: Vec<_> = [
            half_open.clone(),
            young_half_open,
            established,
            half_cleared,
            refused.clone(),
            udp,
        ]
        .concat();
        let mut got: Vec<CtKey> = expired(&entries, now, SECOND, &lifetimes)
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        got.sort();
        let mut want: Vec<CtKey> = half_open.iter().chain(&refused).map(|(k, _)| *k).collect();
        want.sort();
        assert_eq!(got, want);
    }

    /// A half-open SNATed NodePort flow (the state a spoofed SYN leaves) is judged as
    /// one flow with its reply entry, which holds its SNAT port: both go at 60 s idle.
    #[test]
    fn a_half_open_snated_external_flow_gives_its_port_back_after_the_syn_lifetime() {
        let now = 1_000 * SECOND;
        let flags = CT_FLAG_EXTERNAL | CT_FLAG_SNAT | CT_FLAG_UNESTABLISHED;
        let forward = (
            key([198, 18, 0, 7], 40000, NODE, 30080, PROTO_TCP),
            CtValue {
                flags,
                backend_address: BACKEND,
                backend_port: 8080,
                nat_address: NODE,
                nat_port: 61000,
                last_seen_jiffies: now - 61 * SECOND,
                ..CtValue::default()
            },
        );
        // The backend's SYN-ACKs (retransmitted) kept the reply entry fresher.
        let reply = (
            key(BACKEND, 8080, NODE, 61000, PROTO_TCP),
            CtValue {
                flags: flags | CT_FLAG_REPLY,
                packets: 3,
                last_seen_jiffies: now - 61 * SECOND,
                ..CtValue::default()
            },
        );
        let entries = [forward, reply];
        let lifetimes = Lifetimes::default();
        assert!(expired(&entries, now - 2 * SECOND, SECOND, &lifetimes).is_empty());
        assert_eq!(expired(&entries, now, SECOND, &lifetimes).len(), 2);
    }

    #[test]
    fn entries_seen_after_now_are_never_expired() {
        let entries = flow(1, PROTO_UDP, 500, 500, 0);
        assert!(expired(&entries, 10 * SECOND, SECOND, &Lifetimes::default()).is_empty());
    }

    #[test]
    fn hz_is_the_nearest_value_linux_is_built_with() {
        let tenth = Duration::from_millis(100);
        for (ticks, hz) in [
            (10, 100),
            (11, 100),
            (24, 250),
            (26, 250),
            (29, 300),
            (31, 300),
            (99, 1000),
        ] {
            assert_eq!(hz_from(ticks, tenth), hz, "{ticks} ticks in 100 ms");
        }
    }
}
