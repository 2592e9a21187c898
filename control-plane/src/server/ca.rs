//! The mesh's certificate authority.
//!
//! Workloads send a CSR (their private key never leaves the proxy) and a token that
//! proves who they are. The CA signs a short-lived leaf whose only SAN is the SPIFFE ID
//! the token proves — whatever else the CSR asks for is ignored, and a CSR that asks for
//! a different identity is refused. Weak keys are refused. The trust bundle can hold
//! several roots so a root can be rotated without an outage.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use x509_parser::{prelude::FromDer, public_key::PublicKey};

/// Smallest RSA modulus accepted in a CSR.
const MIN_RSA_BITS: usize = 2048;
/// Leaves are backdated this much to tolerate clock skew between nodes.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the CSR is not a valid PKCS#10 request with a good signature: {0}")]
    BadCsr(String),
    #[error(
        "the CSR asks for {asked:?} but the token proves {proven}; a proxy may only ask for its own identity"
    )]
    WrongIdentity { asked: Vec<String>, proven: SpiffeId },
    #[error("the CSR's key is too weak ({0}); use ECDSA P-256/P-384, Ed25519 or RSA of at least 2048 bits")]
    WeakKey(String),
    #[error("CA certificate or key: {0}")]
    BadCa(String),
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
}

pub use weft_api::spiffe::SpiffeId;

/// A signed leaf and what the workload needs to use it.
#[derive(Debug)]
pub struct Issued {
    pub cert_chain_pem: String,
    pub trust_bundle_pem: String,
    pub not_after: time::OffsetDateTime,
}

/// The CA as it is now: a source that can change it (Kubernetes: its Secret edited) sends
/// the new one; every use reads the latest.
pub type Shared = tokio::sync::watch::Receiver<std::sync::Arc<Ca>>;

/// A CA that never changes (the mesh file's, tests').
pub fn fixed(ca: Ca) -> Shared {
    // The sender is dropped: the receiver keeps the value, and `changed` never fires.
    tokio::sync::watch::channel(std::sync::Arc::new(ca)).1
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    /// The signing root plus any other roots still trusted (rotation).
    bundle_pem: String,
    pub trust_domain: String,
}

impl Ca {
    /// A fresh self-signed root, for local use only.
    pub fn generate(trust_domain: &str) -> Result<Ca, Error> {
        let (cert, key) = Ca::new_root(trust_domain, time::Duration::days(365))?;
        Ca::from_pem(trust_domain, &cert, &key, "")
    }

