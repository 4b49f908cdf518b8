//! Every path `cargo xtask bench datapath` measures, on the same bench node and with
//! the same frames (tests/src/bench_node.rs): the exact frame and verdict of one
//! pass and of two (the bench runs a million passes over one packet: each must be a
//! full pass of the named path, every counter of the path bumped once per pass), and
//! for new flows the translation, both conntrack entries, and that the bench's
//! clearing makes every frame a new flow again. Expected frames are built
//! independently; every checksum is recomputed. A test run cannot show the tunnel
//! key (the kernel keeps it in the skb's metadata): the overlay tests check the
//! outer headers on the wire. Needs root.
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{ensure, Context, Result};
use ferrite_common::{
    pod_mac_for, stat, vtep_mac_for, CT_FLAG_EXTERNAL, CT_FLAG_REPLY, CT_FLAG_SNAT,
    CT_FLAG_UNESTABLISHED, SNAT_PORT_MAX, SNAT_PORT_MIN,
};
use ferrite_tests::{
    bench_families::{Family, FamilyPath, FAMILY_REPEAT, HOP_LIMIT},
    bench_node::{
        ct_key, local_node_port_backend, remote_node_port_backend, service_backends, service_ip,
        BenchNode, Established, Hook, NewFlow, CLIENT, LOCAL_PAIR, LOCAL_POD, NODE_IP,
        NODE_PORT_LOCAL, NODE_PORT_LOCAL_BACKENDS, NODE_PORT_REMOTE, NODE_PORT_REMOTE_BACKENDS,
        POLICED_CLIENT, POLICED_SERVER, REMOTE_NODE_IP, REMOTE_PAIR, WORLD_CLIENT,
    },
    frames::{self, decode_checked, GATEWAY_MAC},
    testbed::TC_ACT_OK,
};

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// `frame` as delivered into the pod `ip`: dst MAC = its eth0, src = its gateway.
fn delivered_to(ip: Ipv4Addr, mut frame: Vec<u8>) -> Vec<u8> {
    frame[..6].copy_from_slice(&pod_mac_for(ip));
    frame[6..12].copy_from_slice(&GATEWAY_MAC);
    frame
}

/// `frame` as handed to the VXLAN device for the other node: inner dst MAC = its
/// VTEP, src = this node's VTEP.
fn to_remote_vtep(mut frame: Vec<u8>) -> Vec<u8> {
    frame[..6].copy_from_slice(&vtep_mac_for(REMOTE_NODE_IP));
    frame[6..12].copy_from_slice(&vtep_mac_for(NODE_IP));
    frame
}

fn client(path: Established) -> SocketAddrV4 {
    sock(CLIENT, path.client_port())
}

/// `path`'s frame run `repeat` times: the frame it left (checksums checked), after
/// checking the verdict and that each of the path's counters moved by `repeat`.
fn passes(node: &BenchNode, path: Established, repeat: u32) -> Result<Vec<u8>> {
    let counters = path.counters();
    let before: Vec<u64> = counters
        .iter()
        .map(|c| node.bed.counter(*c))
        .collect::<Result<_>>()?;
    let (out, _) = node.run(path.hook(), &path.frame(), repeat)?;
    ensure!(
        out.verdict == path.hook().forwarded(),
        "{}: verdict {}",
        path.label(),
        out.verdict
    );
    for (counter, before) in counters.iter().zip(before) {
        ensure!(
            node.bed.counter(*counter)? - before == repeat as u64,
            "{}: {} per pass",
            path.label(),
            stat::NAMES[*counter as usize]
        );
    }
    decode_checked(&out.frame)?;
    ensure!(node.bed.drops()?.is_empty(), "{:?}", node.bed.drops()?);
    Ok(out.frame)
}

#[test]
fn bench_pod_to_pod_on_the_same_node_is_delivered_into_the_pod() -> Result<()> {
    let node = BenchNode::new()?;
    let path = Established::PodToPodLocal;
    for repeat in [1, 2] {
        assert_eq!(
            passes(&node, path, repeat)?,
            delivered_to(LOCAL_POD, path.frame())
        );
    }
    Ok(())
}

#[test]
fn bench_pod_to_pod_between_policed_pods_is_delivered_as_their_policies_allow() -> Result<()> {
    let node = BenchNode::new()?;
    let path = Established::PodToPodPoliced;
    for repeat in [1, 2] {
        assert_eq!(
            passes(&node, path, repeat)?,
            delivered_to(POLICED_SERVER, path.frame())
        );
    }
    // A flow the policies do not allow, between the same pods: dropped.
    let other_port = frames::tcp_syn(
        SocketAddrV4::new(POLICED_CLIENT, 41005),
        SocketAddrV4::new(POLICED_SERVER, 9090),
        b"",
    );
    let (out, _) = node.run(Hook::FromPod, &other_port, 1)?;
    assert_eq!(out.verdict, ferrite_tests::testbed::TC_ACT_SHOT);
    assert_eq!(node.bed.counter(stat::DROP_POLICY_EGRESS)?, 1);
    Ok(())
}

