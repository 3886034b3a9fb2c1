//! Certificates for the refusal cases: other CAs, other trust domains, the mesh CA's own.

use std::path::Path;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA that can sign workload certificates.
pub struct TestCa {
    pub issuer: Issuer<'static, KeyPair>,
    pub cert: CertificateDer<'static>,
    pub pem: String,
}

impl TestCa {
    /// A fresh self-signed CA.
    pub fn generate() -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Weft test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key)?;
        Ok(TestCa {
            cert: cert.der().clone(),
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The mesh CA of a cluster, from its `ca.pem` and `ca.key`.
    pub fn load(dir: &Path) -> Result<Self> {
        let pem = std::fs::read_to_string(dir.join("ca.pem")).context("read ca.pem")?;
        let key = KeyPair::from_pem(
            &std::fs::read_to_string(dir.join("ca.key")).context("read ca.key")?,
        )?;
        let cert = rustls_pemfile_first(&pem)?;
        Ok(TestCa {
            issuer: Issuer::from_ca_cert_der(&cert, key)?,
            cert,
            pem,
        })
    }

    /// A client/server certificate whose URI SAN is `uri` (None: no SAN at all).
    pub fn issue(
        &self,
        uri: Option<&str>,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let key = KeyPair::generate()?;
        let mut params = leaf_params();
        if let Some(uri) = uri {
            params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }
}

impl TestCa {
    /// PEM files for tools such as stunnel: (ca.pem, cert.pem, key.pem) texts, the
    /// certificate with the URI SAN `uri`.
    pub fn issue_pem(&self, uri: &str) -> Result<(String, String, String)> {
        let key = KeyPair::generate()?;
        let mut params = leaf_params();
        params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((self.pem.clone(), cert.pem(), key.serialize_pem()))
    }
}

impl TestCa {
    /// A server certificate for `ips` (IP SANs), as PEM: (certificate, key).
    pub fn issue_server_pem(&self, ips: &[std::net::IpAddr]) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = leaf_params();
        params.subject_alt_names = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

fn rustls_pemfile_first(pem: &str) -> Result<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .context("ca.pem holds no certificate")?
        .context("ca.pem is not PEM")
}

/// A leaf's subject must differ from its issuer's, or OpenSSL takes it for self-signed.
fn leaf_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Weft test workload");
    params
}