    /// A new root certificate and its key, PEM, valid for `lifetime`: what `weft up`
    /// makes for itself and `weft install` puts in the cluster's Secret.
    pub fn new_root(trust_domain: &str, lifetime: time::Duration) -> Result<(String, String), Error> {
        let key = KeyPair::generate().map_err(|e| Error::BadCa(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("weft root CA ({trust_domain})"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + lifetime;
        let cert = params.self_signed(&key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A CA from PEM files: the signing certificate and key, plus extra trusted roots.
    pub fn from_pem(
        trust_domain: &str,
        cert_pem: &str,
        key_pem: &str,
        extra_roots_pem: &str,
    ) -> Result<Ca, Error> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| Error::BadCa(format!("key: {e}")))?;
        check_root(cert_pem, &key, time::OffsetDateTime::now_utc())?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| Error::BadCa(format!("certificate: {e}")))?;
        Ok(Ca {
            issuer,
            cert_pem: cert_pem.to_string(),
            bundle_pem: format!("{}{}", cert_pem.trim_end().to_string() + "\n", extra_roots_pem),
            trust_domain: trust_domain.to_string(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn trust_bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// Whether `other` signs with the same root and trusts the same bundle.
    pub fn same_as(&self, other: &Ca) -> bool {
        self.cert_pem == other.cert_pem && self.bundle_pem == other.bundle_pem
    }

    /// Signs `csr_pem` for `identity`, valid for `ttl`.
    pub fn sign(&self, csr_pem: &str, identity: &SpiffeId, ttl: Duration) -> Result<Issued, Error> {
        check_key_strength(csr_pem)?;
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| Error::BadCsr(e.to_string()))?;
        let wanted = identity.to_string();
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(uri) => uri.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if asked != [wanted.clone()] {
            return Err(Error::WrongIdentity { asked, proven: identity.clone() });
        }
        // The leaf is built from our parameters; the CSR contributes only its public key.
        // An empty subject (the identity is the SAN, as SPIFFE X.509-SVIDs have it) and a
        // signature-only key usage: TLS 1.3 never encrypts to the key, whatever its type.
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(wanted.as_str().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        let leaf =
            CertificateSigningRequestParams { params, public_key: csr.public_key }.signed_by(&self.issuer)?;
        Ok(Issued {
            cert_chain_pem: leaf.pem(),
            trust_bundle_pem: self.bundle_pem.clone(),
            not_after: now + ttl,
        })
    }
}

impl Ca {
    /// A serving certificate for the control plane's own HTTPS endpoints (the admission
    /// webhook) under `dns_names`, with a fresh key: `(chain, key)` PEM. The API server
    /// trusts it through the webhook configuration's `caBundle`, which is this CA's root.
    pub fn serving(&self, dns_names: &[String], ttl: Duration) -> Result<(Issued, String), Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        let leaf = params.signed_by(&key, &self.issuer)?;
        let issued = Issued {
            cert_chain_pem: leaf.pem(),
            trust_bundle_pem: self.bundle_pem.clone(),
            not_after: now + ttl,
        };
        Ok((issued, key.serialize_pem()))
    }
}

/// A root that signs nothing anyone accepts is refused up front: one outside its
/// validity period, or a key that is not the certificate's.
fn check_root(cert_pem: &str, key: &KeyPair, now: time::OffsetDateTime) -> Result<(), Error> {
    use x509_parser::prelude::X509Certificate;
    let der = pem_der(cert_pem).ok_or_else(|| Error::BadCa("certificate: not PEM".into()))?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| Error::BadCa(format!("certificate: {e}")))?;
    let validity = cert.validity();
    if now > validity.not_after.to_datetime() {
        return Err(Error::BadCa(format!(
            "the certificate expired on {}: make a new root (weft install) and rotate to it",
            validity.not_after
        )));
    }
    if now < validity.not_before.to_datetime() {
        return Err(Error::BadCa(format!(
            "the certificate is not valid before {}: check the clock of whoever made it",
            validity.not_before
        )));
    }
    if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(key).as_slice() {
        return Err(Error::BadCa(
            "the key is not the certificate's: give the key the root was made with".into(),
        ));
    }
    Ok(())
}

fn check_key_strength(csr_pem: &str) -> Result<(), Error> {
    let der = pem_der(csr_pem).ok_or_else(|| Error::BadCsr("not PEM".into()))?;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|e| Error::BadCsr(e.to_string()))?;
    match csr.certification_request_info.subject_pki.parsed() {
        Ok(PublicKey::RSA(rsa)) if rsa.key_size() < MIN_RSA_BITS => {
            Err(Error::WeakKey(format!("RSA {} bits", rsa.key_size())))
        }
        Ok(PublicKey::RSA(_)) => Ok(()),
        Ok(PublicKey::EC(ec)) if ec.key_size() >= 256 => Ok(()),
        Ok(PublicKey::EC(ec)) => Err(Error::WeakKey(format!("EC {} bits", ec.key_size()))),
        Ok(PublicKey::Unknown(_)) => Ok(()), // Ed25519: parsed as unknown, accepted by rcgen's algorithm list
        Ok(other) => Err(Error::WeakKey(format!("{other:?}"))),
        Err(e) => Err(Error::BadCsr(e.to_string())),
    }
}

fn pem_der(pem: &str) -> Option<Vec<u8>> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok().map(|(_, p)| p.contents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    fn id(sa: &str) -> SpiffeId {
        format!("spiffe://weft.local/ns/default/sa/{sa}").parse().unwrap()
    }

    fn csr_for(sans: &[&str], key: &KeyPair) -> String {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans.iter().map(|s| SanType::URI((*s).try_into().unwrap())).collect();
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    #[test]
    fn issues_exactly_the_identity_and_lifetime_asked_for() {
        let ca = Ca::generate("weft.local").unwrap();
        let key = KeyPair::generate().unwrap();
        let me = id("frontend");
        let issued = ca.sign(&csr_for(&[&me.to_string()], &key), &me, Duration::from_secs(3600)).unwrap();
        let der = pem_der(&issued.cert_chain_pem).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(sans, vec![format!("URI({me})")]);
        let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(life, 3600 + BACKDATE.as_secs() as i64);
        assert!(!cert.is_ca());
        // No placeholder subject, and a key usage that fits an EC key: signatures only.
        assert!(cert.subject().iter_attributes().next().is_none(), "subject: {}", cert.subject());
        let usage = cert.key_usage().unwrap().unwrap().value;
        assert!(usage.digital_signature() && !usage.key_encipherment(), "{usage:?}");
        // Signed by the CA: the issuer's key verifies it.
        let ca_der = pem_der(ca.cert_pem()).unwrap();
        let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert_eq!(issued.trust_bundle_pem, ca.cert_pem());
    }

    #[test]
    fn loads_a_root_from_pem_and_trusts_extra_roots() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = params.self_signed(&key).unwrap();
        let old_root = Ca::generate("weft.local").unwrap();
        let ca = Ca::from_pem("weft.local", &root.pem(), &key.serialize_pem(), old_root.cert_pem()).unwrap();
        // The new root signs; both roots are in the bundle during rotation.
        assert_eq!(ca.trust_bundle_pem().matches("BEGIN CERTIFICATE").count(), 2);
        let leaf_key = KeyPair::generate().unwrap();
        let issued =
            ca.sign(&csr_for(&[&id("a").to_string()], &leaf_key), &id("a"), Duration::from_secs(60)).unwrap();
        let leaf_der = pem_der(&issued.cert_chain_pem).unwrap();
        let (_, cert) = X509Certificate::from_der(&leaf_der).unwrap();
        let (_, root_cert) = X509Certificate::from_der(root.der()).unwrap();
        cert.verify_signature(Some(root_cert.public_key())).unwrap();
        assert!(Ca::from_pem("weft.local", "not pem", &key.serialize_pem(), "").is_err());
    }

    #[test]
    fn refuses_another_identity() {
        let ca = Ca::generate("weft.local").unwrap();
        let key = KeyPair::generate().unwrap();
        let csr = csr_for(&["spiffe://weft.local/ns/default/sa/admin"], &key);
        let err = ca.sign(&csr, &id("frontend"), Duration::from_secs(60)).unwrap_err();
        assert!(matches!(err, Error::WrongIdentity { .. }), "{err}");
        // Asking for its own identity plus another is refused too.
        let csr = csr_for(&[&id("frontend").to_string(), "spiffe://weft.local/ns/default/sa/admin"], &key);
        assert!(ca.sign(&csr, &id("frontend"), Duration::from_secs(60)).is_err());
    }

    #[test]
    fn refuses_weak_keys_and_garbage() {
        let ca = Ca::generate("weft.local").unwrap();
        // A CSR with a 1024-bit RSA key, made with `openssl req -newkey rsa:1024`.
        let err = ca
            .sign(include_str!("../../testdata/rsa1024.csr"), &id("a"), Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, Error::WeakKey(_)), "{err}");
        let err = ca.sign(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            &id("a"),
            Duration::from_secs(60),
        );
        assert!(matches!(err, Err(Error::BadCsr(_))));
    }

    #[test]
    fn a_root_that_cannot_sign_is_refused_with_the_reason() {
        let (cert, key) = Ca::new_root("weft.local", ::time::Duration::days(1)).unwrap();
        assert!(Ca::from_pem("weft.local", &cert, &key, "").is_ok());
        let (_, other_key) = Ca::new_root("weft.local", ::time::Duration::days(1)).unwrap();
        let e = Ca::from_pem("weft.local", &cert, &other_key, "").err().unwrap().to_string();
        assert!(e.contains("the key is not the certificate's"), "{e}");
        let k = KeyPair::from_pem(&key).unwrap();
        let in_two_days = ::time::OffsetDateTime::now_utc() + ::time::Duration::days(2);
        let e = check_root(&cert, &k, in_two_days).unwrap_err().to_string();
        assert!(e.contains("expired on") && e.contains("rotate"), "{e}");
        let e =
            check_root(&cert, &k, ::time::OffsetDateTime::now_utc() - ::time::Duration::days(2)).unwrap_err();
        assert!(e.to_string().contains("not valid before"), "{e}");
    }
}
