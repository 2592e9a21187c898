//! Mutual TLS between meshed proxies: TLS 1.3 only, both sides present the SPIFFE
//! certificate `identity` obtains, and both verify the other's chain against the
//! mesh's trust bundle. The client also checks that the server's SPIFFE ID is the one
//! discovery announced (server names are not DNS names in the mesh, so rustls' name
//! check is replaced by an identity check); the server learns the client's identity for
//! authorization.

use std::{sync::Arc, time::SystemTime};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{
        ring, verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
    },
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime},
    server::WebPkiClientVerifier,
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};

/// ALPN of mesh connections carrying multiplexed HTTP (HTTP/2).
pub const ALPN_HTTP: &[u8] = b"weft.mesh/h2";
/// ALPN of mesh connections carrying one opaque TCP stream.
pub const ALPN_TCP: &[u8] = b"weft.mesh/tcp";
/// ALPN of mesh connections carrying HTTP/1 on a connection of its own: requests that
/// take over their connection (upgrades such as WebSocket) cannot share HTTP/2.
pub const ALPN_H1: &[u8] = b"weft.mesh/http1";

/// Whether a ClientHello's ALPN names a mesh connection.
pub fn is_mesh_alpn(proto: &[u8]) -> bool {
    [ALPN_HTTP, ALPN_TCP, ALPN_H1].contains(&proto)
}

/// Opens mutual TLS over `tcp` to a peer proxy; `cfg` checks the identity it must prove.
pub async fn connect(
    tcp: tokio::net::TcpStream,
    cfg: Arc<ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    // Mesh peers are named by SPIFFE ID, not DNS; the verifier checks the ID.
    let name = ServerName::try_from("peer.weft.invalid").expect("valid name");
    tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await
}

/// What the proxy presents and trusts, with the TLS configurations made from it (built
/// once per certificate, not per connection). Its `Debug` leaves the key out.
pub struct Credentials {
    pub identity: String,
    pub key_pem: String,
    pub cert_chain_pem: String,
    pub trust_bundle_pem: String,
    pub not_after: SystemTime,
    server_tls: std::sync::OnceLock<Arc<rustls::ServerConfig>>,
    client_tls: std::sync::Mutex<ClientConfigs>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .field("key_pem", &"<redacted>")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn new(
        identity: String,
        key_pem: String,
        cert_chain_pem: String,
        trust_bundle_pem: String,
        not_after: SystemTime,
    ) -> Self {
        Credentials {
            identity,
            key_pem,
            cert_chain_pem,
            trust_bundle_pem,
            not_after,
            server_tls: Default::default(),
            client_tls: Default::default(),
        }
    }

    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, Error> {
        if let Some(cfg) = self.server_tls.get() {
            return Ok(cfg.clone());
        }
        let cfg = server_config(self)?;
        Ok(self.server_tls.get_or_init(|| cfg).clone())
    }

    /// The client configuration for a peer that must prove `peer`, speaking `alpn`.
    pub fn client_config(&self, peer: &str, alpn: &'static [u8]) -> Result<Arc<rustls::ClientConfig>, Error> {
        let mut cache = self.client_tls.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(cfg) = cache.get(&(peer.to_string(), alpn)) {
            return Ok(cfg.clone());
        }
        let cfg = client_config(self, peer, alpn)?;
        cache.insert((peer.to_string(), alpn), cfg.clone());
        Ok(cfg)
    }
}

/// Client TLS configurations by (peer identity, ALPN).
type ClientConfigs = std::collections::HashMap<(String, &'static [u8]), Arc<rustls::ClientConfig>>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the certificate or key from the control plane is unusable: {0}")]
    Credentials(String),
    #[error("the trust bundle has no usable root: {0}")]
    Bundle(String),
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn chain_and_key(
    creds: &Credentials,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    let chain = CertificateDer::pem_slice_iter(creds.cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Credentials(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes())
        .map_err(|e| Error::Credentials(e.to_string()))?;
    Ok((chain, key))
}

fn roots(bundle_pem: &str) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| Error::Bundle(e.to_string()))?)
            .map_err(|e| Error::Bundle(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(Error::Bundle("no certificates".into()));
    }
    Ok(roots)
}

/// The inbound side: requires a client certificate from the mesh.
pub fn server_config(creds: &Credentials) -> Result<Arc<ServerConfig>, Error> {
    let (chain, key) = chain_and_key(creds)?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&creds.trust_bundle_pem)?), provider())
            .build()
            .map_err(|e| Error::Bundle(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN_HTTP.to_vec(), ALPN_TCP.to_vec(), ALPN_H1.to_vec()];
    Ok(Arc::new(cfg))
}

/// The outbound side towards a peer that must prove `expected_identity`.
pub fn client_config(
    creds: &Credentials,
    expected_identity: &str,
    alpn: &[u8],
) -> Result<Arc<ClientConfig>, Error> {
    let (chain, key) = chain_and_key(creds)?;
    let anchors = roots(&creds.trust_bundle_pem)?.roots;
    let verifier = SpiffeServerVerifier {
        anchors,
        expected: expected_identity.to_string(),
        algs: provider().signature_verification_algorithms,
    };
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(cfg))
}

/// The SPIFFE ID (URI SAN) of a certificate.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(uri.to_string()),
        _ => None,
    })
}

/// The peer's SPIFFE ID after a completed handshake.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<String> {
    spiffe_id(conn.peer_certificates()?.first()?)
}

