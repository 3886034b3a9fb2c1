//! The mesh CA's signing core: what it signs, what it refuses and why, and its key files.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use mesh_node::ca::{CaError, Created, MeshCa};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use x509_parser::prelude::{FromDer, X509Certificate};

const TD: &str = "cluster.local";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn ca(dir: &std::path::Path) -> MeshCa {
    MeshCa::load_or_create(dir, TD, Duration::from_secs(24 * 3600))
        .unwrap()
        .0
}

/// A CSR as a node would make it: its own key, the SANs given.
fn csr(sans: Vec<SanType>, tweak: impl FnOnce(&mut CertificateParams)) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = sans;
    tweak(&mut params);
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn leaf(pem: &str) -> Vec<u8> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

#[test]
fn a_request_for_the_allowed_identity_gets_a_workload_certificate_that_chains_to_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, created) =
        MeshCa::load_or_create(dir.path(), TD, Duration::from_secs(24 * 3600)).unwrap();
    assert_eq!(created, Created::NewRoot);
    let issued = ca.sign(&csr(vec![uri(WEB)], |_| {}), WEB).unwrap();
    assert_eq!(issued.chain_pem.len(), 1, "a root CA sends the leaf alone");
    let der = leaf(&issued.chain_pem[0]);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    // Exactly one SAN, the SPIFFE ID.
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names.len(), 1);
    assert_eq!(
        format!("{:?}", san.value.general_names[0]),
        format!("URI({WEB:?})")
    );
    // Not a CA; client and server.
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(!bc.value.ca);
    let eku = cert.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.client_auth && eku.value.server_auth);
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(!ku.value.key_cert_sign() && ku.value.digital_signature());
    // 24 h (and a minute back for clock skew).
    let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(life, 24 * 3600 + 60);
    // Signed by the root in the bundle, which is path-length constrained.
    let root_der = leaf(&ca.trust_bundle()[0]);
    let (_, root) = X509Certificate::from_der(&root_der).unwrap();
    cert.verify_signature(Some(root.public_key())).unwrap();
    let root_bc = root.basic_constraints().unwrap().unwrap();
    assert!(root_bc.value.ca);
    assert_eq!(root_bc.value.path_len_constraint, Some(0));
}

#[test]
fn requests_for_more_than_one_workload_identity_are_refused_with_what_they_asked() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    // Another identity than the caller may have.
    let err = ca
        .sign(
            &csr(vec![uri("spiffe://cluster.local/ns/shop/sa/db")], |_| {}),
            WEB,
        )
        .unwrap_err();
    assert!(matches!(err, CaError::CsrWrongIdentity { .. }), "{err}");
    assert!(err.to_string().contains("sa/db"), "{err}");
    // An extra SAN beside the right one.
    for extra in [
        SanType::DnsName("web.shop.svc".try_into().unwrap()),
        uri("spiffe://cluster.local/ns/shop/sa/db"),
        SanType::IpAddress("10.0.0.1".parse().unwrap()),
    ] {
        let err = ca
            .sign(&csr(vec![uri(WEB), extra], |_| {}), WEB)
            .unwrap_err();
        assert!(matches!(err, CaError::CsrNames { .. }), "{err}");
    }
    // No SAN at all.
    let err = ca.sign(&csr(vec![], |_| {}), WEB).unwrap_err();
    assert!(err.to_string().contains("it names: none"), "{err}");
}

#[test]
fn requests_to_be_a_ca_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    // Basic constraints CA:TRUE, as an extension the CSR asks for (rcgen does not put `is_ca`
    // in requests): SEQUENCE { BOOLEAN TRUE }.
    let ca_request = csr(vec![uri(WEB)], |p| {
        let mut ext =
            CustomExtension::from_oid_content(&[2, 5, 29, 19], vec![0x30, 0x03, 0x01, 0x01, 0xff]);
        ext.set_criticality(true);
        p.custom_extensions.push(ext);
    });
    let err = ca.sign(&ca_request, WEB).unwrap_err();
    assert!(matches!(err, CaError::CsrAsksForCa), "{err}");
    // Certificate signing as a key usage.
    let signing = csr(vec![uri(WEB)], |p| {
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    });
    let err = ca.sign(&signing, WEB).unwrap_err();
    assert!(matches!(err, CaError::CsrAsksForCa), "{err}");
    let _ = (IsCa::NoCa, BasicConstraints::Unconstrained);
}