#[test]
fn bench_pod_to_pod_on_another_node_goes_to_the_vxlan_device_for_its_vtep() -> Result<()> {
    let node = BenchNode::new()?;
    let path = Established::PodToPodRemote;
    for repeat in [1, 2] {
        assert_eq!(passes(&node, path, repeat)?, to_remote_vtep(path.frame()));
    }
    Ok(())
}

#[test]
fn bench_cluster_ip_established_to_a_local_backend_is_dnated_with_its_port_and_delivered(
) -> Result<()> {
    let node = BenchNode::new()?;
    let path = Established::ClusterIpLocal;
    let [a, b] = LOCAL_PAIR;
    assert_eq!(
        passes(&node, path, 1)?,
        delivered_to(*b.ip(), frames::tcp_ack(client(path), b, b""))
    );
    // The second pass is the flow to B, DNATed back to A: the pair's other half.
    assert_eq!(
        passes(&node, path, 2)?,
        delivered_to(*a.ip(), frames::tcp_ack(client(path), a, b""))
    );
    Ok(())
}

#[test]
fn bench_cluster_ip_established_to_a_remote_backend_is_dnated_and_sent_over_the_overlay(
) -> Result<()> {
    let node = BenchNode::new()?;
    let path = Established::ClusterIpRemote;
    let [a, b] = REMOTE_PAIR;
    assert_eq!(
        passes(&node, path, 1)?,
        to_remote_vtep(frames::tcp_ack(client(path), b, b""))
    );
    assert_eq!(
        passes(&node, path, 2)?,
        to_remote_vtep(frames::tcp_ack(client(path), a, b""))
    );
    Ok(())
}

#[test]
fn bench_a_reply_on_the_backends_veth_is_reverse_nated_and_delivered_to_the_client() -> Result<()> {
    let node = BenchNode::new()?;
    let path = Established::ReplyLocal;
    let [a, b] = LOCAL_PAIR;
    assert_eq!(
        passes(&node, path, 1)?,
        delivered_to(CLIENT, frames::tcp_ack(a, client(path), b""))
    );
    assert_eq!(
        passes(&node, path, 2)?,
        delivered_to(CLIENT, frames::tcp_ack(b, client(path), b""))
    );
    Ok(())
}

#[test]
fn bench_a_reply_from_the_overlay_is_reverse_nated_and_delivered_to_the_client() -> Result<()> {
    let node = BenchNode::new()?;
    let path = Established::ReplyOverlay;
    let [a, b] = REMOTE_PAIR;
    assert_eq!(
        passes(&node, path, 1)?,
        delivered_to(CLIENT, frames::tcp_ack(a, client(path), b""))
    );
    assert_eq!(
        passes(&node, path, 2)?,
        delivered_to(CLIENT, frames::tcp_ack(b, client(path), b""))
    );
    // The baseline: the same shim in front of the no-op leaves the frame alone.
    let (out, _) = node.run_noop(Hook::FromOverlay, &path.frame(), 1)?;
    assert_eq!((out.verdict, out.frame), (TC_ACT_OK, path.frame()));
    Ok(())
}

#[test]
fn bench_node_port_established_to_a_local_backend_is_dnated_in_xdp() -> Result<()> {
    let node = BenchNode::new()?;
    let path = Established::NodePortLocal;
    let world = sock(WORLD_CLIENT, path.client_port());
    let flow = node
        .bed
        .conntrack(&ct_key(world, NODE_PORT_LOCAL))?
        .context("the flow")?;
    assert_eq!(flow.flags, CT_FLAG_EXTERNAL);
    let backend = sock(flow.backend_address.into(), flow.backend_port);
    assert!((0..NODE_PORT_LOCAL_BACKENDS).any(|i| local_node_port_backend(i) == backend));
    assert_eq!(
        passes(&node, path, 1)?,
        frames::tcp_ack(world, backend, b"")
    );
    assert_eq!(passes(&node, path, 2)?, path.frame());
    Ok(())
}

