//! The mesh CA, held by `mesh-node controller` alone: it signs certificate signing requests
//! for workload identities, so that a node holds only the keys of the pods it runs (the CSR's
//! key never leaves the node) and no tunnel holds the signing key.
//!
//! This module is the signing core: the key material (a root created on first start, or an
//! intermediate under the user's own root, from files), what a CSR may ask for (`csr.rs`) and
//! what the CA puts in the certificates it signs; and who may have which identity
//! (`authorize.rs`: a node, the service accounts of the pods scheduled on it), which the
//! caller of [`MeshCa::sign`] checks first.

pub mod authenticate;
mod authorize;
mod csr;
mod files;
pub mod publish;
pub mod run;
pub mod serve;
pub mod service;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};

pub use authorize::{Refusal, may_hold};
pub use files::{Created, fingerprint, promote, retire, stage_root};

/// Why the CA cannot start, or refuses a request.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error(transparent)]
    Untrusted(#[from] tunnel_proto::file_trust::FileTrustError),
    #[error("{0:?} is not a SPIFFE ID the CA can sign: {1}")]
    BadIdentity(String, String),
    #[error("the certificate signing request does not parse: {0}")]
    CsrUnreadable(String),
    #[error("the certificate signing request's signature does not verify with its own key")]
    CsrBadSignature,
    #[error(
        "the certificate signing request asks to be a CA (basic constraints CA, or certificate or CRL signing)"
    )]
    CsrAsksForCa,
    #[error("the certificate signing request asks for an extension the CA does not grant: {0}")]
    CsrExtension(String),
    #[error(
        "the certificate signing request must name exactly one SAN, the URI {allowed}; it names: {asked}"
    )]
    CsrNames { asked: String, allowed: String },
    #[error("the certificate signing request asks for {asked}, the caller may have {allowed}")]
    CsrWrongIdentity { asked: String, allowed: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("signing failed: {0}")]
    Signing(String),
}

/// A signed workload certificate: PEM, leaf first, then the CA's chain (not the root).
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    pub chain_pem: Vec<String>,
    pub not_after: SystemTime,
}

/// Allows for clocks that differ slightly between nodes.
const BACKDATE: Duration = Duration::from_secs(60);

/// The signing key and what goes with it.
pub struct MeshCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate and the intermediates above it (not the root): sent after each
    /// leaf so that peers can build the chain to the bundle.
    chain_pem: Vec<String>,
    /// The roots tunnels trust.
    bundle_pem: Vec<String>,
    trust_domain: String,
    lifetime: Duration,
}

impl MeshCa {
    /// Loads the CA from `dir` (`ca.pem`: the CA's certificate, then its chain up to and
    /// including the root; `ca.key`: its key, mode 0600), or creates a root there when neither
    /// file exists. Certificates it signs live `lifetime`.
    pub fn load_or_create(
        dir: &std::path::Path,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<(MeshCa, Created), CaError> {
        let (material, created) = files::load_or_create(dir, trust_domain)?;
        let ca = MeshCa {
            issuer: material.issuer,
            chain_pem: material.chain_pem,
            bundle_pem: material.bundle_pem,
            trust_domain: trust_domain.to_owned(),
            lifetime,
        };
        Ok((ca, created))
    }

    /// The trust domain it signs identities of.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust bundle (PEM roots) every tunnel verifies peers against.
    pub fn trust_bundle(&self) -> &[String] {
        &self.bundle_pem
    }

    /// Loads the CA from `dir` as it stands (after a rotation step); creates nothing.
    pub fn reload(
        dir: &std::path::Path,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<MeshCa, CaError> {
        if !dir.join("ca.pem").exists() || !dir.join("ca.key").exists() {
            return Err(CaError::BadFile {
                path: dir.to_owned(),
                reason: "ca.pem or ca.key is missing (mid-rotation?)".into(),
            });
        }
        Ok(MeshCa::load_or_create(dir, trust_domain, lifetime)?.0)
    }

    /// The SPIFFE ID of a service account in this CA's trust domain.
    pub fn spiffe_id(&self, namespace: &str, service_account: &str) -> Result<String, CaError> {
        let id = format!(
            "spiffe://{}/ns/{namespace}/sa/{service_account}",
            self.trust_domain
        );
        match spiffe::SpiffeId::new(&id) {
            Ok(_) => Ok(id),
            Err(e) => Err(CaError::BadIdentity(id, e.to_string())),
        }
    }

    /// How long the certificates it signs live, unless a shorter life is asked for.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// The root the certificates it signs chain to (the first of the bundle; the others are a
    /// staged next root and retired ones).
    pub fn signing_root(&self) -> &str {
        // The bundle is built from the CA's own chain and never empty (see files.rs).
        &self.bundle_pem[0]
    }

    /// Signs `csr_pem` for the SPIFFE ID `identity` (which the caller has established the
    /// requester may hold), after checking the request asks for that identity and nothing more.
    pub fn sign(&self, csr_pem: &str, identity: &str) -> Result<IssuedCertificate, CaError> {
        self.sign_for(csr_pem, identity, self.lifetime)
    }

    /// Like [`MeshCa::sign`], for at most `lifetime` (never longer than the CA's own setting).
    pub fn sign_for(
        &self,
        csr_pem: &str,
        identity: &str,
        lifetime: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        let der = pem_der(csr_pem)?;
        csr::check(&der, identity)?;
        let request = CertificateSigningRequestParams::from_der(&der.as_slice().into())
            .map_err(|e| CaError::CsrUnreadable(e.to_string()))?;
        let signing = |e: rcgen::Error| CaError::Signing(e.to_string());
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.try_into().map_err(signing)?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let issued_at = SystemTime::now();
        let not_after = issued_at + lifetime.min(self.lifetime);
        params.not_before = (issued_at - BACKDATE).into();
        params.not_after = not_after.into();
        let leaf = params
            .signed_by(&request.public_key, &self.issuer)
            .map_err(signing)?;
        let mut chain_pem = vec![leaf.pem()];
        chain_pem.extend(self.chain_pem.iter().cloned());
        Ok(IssuedCertificate {
            chain_pem,
            not_after,
        })
    }

    /// A certificate for the CA's own gRPC endpoint, for `dns_names`, with a key made here and
    /// never written: (PEM chain, leaf first; PEM key). Lives as long as workload certificates.
    pub fn serving_certificate(
        &self,
        dns_names: &[String],
    ) -> Result<(Vec<String>, String), CaError> {
        let signing = |e: rcgen::Error| CaError::Signing(e.to_string());
        let key = KeyPair::generate().map_err(signing)?;
        let mut params = CertificateParams::new(dns_names.to_vec()).map_err(signing)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + self.lifetime).into();
        let cert = params.signed_by(&key, &self.issuer).map_err(signing)?;
        let mut chain = vec![cert.pem()];
        chain.extend(self.chain_pem.iter().cloned());
        Ok((chain, key.serialize_pem()))
    }
}

/// The DER of a PEM `CERTIFICATE REQUEST`.
fn pem_der(csr_pem: &str) -> Result<Vec<u8>, CaError> {
    let mut reader = csr_pem.as_bytes();
    match rustls_pemfile::read_one(&mut reader) {
        Ok(Some(rustls_pemfile::Item::Csr(der))) => Ok(der.to_vec()),
        Ok(Some(_)) => Err(CaError::CsrUnreadable(
            "the PEM block is not a CERTIFICATE REQUEST".into(),
        )),
        Ok(None) => Err(CaError::CsrUnreadable("no PEM block".into())),
        Err(e) => Err(CaError::CsrUnreadable(e.to_string())),
    }
}
