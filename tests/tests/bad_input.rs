//! User stories for broken and hostile input: what an operator's mistake or an
//! attacker's file can and cannot do to a node. Needs root.
use anyhow::Result;
use ferrite_tests::{
    cluster::{self, CLIENTS, TCP_FRONTEND},
    lab::{answered_by, exchange, wait_until, SETTLE},
};

/// A config file that does not parse - a syntax error in the first or a later
/// document, an empty file caught mid-write - is refused whole: the node keeps
/// serving what was applied last (full resyncs go on with it), `/readyz` says why
/// (with the line), `ferrite_config_rejections` counts it; the fixed file applies.
/// The file is watched: while it does not change it is not read again.
#[test]
fn a_config_that_does_not_parse_changes_nothing_and_readyz_says_why() -> Result<()> {
    let (mut node, _servers) = cluster::example_node("badcfg")?;
    let good = cluster::example_for(&node.name);
    node.write_config(&good)?;
    node.start_agent()?;
    node.wait_for_sync(2, 5)?;
    wait_until("/readyz 200", SETTLE, || {
        node.agent_http("/readyz")
            .is_ok_and(|(status, _)| status == 200)
    })?;
    let synced = node.maps()?.contents()?;
    let client = node.pod(CLIENTS[0].0);
    let mut live = client.tcp_connect(TCP_FRONTEND)?;
    let backend = answered_by(&exchange(&mut live, "before")?, "before")?;

    // The file is watched: full resyncs (every 2 s) go on without reading it.
    let (reads, syncs) = (
        node.metric("ferrite_config_reads_total")?,
        node.metric("ferrite_syncs_total")?,
    );
    wait_until("two more full resyncs", SETTLE, || {
        node.metric("ferrite_syncs_total")
            .is_ok_and(|s| s >= syncs + 2.0)
    })?;
    assert_eq!(
        node.metric("ferrite_config_reads_total")?,
        reads,
        "read while unchanged"
    );

    let broken = "apiVersion: v1\nkind: Service\nmetadata: {name: [\n";
    let cases = [
        (
            "a syntax error in document 1",
            format!("{broken}---\n{good}"),
            "line 4",
        ),
        (
            "a syntax error in document 3",
            format!("{good}---\n{broken}"),
            "line",
        ),
        ("an empty file", String::new(), "no object"),
    ];
    for (index, (what, content, says)) in cases.iter().enumerate() {
        // Written in place, as a careless writer (or one caught mid-write) leaves it.
        std::fs::write(node.config_path(), content)?;
        wait_until(&format!("{what} to be refused"), SETTLE, || {
            node.metric("ferrite_config_rejections_total")
                .is_ok_and(|n| n >= (index + 1) as f64)
        })?;
        let (status, body) = node.agent_http("/readyz")?;
        assert_eq!(status, 503, "{what}: {body}");
        assert!(
            body.contains("config rejected") && body.contains(says),
            "{what}: {body}"
        );
        // A full resync with the last applied objects: nothing removed.
        let syncs = node.metric("ferrite_syncs_total")?;
        wait_until("a full resync", SETTLE, || {
            node.metric("ferrite_syncs_total")
                .is_ok_and(|s| s >= syncs + 1.0)
        })?;
        assert_eq!(node.maps()?.contents()?, synced, "{what} changed the maps");
        let request = format!("during {what}");
        assert_eq!(
            answered_by(&exchange(&mut live, &request)?, &request)?,
            backend
        );
        answered_by(&client.tcp_request(TCP_FRONTEND, &request)?, &request)?;
    }
    node.write_config(&good)?;
    wait_until("/readyz 200 again", SETTLE, || {
        node.agent_http("/readyz")
            .is_ok_and(|(status, _)| status == 200)
    })?;
    assert_eq!(node.maps()?.contents()?, synced);
    Ok(())
}