/// Verifies the server's chain against the mesh roots, then its SPIFFE ID.
#[derive(Debug)]
struct SpiffeServerVerifier {
    anchors: Vec<TrustAnchor<'static>>,
    expected: String,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
        cert.verify_for_usage(
            self.algs.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::InvalidCertificate(webpki_error(e)))?;
        match spiffe_id(end_entity) {
            Some(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            other => {
                tracing::info!(expected = %self.expected, got = ?other, "peer presented the wrong identity");
                Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

fn webpki_error(e: webpki::Error) -> rustls::CertificateError {
    use rustls::CertificateError as C;
    match e {
        webpki::Error::CertExpired { .. } => C::Expired,
        webpki::Error::CertNotValidYet { .. } => C::NotValidYet,
        webpki::Error::UnknownIssuer => C::UnknownIssuer,
        webpki::Error::InvalidSignatureForPublicKey => C::BadSignature,
        _ => C::ApplicationVerificationFailure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    use std::time::{Duration, SystemTime};

    struct TestCa {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    fn ca() -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa { issuer: Issuer::new(params, key), pem }
    }

    #[test]
    fn debug_never_prints_the_key() {
        let c = creds(&ca(), "spiffe://weft.local/ns/default/sa/web", false);
        let shown = format!("{c:?}");
        assert!(shown.contains("sa/web") && shown.contains("<redacted>"), "{shown}");
        assert!(!shown.contains("PRIVATE KEY") && !shown.contains(&c.key_pem[40..80]), "{shown}");
    }

    fn creds(ca: &TestCa, id: &str, expired: bool) -> Credentials {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        let now = time::OffsetDateTime::now_utc();
        if expired {
            params.not_before = now - time::Duration::hours(2);
            params.not_after = now - time::Duration::hours(1);
        }
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        Credentials::new(
            id.into(),
            key.serialize_pem(),
            cert.pem(),
            ca.pem.clone(),
            SystemTime::now() + Duration::from_secs(3600),
        )
    }

    /// Runs a full handshake in memory. Ok: (client's view of the server identity,
    /// server's view of the client identity).
    fn handshake(
        client: &Credentials,
        server: &Credentials,
        expect: &str,
    ) -> Result<(String, String), String> {
        let ccfg = client_config(client, expect, ALPN_HTTP).map_err(|e| e.to_string())?;
        let scfg = server_config(server).map_err(|e| e.to_string())?;
        let name = ServerName::try_from("peer.weft.invalid").unwrap();
        let mut c = rustls::ClientConnection::new(ccfg, name).unwrap();
        let mut s = rustls::ServerConnection::new(scfg).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets().map_err(|e| format!("server: {e}"))?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets().map_err(|e| format!("client: {e}"))?;
            if !c.is_handshaking() && !s.is_handshaking() {
                assert_eq!(s.alpn_protocol(), Some(ALPN_HTTP));
                return Ok((peer_identity(&c).unwrap(), peer_identity(&s).unwrap()));
            }
        }
        Err("handshake did not finish".into())
    }

    const WEB: &str = "spiffe://weft.local/ns/default/sa/web";
    const API: &str = "spiffe://weft.local/ns/default/sa/api";

    #[test]
    fn mutual_tls_learns_both_identities() {
        let ca = ca();
        let (seen_server, seen_client) =
            handshake(&creds(&ca, WEB, false), &creds(&ca, API, false), API).unwrap();
        assert_eq!((seen_server.as_str(), seen_client.as_str()), (API, WEB));
    }

    #[test]
    fn the_wrong_server_identity_is_refused() {
        let ca = ca();
        let err = handshake(&creds(&ca, WEB, false), &creds(&ca, WEB, false), API).unwrap_err();
        assert!(err.contains("client") && err.contains("NotValidForName"), "{err}");
    }

    #[test]
    fn a_client_from_another_ca_is_refused() {
        let (mesh, other) = (ca(), ca());
        let mut intruder = creds(&other, WEB, false);
        // It even trusts the mesh root, but its own certificate is from elsewhere.
        intruder.trust_bundle_pem = mesh.pem.clone();
        let err = handshake(&intruder, &creds(&mesh, API, false), API).unwrap_err();
        // Same issuer name, other key: webpki reports a bad signature (or an unknown issuer).
        assert!(
            err.contains("server") && (err.contains("BadSignature") || err.contains("UnknownIssuer")),
            "{err}"
        );
    }

    #[test]
    fn an_expired_certificate_is_refused() {
        let ca = ca();
        let err = handshake(&creds(&ca, WEB, true), &creds(&ca, API, false), API).unwrap_err();
        assert!(err.contains("server") && err.contains("expired"), "{err}");
        let err = handshake(&creds(&ca, WEB, false), &creds(&ca, API, true), API).unwrap_err();
        assert!(err.contains("client") && err.to_lowercase().contains("expired"), "{err}");
    }

    #[test]
    fn a_client_without_a_certificate_is_refused() {
        let ca = ca();
        let server = creds(&ca, API, false);
        let ccfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots(&ca.pem).unwrap())
            .with_no_client_auth();
        let mut c = rustls::ClientConnection::new(Arc::new(ccfg), ServerName::try_from("x.invalid").unwrap())
            .unwrap();
        let mut s = rustls::ServerConnection::new(server_config(&server).unwrap()).unwrap();
        let mut failed = false;
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut &buf[..]).unwrap();
            if s.process_new_packets().is_err() {
                failed = true;
                break;
            }
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut &buf[..]).unwrap();
            let _ = c.process_new_packets();
        }
        assert!(failed, "the server accepted a client without a certificate");
    }
}
