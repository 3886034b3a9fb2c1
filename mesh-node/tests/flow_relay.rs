//! The flow relay on the CA's port, called for real (TLS, HTTP/2, tonic) as a node's tunnel
//! calls it, and read through its loopback endpoint as `weft observe --relay` reads it: a
//! caller without a node's token is refused; a node's events reach the reader, and events it
//! sends naming another node, or that are not events, do not; a question without `follow` is
//! answered once every node has ended it, merged and cut to `last`; a reader who leaves ends
//! the subscription on the node.

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use ca_api::FlowRelayClient;
use ca_api::flows::{FromTunnel, ToTunnel, to_tunnel};
use ca_api::tonic::{self, Code, Streaming};
use mesh_node::ca::authenticate::{Authenticator, NodeTokens};
use support::TestCa;
use tokio::sync::mpsc;
use tunnel_proto::flows::{FlowEnd, FlowEvent, FlowKind, now_ms};

fn local_tokens(folder: &std::path::Path) -> Authenticator {
    Authenticator::Tokens(NodeTokens::load(folder).unwrap())
}

/// An HTTP event of `node`'s tunnel at `time_ms`, to `path`.
fn event(node: &str, time_ms: u64, path: &str) -> String {
    serde_json::to_string(&FlowEvent {
        time_ms,
        node: node.into(),
        reporter: "destination".into(),
        source: FlowEnd::default(),
        destination: FlowEnd {
            namespace: "shop".into(),
            workload: "web".into(),
            ..FlowEnd::default()
        },
        kind: FlowKind::Http {
            method: "GET".into(),
            authority: "web".into(),
            path: path.into(),
            status: 200,
            duration_ms: 1.0,
            verdict: "allow".into(),
            policy: None,
            audit: None,
        },
    })
    .unwrap()
}

