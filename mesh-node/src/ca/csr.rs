//! What a certificate signing request may ask for: one URI SAN, the SPIFFE ID the caller is
//! allowed, and nothing that would make the certificate more than a workload's (no CA, no
//! certificate signing, no other names). Checked before anything is signed; each refusal says
//! what the request asked for.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use super::CaError;

/// The checks on `der`, a DER CSR, for the identity `expected` (a SPIFFE ID).
pub fn check(der: &[u8], expected: &str) -> Result<(), CaError> {
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| CaError::CsrUnreadable(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CaError::CsrUnreadable(format!(
            "{} bytes after the request",
            rest.len()
        )));
    }
    csr.verify_signature()
        .map_err(|_| CaError::CsrBadSignature)?;
    let mut names: Vec<String> = Vec::new();
    for extension in csr.requested_extensions().into_iter().flatten() {
        match extension {
            ParsedExtension::SubjectAlternativeName(san) => {
                names.extend(san.general_names.iter().map(describe));
            }
            ParsedExtension::BasicConstraints(constraints) if constraints.ca => {
                return Err(CaError::CsrAsksForCa);
            }
            ParsedExtension::BasicConstraints(_) => {}
            ParsedExtension::KeyUsage(usage) if usage.key_cert_sign() || usage.crl_sign() => {
                return Err(CaError::CsrAsksForCa);
            }
            // What the key may be used for is set by the CA, whatever is asked.
            ParsedExtension::KeyUsage(_) | ParsedExtension::ExtendedKeyUsage(_) => {}
            other => return Err(CaError::CsrExtension(format!("{other:?}"))),
        }
    }
    match names.as_slice() {
        [only] if only == &format!("URI:{expected}") => Ok(()),
        [only] if only.starts_with("URI:") => Err(CaError::CsrWrongIdentity {
            asked: only.trim_start_matches("URI:").to_owned(),
            allowed: expected.to_owned(),
        }),
        _ => Err(CaError::CsrNames {
            asked: if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            },
            allowed: expected.to_owned(),
        }),
    }
}

/// A SAN as a log reads it: `URI:spiffe://...`, `DNS:name`, ...
fn describe(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(uri) => format!("URI:{uri}"),
        GeneralName::DNSName(dns) => format!("DNS:{dns}"),
        GeneralName::RFC822Name(mail) => format!("email:{mail}"),
        GeneralName::IPAddress(ip) => format!("IP:{ip:02x?}"),
        other => format!("{other:?}"),
    }
}