#[test]
fn bench_node_port_established_to_a_remote_backend_is_dnated_and_snated_in_xdp() -> Result<()> {
    let node = BenchNode::new()?;
    let path = Established::NodePortSnat;
    let world = sock(WORLD_CLIENT, path.client_port());
    let flow = node
        .bed
        .conntrack(&ct_key(world, NODE_PORT_REMOTE))?
        .context("the flow")?;
    assert_eq!(flow.flags, CT_FLAG_EXTERNAL | CT_FLAG_SNAT);
    let backend = sock(flow.backend_address.into(), flow.backend_port);
    assert!((0..NODE_PORT_REMOTE_BACKENDS).any(|i| remote_node_port_backend(i) == backend));
    assert_eq!(Ipv4Addr::from(flow.nat_address), NODE_IP);
    assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&flow.nat_port));
    assert_eq!(
        passes(&node, path, 1)?,
        frames::tcp_ack(sock(NODE_IP, flow.nat_port), backend, b"")
    );
    assert_eq!(passes(&node, path, 2)?, path.frame());
    Ok(())
}

/// Runs every frame of `path`'s new-flow set once, checks each output with
/// `expect(index, frame, output)`, and that the path's counters moved by one per
/// frame; then clears them as the bench does and checks they are new again.
fn new_flows(
    node: &mut BenchNode,
    path: NewFlow,
    count: u32,
    mut expect: impl FnMut(&BenchNode, &[u8], &[u8]) -> Result<()>,
) -> Result<()> {
    let frames = node.new_flow_frames(path, count);
    for round in 0..2 {
        let before: Vec<u64> = path
            .counters()
            .iter()
            .map(|c| node.bed.counter(*c))
            .collect::<Result<_>>()?;
        let established = node.bed.counter(stat::SERVICE_ESTABLISHED)?;
        for frame in &frames {
            let (out, _) = node.run(path.hook(), frame, 1)?;
            ensure!(
                out.verdict == path.hook().forwarded(),
                "verdict {}",
                out.verdict
            );
            expect(node, frame, &out.frame)
                .with_context(|| format!("round {round}, {frame:02x?}"))?;
        }
        for (counter, before) in path.counters().iter().zip(before) {
            ensure!(
                node.bed.counter(*counter)? - before == count as u64,
                "round {round}: {} per frame",
                stat::NAMES[*counter as usize]
            );
        }
        ensure!(node.bed.counter(stat::SERVICE_ESTABLISHED)? == established);
        ensure!(node.clear_new_flows()? == 2 * count as usize);
    }
    ensure!(node.bed.drops()?.is_empty(), "{:?}", node.bed.drops()?);
    Ok(())
}

/// The source and destination of `frame` (checksums checked).
fn addresses(frame: &[u8]) -> Result<(SocketAddrV4, SocketAddrV4)> {
    let decoded = decode_checked(frame)?;
    Ok((decoded.source, decoded.destination))
}

#[test]
fn bench_new_cluster_ip_flows_get_a_backend_of_their_service_and_both_conntrack_entries(
) -> Result<()> {
    let mut node = BenchNode::new()?;
    node.load_services(1_000)?;
    new_flows(&mut node, NewFlow::ClusterIp, 512, |node, frame, out| {
        let (client, frontend) = addresses(frame)?;
        let service = u32::from(*frontend.ip()) - u32::from(service_ip(0));
        let (_, backend) = addresses(out)?;
        ensure!(
            service_backends(service).contains(&backend),
            "{backend} is no backend of {frontend}"
        );
        ensure!(out == delivered_to(*backend.ip(), frames::tcp_syn(client, backend, b"")));
        let forward = node
            .bed
            .conntrack(&ct_key(client, frontend))?
            .context("forward")?;
        ensure!((forward.backend_address, forward.backend_port) == (backend.ip().octets(), 8080));
        let reply = node
            .bed
            .conntrack(&ct_key(backend, client))?
            .context("reply")?;
        ensure!(reply.flags & CT_FLAG_REPLY != 0);
        Ok(())
    })
}

#[test]
fn bench_new_node_port_flows_to_local_backends_are_dnated_keeping_the_client() -> Result<()> {
    let mut node = BenchNode::new()?;
    new_flows(&mut node, NewFlow::NodePortLocal, 512, |_, frame, out| {
        let (client, _) = addresses(frame)?;
        let (_, backend) = addresses(out)?;
        ensure!((0..NODE_PORT_LOCAL_BACKENDS).any(|i| local_node_port_backend(i) == backend));
        ensure!(out == frames::tcp_syn(client, backend, b""));
        Ok(())
    })
}