/// Opens `FlowRelay/Offer` with `token`: what the tunnel sends, and what the relay asks.
async fn offer(
    ca: &TestCa,
    token: &str,
) -> Result<(mpsc::Sender<FromTunnel>, Streaming<ToTunnel>), tonic::Status> {
    let (tx, mut rx) = mpsc::channel::<FromTunnel>(16);
    let outbound = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut request = tonic::Request::new(outbound);
    if !token.is_empty() {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let inbound = FlowRelayClient::new(ca.channel().await)
        .offer(request)
        .await?
        .into_inner();
    Ok((tx, inbound))
}

/// Waits (5 s at most) until the relay lists exactly `nodes` as connected.
async fn listed(ca: &TestCa, nodes: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while ca.relay.nodes() != nodes {
        assert!(
            Instant::now() < deadline,
            "the relay lists {nodes:?}: {:?}",
            ca.relay.nodes()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next subscribe the relay sends: its id and query.
async fn subscribed(inbound: &mut Streaming<ToTunnel>) -> (u64, String) {
    let message = tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await
        .expect("the relay asks within 5 s")
        .unwrap()
        .unwrap();
    match message.request {
        Some(to_tunnel::Request::Subscribe(s)) => (s.id, s.query),
        other => panic!("expected a subscribe, got {other:?}"),
    }
}

/// `GET path` on the relay's endpoint, the connection left open for its answer.
fn get(endpoint: std::net::SocketAddr, path: &str) -> std::net::TcpStream {
    let mut stream = std::net::TcpStream::connect(endpoint).unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    stream
}

/// What `stream` has sent so far (until quiet for its read timeout, or closed).
fn read_some(stream: &mut std::net::TcpStream, into: &mut String) -> bool {
    let mut buffer = [0u8; 65536];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(n) => into.push_str(&String::from_utf8_lossy(&buffer[..n])),
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_nodes_may_offer_and_a_node_speaks_only_for_itself() {
    let ca = TestCa::start(local_tokens).await;
    let endpoint = mesh_node::relay::http::serve("127.0.0.1:0".parse().unwrap(), ca.relay.clone())
        .await
        .unwrap();

    // No token, and a token no node has: refused, and no node is listed.
    for token in ["", "0123456789abcdef"] {
        let status = offer(&ca, token).await.expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(!status.message().contains("token"), "{status:?}");
    }
    assert!(ca.relay.nodes().is_empty());

    // node1 offers, with its own token.
    let (node1, mut asked) = offer(&ca, &ca.node_token("node1")).await.unwrap();
    listed(&ca, &["node1"]).await;

    // A reader follows; node1 is asked for it, and answers with its own event, one naming
    // node2 and one that is not an event: only its own reaches the reader.
    let mut reader = tokio::task::spawn_blocking(move || {
        get(endpoint, "/flows?to_pod=shop%2Fweb&type=http&follow=true")
    })
    .await
    .unwrap();
    let (id, query) = subscribed(&mut asked).await;
    assert!(
        query.contains("to_pod=shop%2Fweb") && query.contains("follow=true"),
        "the filter goes to the node: {query}"
    );
    let now = now_ms();
    node1
        .send(FromTunnel {
            id,
            events: vec![
                event("node1", now, "/own"),
                event("node2", now, "/forged"),
                "{\"time_ms\": 1}".into(),
            ],
            lost: 2,
            ..FromTunnel::default()
        })
        .await
        .unwrap();
    let (reader, received) = tokio::task::spawn_blocking(move || {
        let mut received = String::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !received.contains("/own") {
            read_some(&mut reader, &mut received);
            assert!(Instant::now() < deadline, "the event arrives: {received}");
        }
        // The forged one would have come in the same batch.
        read_some(&mut reader, &mut received);
        (reader, received)
    })
    .await
    .unwrap();
    assert!(received.contains("\"node\":\"node1\""), "{received}");
    assert!(!received.contains("/forged"), "{received}");
    assert!(
        received.contains("{\"lost\":2}"),
        "the node's loss is passed on: {received}"
    );

    // The reader leaves: node1 is told to stop.
    drop(reader.shutdown(std::net::Shutdown::Both));
    drop(reader);
    let message = tokio::time::timeout(Duration::from_secs(5), asked.message())
        .await
        .expect("the unsubscribe comes within 5 s")
        .unwrap()
        .unwrap();
    match message.request {
        Some(to_tunnel::Request::Unsubscribe(u)) => assert_eq!(u.id, id),
        other => panic!("expected an unsubscribe, got {other:?}"),
    }

    // node2 offers too; a question without follow is answered once both have ended it,
    // merged in time order and cut to the last 2.
    let (node2, mut asked2) = offer(&ca, &ca.node_token("node2")).await.unwrap();
    listed(&ca, &["node1", "node2"]).await;
    let answer = tokio::spawn(async move {
        tokio::task::spawn_blocking(move || {
            let mut stream = get(endpoint, "/flows?last=2");
            let mut body = String::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !read_some(&mut stream, &mut body) {
                assert!(Instant::now() < deadline, "answered: {body}");
            }
            body
        })
        .await
        .unwrap()
    });
    let (id1, _) = subscribed(&mut asked).await;
    let (id2, _) = subscribed(&mut asked2).await;
    for (tx, id, events) in [
        (
            &node1,
            id1,
            vec![event("node1", 100, "/a"), event("node1", 300, "/c")],
        ),
        (
            &node2,
            id2,
            vec![event("node2", 200, "/b"), event("node2", 400, "/d")],
        ),
    ] {
        tx.send(FromTunnel {
            id,
            events,
            end: true,
            ..FromTunnel::default()
        })
        .await
        .unwrap();
    }
    let body = answer.await.unwrap();
    let paths: Vec<String> = body
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["path"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(paths, ["/c", "/d"], "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_stops_promptly_with_nodes_connected_and_they_are_told() {
    let mut ca = TestCa::start(local_tokens).await;
    let (_node1, mut asked) = offer(&ca, &ca.node_token("node1")).await.unwrap();
    listed(&ca, &["node1"]).await;
    let stopped = Instant::now();
    let ended = ca.shut_down(Duration::from_secs(5)).await;
    assert!(
        matches!(ended, Some(Ok(()))),
        "the CA stops within 5 s with a node's call open: {ended:?}"
    );
    eprintln!("stopped in {:?}", stopped.elapsed());
    // The node's call ends (it calls again, elsewhere or later), rather than hanging.
    let message = tokio::time::timeout(Duration::from_secs(5), asked.message())
        .await
        .expect("the node's call ends with the controller");
    assert!(!matches!(message, Ok(Some(_))), "{message:?}");
}
