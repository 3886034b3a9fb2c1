//! Certificate verification: the chain to the trust bundle and the SPIFFE ID, both.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use x509_parser::extensions::GeneralName;

use super::TlsError;
use super::bundle::TrustBundle;
use crate::identity::Identity;

/// The SPIFFE ID in a certificate's URI SAN. An X.509-SVID carries exactly one URI SAN, the
/// SPIFFE ID: a certificate with any other URI besides is refused, not read for the one that
/// looks right.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] if uri.starts_with("spiffe://") => Ok(uri.parse()?),
        [] | [_] => Err(TlsError::NoSpiffeId),
        several => Err(TlsError::SeveralUris(several.len())),
    }
}

/// Client side: the server must chain to our roots and be one of the expected identities.
#[derive(Debug)]
pub(super) struct SpiffeServerVerifier {
    pub bundle: Arc<TrustBundle>,
    pub expected: Vec<Identity>,
    pub crypto: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.bundle.current().store,
            intermediates,
            now,
            self.crypto.signature_verification_algorithms.all,
        )?;
        let got = peer_identity(end_entity)?;
        if !self.expected.contains(&got) {
            return Err(TlsError::UnexpectedIdentity {
                got,
                expected: self.expected.clone(),
            }
            .into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.crypto.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.crypto.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.crypto
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Server side: a client certificate is required, must chain to our roots and carry a SPIFFE
/// ID of our trust domain. Which identities may talk to whom is policy, not TLS.
#[derive(Debug)]
pub(super) struct TrustDomainClientVerifier {
    pub bundle: Arc<TrustBundle>,
    pub trust_domain: String,
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    /// No hints: they would be borrowed from one version of the bundle, and tunnels present
    /// their workload's certificate whatever the hints say.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.bundle
            .current()
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        let got = peer_identity(end_entity)?;
        if got.trust_domain != self.trust_domain {
            return Err(TlsError::WrongTrustDomain {
                got,
                expected: self.trust_domain.clone(),
            }
            .into());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.bundle
            .current()
            .client_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.bundle
            .current()
            .client_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.bundle
            .current()
            .client_verifier
            .supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn cert_with(sans: &[SanType]) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans.to_vec();
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn an_svid_is_read_from_its_one_uri_san() {
        let cert = cert_with(&[uri("spiffe://td/ns/a/sa/b")]);
        assert_eq!(peer_identity(&cert).unwrap(), Identity::new("td", "a", "b"));
    }

    #[test]
    fn certificates_that_are_not_svids_are_refused() {
        let two = cert_with(&[uri("spiffe://td/ns/a/sa/b"), uri("https://example.com/")]);
        assert!(matches!(peer_identity(&two), Err(TlsError::SeveralUris(2))));
        let two_ids = cert_with(&[uri("spiffe://td/ns/a/sa/b"), uri("spiffe://td/ns/a/sa/c")]);
        assert!(matches!(
            peer_identity(&two_ids),
            Err(TlsError::SeveralUris(2))
        ));
        let dns = cert_with(&[SanType::DnsName("web.local".try_into().unwrap())]);
        assert!(matches!(peer_identity(&dns), Err(TlsError::NoSpiffeId)));
        let https = cert_with(&[uri("https://td/ns/a/sa/b")]);
        assert!(matches!(peer_identity(&https), Err(TlsError::NoSpiffeId)));
        let query = cert_with(&[uri("spiffe://td/ns/a/sa/b?x=1")]);
        let err = peer_identity(&query).unwrap_err();
        assert!(matches!(err, TlsError::BadSpiffeId(_)), "{err}");
    }
}