#[test]
fn bench_new_node_port_flows_to_remote_backends_are_snated_from_the_port_range() -> Result<()> {
    let mut node = BenchNode::new()?;
    new_flows(&mut node, NewFlow::NodePortSnat, 512, |node, frame, out| {
        let (client, _) = addresses(frame)?;
        let (source, backend) = addresses(out)?;
        ensure!((0..NODE_PORT_REMOTE_BACKENDS).any(|i| remote_node_port_backend(i) == backend));
        ensure!(*source.ip() == NODE_IP);
        ensure!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&source.port()));
        ensure!(out == frames::tcp_syn(source, backend, b""));
        let reply = node
            .bed
            .conntrack(&ct_key(backend, source))?
            .context("reply")?;
        // A SYN: the flow's handshake is not completed yet.
        ensure!(
            reply.flags == CT_FLAG_EXTERNAL | CT_FLAG_SNAT | CT_FLAG_REPLY | CT_FLAG_UNESTABLISHED
        );
        ensure!((reply.nat_address, reply.nat_port) == (client.ip().octets(), client.port()));
        Ok(())
    })
}

/// Each established path's floor (the bench's "over floor" column) does the path's
/// whole rewrite and delivery: one pass and two leave the frame and verdict the path
/// leaves, so a floor cannot be cheaper by doing less than the path must.
#[test]
fn bench_floors_leave_the_frames_of_their_paths() -> Result<()> {
    let node = BenchNode::new()?;
    for path in Established::ALL {
        for repeat in [1, 2] {
            // The path first: the floors use the route its conntrack entry caches.
            let frame = passes(&node, path, repeat)?;
            let (floor, _) = node.run_floor(path, &path.frame(), repeat)?;
            assert_eq!(
                (floor.verdict, floor.frame),
                (path.hook().forwarded(), frame),
                "{}: {}, {repeat} passes",
                path.label(),
                path.floor()
            );
        }
    }
    Ok(())
}

/// The bench measures established paths once: they never look up a Service.
#[test]
fn bench_established_paths_give_the_same_frames_with_twenty_thousand_services() -> Result<()> {
    let small = BenchNode::new()?;
    let mut large = BenchNode::new()?;
    large.load_services(20_000)?;
    for path in Established::ALL {
        for repeat in [1, 2] {
            assert_eq!(
                passes(&large, path, repeat)?,
                passes(&small, path, repeat)?,
                "{}",
                path.label()
            );
        }
    }
    Ok(())
}

/// What `path` leaves of its frame in `family` after `passes` passes, built
/// independently of the datapath: delivered into the pod (IPv6 one hop less per
/// pass), to the other node's VTEP, or (IPv6 to the other node) left for the stack.
fn family_expected(path: FamilyPath, family: Family, passes: u32) -> Vec<u8> {
    let (_, to) = path.ends();
    match (path, family) {
        (FamilyPath::PodToPodRemote, Family::Ipv4) => to_remote_vtep(path.frame(family)),
        (FamilyPath::PodToPodRemote, Family::Ipv6) => path.frame(family),
        (_, Family::Ipv4) => delivered_to(*to.ip(), path.frame(family)),
        (_, Family::Ipv6) => ferrite_tests::frames6::Ipv6Frame {
            eth_dst: pod_mac_for(*to.ip()),
            eth_src: GATEWAY_MAC,
            hop_limit: HOP_LIMIT - passes as u8,
            ..path.frame6()
        }
        .build(),
    }
}

/// The paths the bench measures in both families: one pass, two, and a whole run of
/// the bench's repeat (IPv6's hop limit lasts it) each leave the expected frame and
/// verdict, every pass counted once; the IPv6 frames reach the IPv6 programs.
#[test]
fn bench_paths_of_both_families_each_pass_whole() -> Result<()> {
    let node = BenchNode::new()?;
    for path in FamilyPath::ALL {
        for family in Family::ALL {
            let what = format!("{}, {}", path.label(), family.name());
            for repeat in [1, 2, FAMILY_REPEAT] {
                let counters = path.counters(family);
                let before: Vec<u64> = counters
                    .iter()
                    .map(|c| node.bed.counter(*c))
                    .collect::<Result<_>>()?;
                let (out, _) = node.run(path.hook(), &path.frame(family), repeat)?;
                assert_eq!(out.verdict, path.verdict(family), "{what}: verdict");
                for (counter, before) in counters.iter().zip(before) {
                    assert_eq!(
                        node.bed.counter(*counter)? - before,
                        repeat as u64,
                        "{what}: {} per pass",
                        stat::NAMES[*counter as usize]
                    );
                }
                if family == Family::Ipv4 {
                    decode_checked(&out.frame)?;
                }
                assert_eq!(
                    out.frame,
                    family_expected(path, family, repeat),
                    "{what}: {repeat} passes"
                );
            }
        }
    }
    assert_eq!(node.bed.drops()?, vec![]);
    Ok(())
}
