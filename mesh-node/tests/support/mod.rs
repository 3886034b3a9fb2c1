//! The mesh CA served for real on 127.0.0.1 (TLS, HTTP/2, tonic), for the tests that call it
//! as a tunnel does: the CA service and the flow relay on its port.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use ca_api::tonic;
use ca_api::{IstioCertificateRequest, IstioCertificateServiceClient};
use mesh_node::ca::authenticate::{Authenticator, create_node_token};
use mesh_node::ca::run::{CaSettings, start_ca};
use mesh_node::cluster::{ClusterObjects, Object};
use mesh_node::relay::Relay;
use rustls::pki_types::ServerName;

pub const TD: &str = "cluster.local";
pub const SERVER_NAME: &str = "weft-ca.test";

/// The cluster: shop/web runs on node1, shop/db on node2.
pub fn cluster() -> ClusterObjects {
    let mut objects = ClusterObjects::default();
    for (name, sa, node) in [("web-1", "web", "node1"), ("db-1", "db", "node2")] {
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "app"}]},
            "status": {"phase": "Running"},
        });
        objects.insert(Object::Pod(Arc::new(serde_json::from_value(pod).unwrap())));
    }
    objects
}

/// A CA serving on 127.0.0.1 with `authenticator`; its folder, address and trust bundle.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub bundle: String,
    /// The flow relay served on the CA's port.
    pub relay: Arc<Relay>,
    /// Stops the CA (SIGTERM's way), and its serving task.
    stop: Arc<tokio::sync::Notify>,
    served: Option<tokio::task::JoinHandle<Result<(), mesh_node::ca::CaError>>>,
}

impl TestCa {
    pub async fn start(authenticator: impl FnOnce(&std::path::Path) -> Authenticator) -> TestCa {
        // The workspace builds rustls with two providers: the process must choose one.
        mesh_node::install_default_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o700)).unwrap();
        create_node_token(&tokens, "node1").unwrap();
        create_node_token(&tokens, "node2").unwrap();
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(cluster()));
        // The sender outlives the test: the CA reads the cluster it last sent.
        std::mem::forget(_tx);
        let settings = CaSettings {
            dir: dir.path().join("ca"),
            trust_domain: TD.into(),
            lifetime: Duration::from_secs(3600),
            listen: "127.0.0.1:0".parse().unwrap(),
            server_names: vec![SERVER_NAME.into()],
            bundle_file: Some(dir.path().join("bundle.pem")),
        };
        std::fs::create_dir(&settings.dir).unwrap();
        let running = start_ca(settings, authenticator(&tokens), rx)
            .await
            .unwrap();
        let addr = running.bound;
        let relay = running.relay.clone();
        let stop = Arc::new(tokio::sync::Notify::new());
        let stopping = stop.clone();
        let served = Some(tokio::spawn(
            running.run(async move { stopping.notified().await }),
        ));
        let bundle = std::fs::read_to_string(dir.path().join("bundle.pem")).unwrap();
        TestCa {
            dir,
            addr,
            bundle,
            relay,
            stop,
            served,
        }
    }

    /// Stops the CA as SIGTERM does; how it ended, or `None` if it did not within `within`.
    pub async fn shut_down(
        &mut self,
        within: Duration,
    ) -> Option<Result<(), mesh_node::ca::CaError>> {
        self.stop.notify_one();
        let served = self.served.take()?;
        tokio::time::timeout(within, served)
            .await
            .ok()
            .map(|joined| joined.unwrap())
    }

    pub fn node_token(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("tokens/{node}.token")))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// A gRPC channel to the CA's port, verified against the bundle as a tunnel does.
    pub async fn channel(&self) -> tonic::transport::Channel {
        let mut roots = rustls::RootCertStore::empty();
        for root in rustls_pemfile::certs(&mut self.bundle.as_bytes()) {
            roots.add(root.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let addr = self.addr;
        tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let connector = connector.clone();
                async move {
                    let tcp = tokio::net::TcpStream::connect(addr).await?;
                    let name = ServerName::try_from(SERVER_NAME).unwrap();
                    let tls = connector.connect(name, tcp).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
                }
            }))
            .await
            .unwrap()
    }

    /// Asks for `identity` with `csr`, authenticated by `token`: the PEM chain, or the status.
    pub async fn ask(
        &self,
        token: &str,
        identity: &str,
        csr: String,
    ) -> Result<Vec<String>, tonic::Status> {
        let channel = self.channel().await;
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: 0,
            metadata: Some(ca_api::impersonating(identity)),
        });
        if !token.is_empty() {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        IstioCertificateServiceClient::new(channel)
            .create_certificate(request)
            .await
            .map(|r| r.into_inner().cert_chain)
    }
}