#[test]
fn forged_or_garbled_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let good = csr(vec![uri(WEB)], |_| {});
    // One bit of the signed part changed: the signature no longer verifies.
    let der = rustls_pemfile::read_one(&mut good.as_bytes())
        .unwrap()
        .unwrap();
    let rustls_pemfile::Item::Csr(der) = der else {
        panic!("a CSR")
    };
    let mut bytes = der.to_vec();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x01;
    let forged = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        base64_lines(&bytes)
    );
    let err = ca.sign(&forged, WEB).unwrap_err();
    assert!(
        matches!(err, CaError::CsrBadSignature | CaError::CsrUnreadable(_)),
        "{err}"
    );
    for garbage in [
        "",
        "not pem",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        let err = ca.sign(garbage, WEB).unwrap_err();
        assert!(
            matches!(err, CaError::CsrUnreadable(_)),
            "{garbage:?}: {err}"
        );
    }
}

#[test]
fn the_key_is_created_private_reloaded_and_refused_when_others_can_read_it() {
    let dir = tempfile::tempdir().unwrap();
    let first = ca(dir.path());
    let key = dir.path().join("ca.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Loaded again: the same root.
    let (again, created) =
        MeshCa::load_or_create(dir.path(), TD, Duration::from_secs(3600)).unwrap();
    assert_eq!(created, Created::Loaded);
    assert_eq!(again.trust_bundle(), first.trust_bundle());
    // Readable by others: refused, with the mode.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = MeshCa::load_or_create(dir.path(), TD, Duration::from_secs(3600))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("0644"), "{err}");
    // A certificate without its key is refused, not replaced by a new root.
    std::fs::remove_file(&key).unwrap();
    let err = MeshCa::load_or_create(dir.path(), TD, Duration::from_secs(3600))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("ca.key") && err.contains("missing"), "{err}");
    assert!(dir.path().join("ca.pem").exists());
}

#[test]
fn an_intermediate_under_the_users_root_signs_and_the_root_is_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    // The user's root, and an intermediate it signed for the mesh.
    let root_key = KeyPair::generate().unwrap();
    let mut root_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(root_params, root_key);
    let mesh_key = KeyPair::generate().unwrap();
    let mut mesh_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    mesh_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let mesh = mesh_params.signed_by(&mesh_key, &root_issuer).unwrap();
    std::fs::write(
        dir.path().join("ca.pem"),
        format!("{}{}", mesh.pem(), root.pem()),
    )
    .unwrap();
    tunnel_proto::file_trust::write_secret(
        &dir.path().join("ca.key"),
        mesh_key.serialize_pem().as_bytes(),
    )
    .unwrap();
    let (ca, created) = MeshCa::load_or_create(dir.path(), TD, Duration::from_secs(3600)).unwrap();
    assert_eq!(created, Created::Loaded);
    assert_eq!(ca.trust_bundle(), [root.pem()]);
    let issued = ca.sign(&csr(vec![uri(WEB)], |_| {}), WEB).unwrap();
    assert_eq!(issued.chain_pem.len(), 2, "leaf, then the intermediate");
    assert_eq!(issued.chain_pem[1].trim(), mesh.pem().trim());
    // A key that is not the certificate's is refused.
    tunnel_proto::file_trust::write_secret(
        &dir.path().join("ca.key"),
        KeyPair::generate().unwrap().serialize_pem().as_bytes(),
    )
    .unwrap();
    let err = MeshCa::load_or_create(dir.path(), TD, Duration::from_secs(3600))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("is not the key"), "{err}");
}

fn base64_lines(bytes: &[u8]) -> String {
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode(bytes);
    text.as_bytes()
        .chunks(64)
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}
