//! The inbound listeners a tunnel hands to the agent, on the real kernel: the agent registers
//! a listener with capture only for an enrolled pod of its node, for that pod's addresses, and
//! only if it listens in that pod's own network namespace. A tunnel (compromised, or confused)
//! cannot make capture steer a pod's inbound connections anywhere else.

use std::collections::BTreeMap;
use std::net::{IpAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Command;

use mesh_node::capture::{CaptureReconciler, EnrolledPod};
use mesh_node::tunnel_link::InboundOffer;
use redirect_ebpf::{Exclusions, InboundListeners, Options, Redirect, bpffs_mount, cgroup2_mount};
use tunnel_proto::{Protocol, StateSpec, Workload};

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        assert!(
            nix::unistd::geteuid().is_root(),
            "needs root (eBPF, namespaces)"
        );
        let name = format!("wfo{}{tag}", std::process::id());
        let ok = |c: &mut Command| assert!(c.status().unwrap().success(), "{c:?}");
        ok(Command::new("ip").args(["netns", "add", &name]));
        ok(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        Netns(name)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }

    /// A listener on `port` of all IPv4 addresses, made inside this namespace.
    fn listener(&self, port: u16) -> TcpListener {
        let file = std::fs::File::open(self.path()).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            TcpListener::bind(("0.0.0.0", port)).unwrap()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn offer(pod: &str, ip: &str, socket: impl Into<OwnedFd>) -> InboundOffer {
    InboundOffer {
        pod: pod.into(),
        ips: vec![ip.parse().unwrap()],
        fd: socket.into(),
    }
}

#[test]
fn only_a_listener_of_the_pods_own_namespace_and_addresses_is_registered() {
    let web = Netns::new("web");
    let other = Netns::new("oth");
    let pin_dir = bpffs_mount()
        .unwrap()
        .join(format!("weft-offers-{}", std::process::id()));
    let redirect = Redirect::install(
        &cgroup2_mount().unwrap(),
        &Options {
            pin_dir: Some(pin_dir.clone()),
            ..Options::default()
        },
    )
    .unwrap();
    let mut capture = CaptureReconciler::new(redirect);
    let wanted = BTreeMap::from([(
        "apps/web".to_owned(),
        EnrolledPod {
            netns: web.path(),
            exclusions: Exclusions::default(),
        },
    )]);
    assert!(capture.reconcile(&wanted).is_empty());
    let state = StateSpec {
        workloads: vec![Workload {
            name: "web".into(),
            namespace: "apps".into(),
            service_account: "web".into(),
            ips: vec!["10.1.1.2".parse().unwrap()],
            node: "node1".into(),
            netns: None,
            protocol: Protocol::Hbone,
            policies: Vec::new(),
            mtls: Default::default(),
        }],
        services: vec![],
        policies: vec![],
    };
    let registered = |ip: &str| {
        InboundListeners::open(&pin_dir)
            .unwrap()
            .is_registered(ip.parse::<IpAddr>().unwrap())
    };

    let refused = capture.register_inbound(
        vec![
            // Another namespace's socket, claimed for the pod.
            offer("apps/web", "10.1.1.2", other.listener(15006)),
            // The pod's own socket, claimed for an address that is not the pod's.
            offer("apps/web", "10.1.1.99", web.listener(15016)),
            // A pod that is not enrolled here.
            offer("apps/db", "10.1.1.2", web.listener(15026)),
            // Not a listener.
            offer(
                "apps/web",
                "10.1.1.2",
                std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
            ),
        ],
        &wanted,
        &state,
    );
    assert_eq!(refused.len(), 4, "{refused:#?}");
    assert!(refused[0].contains("network namespace"), "{}", refused[0]);
    assert!(
        refused[1].contains("10.1.1.99 is not its address"),
        "{}",
        refused[1]
    );
    assert!(refused[2].contains("not an enrolled pod"), "{}", refused[2]);
    assert!(
        refused[3].contains("not a listening TCP socket"),
        "{}",
        refused[3]
    );
    assert!(!registered("10.1.1.2") && !registered("10.1.1.99"));

    let listener = web.listener(15006);
    let kept = listener.try_clone().unwrap();
    let refused = capture.register_inbound(
        vec![offer("apps/web", "10.1.1.2", listener)],
        &wanted,
        &state,
    );
    assert!(refused.is_empty(), "{refused:?}");
    assert!(registered("10.1.1.2"));
    // The agent kept no copy: once the tunnel's socket closes, capture forgets it.
    drop(kept);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while registered("10.1.1.2") {
        assert!(
            std::time::Instant::now() < deadline,
            "the closed listener stays registered"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    drop(capture);
    redirect_ebpf::uninstall(&pin_dir).unwrap();
}
