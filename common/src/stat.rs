/// Delivered to a pod on this node (by pod IP or after Service DNAT).
pub const DELIVERED_LOCAL: u32 = 0;
/// Passed to the host stack (non-local, non-Service destination).
pub const PASSED_TO_STACK: u32 = 1;
/// New Service flow: a backend was chosen and the packet DNATed.
pub const SERVICE_NEW_FLOW: u32 = 2;
/// Packet of an existing Service flow DNATed through conntrack.
pub const SERVICE_ESTABLISHED: u32 = 3;
/// Reply from a backend reverse-NATed to the Service address.
pub const REVERSE_NAT: u32 = 4;
/// A frame neither IPv4, IPv6 nor ARP; or IPv6 while no program handles it (the
/// agent fills `ferrite_progs` at load) and in explain runs.
pub const DROP_UNSUPPORTED_L3: u32 = 5;
/// Frame too short for its headers, IHL < 5, or total length beyond the frame; an
/// IPv6 payload length beyond the frame or an extension header cut short.
pub const DROP_MALFORMED: u32 = 6;
/// Source IP is not the IP of the pod behind this veth; or, from another node
/// (over the overlay, or natively on the uplink), not in that node's pod CIDR or, on
/// the uplink, not from that node's MAC.
pub const DROP_SPOOFED: u32 = 7;
/// Service exists but has no ready backend.
pub const DROP_NO_BACKEND: u32 = 8;
/// A map or packet-rewrite helper failed.
pub const DROP_INTERNAL: u32 = 9;
/// ARP from a pod: passed to the stack (pods use a static gateway neighbour).
pub const PASSED_ARP: u32 = 10;
/// IPv4 fragment whose first fragment was not seen (so no ports): routed by
/// destination IP only, never Service-translated.
pub const FRAGMENT_ROUTED: u32 = 11;
/// Sent towards the node owning the destination pod CIDR (encapsulated, or natively).
pub const SENT_TO_NODE: u32 = 12;
/// Arrived from another node (over the overlay, or natively) and delivered to a pod
/// on this node.
pub const RECEIVED_FROM_NODE: u32 = 13;
/// Arrived over the overlay with a VNI that is not the cluster's.
pub const DROP_WRONG_VNI: u32 = 14;
/// Addressed to this node's pod CIDR (or arrived over the overlay) but no such pod.
pub const DROP_UNKNOWN_POD: u32 = 15;
/// A remote route exists but the overlay is not configured yet.
pub const DROP_NO_OVERLAY: u32 = 16;
/// External traffic (NodePort/LoadBalancer/externalIP) balanced by the XDP program.
pub const EXTERNAL_NEW_FLOW: u32 = 17;
/// External flow forwarded to a backend on another node, SNATed to this node.
pub const EXTERNAL_SNAT: u32 = 18;
/// Reply of an external flow sent back out of the uplink.
pub const EXTERNAL_REPLY: u32 = 19;
/// `externalTrafficPolicy: Local` frontend on a node without a ready local backend.
pub const DROP_NO_LOCAL_BACKEND: u32 = 20;
/// Client outside a LoadBalancer's `loadBalancerSourceRanges`.
pub const DROP_SOURCE_RANGE: u32 = 21;
/// NodePort without backends: left to the stack, which refuses it (RST/ICMP).
pub const NODEPORT_REJECTED: u32 = 22;
/// No free port in the SNAT range for a forwarded external flow.
pub const DROP_NO_SNAT_PORT: u32 = 23;
/// External packet with DF set larger than `pod_mtu`: answered with ICMP
/// "fragmentation needed" (path MTU discovery) instead of being forwarded.
pub const ICMP_FRAG_NEEDED: u32 = 24;
/// A pod's direct connection whose reply tuple is a Service flow's (same client
/// port, that flow's backend): its source port was remapped, as Linux NAT does.
pub const PORT_REMAPPED: u32 = 25;
/// A later fragment given the ports of its datagram's first fragment (so it is
/// translated like the rest of its flow).
pub const FRAGMENT_TRACKED: u32 = 26;
/// A new flow to a Service without ready backends, refused with ICMP port
/// unreachable (TCP connect fails with ECONNREFUSED at once, as with kube-proxy's
/// REJECT) instead of a silent drop.
pub const SERVICE_REJECTED: u32 = 27;
/// A pod's flow balanced back to the pod itself: SNATed to `HAIRPIN_IP`.
pub const HAIRPIN: u32 = 28;
/// A connect or send translated to a backend at the socket (socket-level LB).
pub const SOCK_TRANSLATED: u32 = 29;
/// A connect or send to a Service without ready backends refused at the socket
/// (ECONNREFUSED).
pub const SOCK_REFUSED: u32 = 30;
/// A new TCP connection took over the reply tuple of a closing flow (the same
/// client port reaching the same backend again), as Linux conntrack reopens a
/// closed tuple, instead of remapping its port.
pub const CT_REOPENED: u32 = 31;
/// A Service flow of the node's own processes balanced per packet (no socket LB).
pub const HOST_SERVICE_FLOW: u32 = 32;
/// A monitor event that did not fit in `ferrite_events` (the agent reading behind):
/// lost, and counted here so a monitor's silence can be told from a quiet node.
pub const MONITOR_LOST: u32 = 33;
/// A new flow found every SNAT port it tried taken and took over the oldest of them
/// held by a TCP flow whose client never completed its handshake (a SYN flood's
/// claims cannot hold a backend's range).
pub const SNAT_PORT_RECLAIMED: u32 = 34;
/// A packet the datapath would forward itself (into a pod, or over the overlay) with
/// a TTL (IPv6: hop limit) of 0 or 1, which a router lets expire: dropped (the IPv4
/// path does not decrement TTL, the IPv6 path decrements the hop limit; packets for
/// the stack are left to it, which answers them).
pub const DROP_TTL_EXCEEDED: u32 = 35;
/// An ICMP error (destination unreachable, time exceeded, parameter problem) a
/// backend sent about a packet of a translated flow, translated back like the flow's
/// replies (its source and the packet it quotes), so the client's socket sees it.
pub const ICMP_ERROR_REVERSE_NAT: u32 = 36;
/// A packet to a pod of this node isolated for ingress that no policy of it allows.
pub const DROP_POLICY_INGRESS: u32 = 37;
/// A packet of a pod of this node isolated for egress that no policy of it allows.
pub const DROP_POLICY_EGRESS: u32 = 38;
/// An IPv6 packet with more than 8 extension headers before its upper-layer header.
pub const DROP_EXTENSION_HEADERS: u32 = 39;
/// IPv6 neighbour or router discovery (ICMPv6 133-137) or a multicast listener
/// message (130-132, 143) from a pod to a link-local or link-scoped multicast
/// destination, unfragmented: passed to the stack, before anti-spoofing (its source
/// may be link-local or unspecified).
pub const PASSED_ND: u32 = 40;
pub const COUNT: u32 = 41;

pub const NAMES: [&str; COUNT as usize] = [
    "delivered_local",
    "passed_to_stack",
    "service_new_flow",
    "service_established",
    "reverse_nat",
    "drop_unsupported_l3",
    "drop_malformed",
    "drop_spoofed",
    "drop_no_backend",
    "drop_internal",
    "passed_arp",
    "fragment_routed",
    "sent_to_node",
    "received_from_node",
    "drop_wrong_vni",
    "drop_unknown_pod",
    "drop_no_overlay",
    "external_new_flow",
    "external_snat",
    "external_reply",
    "drop_no_local_backend",
    "drop_source_range",
    "nodeport_rejected",
    "drop_no_snat_port",
    "icmp_frag_needed",
    "port_remapped",
    "fragment_tracked",
    "service_rejected",
    "hairpin",
    "sock_translated",
    "sock_refused",
    "ct_reopened",
    "host_service_flow",
    "monitor_lost",
    "snat_port_reclaimed",
    "drop_ttl_exceeded",
    "icmp_error_reverse_nat",
    "drop_policy_ingress",
    "drop_policy_egress",
    "drop_extension_headers",
    "passed_nd",
];
