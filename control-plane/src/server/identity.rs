//! The Identity gRPC service: authenticates a workload by its token and has the CA sign
//! its CSR for the identity that token proves.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tonic::{Request, Response, Status};
use weft_api::v1::{identity_server::Identity, CertifyRequest, CertifyResponse};

use crate::server::ca::{self, SpiffeId};

/// Who a token proves the caller is.
#[derive(Clone, Debug, PartialEq)]
pub struct Caller {
    pub identity: SpiffeId,
    /// `name:port` authorities and consumer routes are relative to it.
    pub namespace: String,
    /// Whose inbound policies apply: the workload (mesh file) or pod (Kubernetes).
    pub workload: String,
}

/// Turns a bearer token into the caller it proves; every gRPC call passes through it.
#[tonic::async_trait]
pub trait Authenticator: Send + Sync {
    async fn authenticate(&self, token: &str) -> Result<Caller, Status>;
}

/// Fixed tokens (tests).
#[derive(Default)]
pub struct StaticTokens(pub HashMap<String, Caller>);

#[tonic::async_trait]
impl Authenticator for StaticTokens {
    async fn authenticate(&self, token: &str) -> Result<Caller, Status> {
        self.0.get(token).cloned().ok_or_else(|| Status::unauthenticated("unknown token"))
    }
}

/// Local mode: the tokens of the mesh file as it is now, so a workload removed from the
/// file can no longer get certificates or answers.
pub struct MeshTokens(pub crate::server::source::State);

#[tonic::async_trait]
impl Authenticator for MeshTokens {
    async fn authenticate(&self, token: &str) -> Result<Caller, Status> {
        let mesh = self.0.borrow();
        let unknown =
            || Status::unauthenticated("unknown token: check the workload's token in the mesh file");
        let w = mesh.workloads.iter().find(|w| w.token == token).ok_or_else(unknown)?;
        let identity = mesh.identity_of(w).parse().map_err(|_| unknown())?;
        Ok(Caller { identity, namespace: w.namespace.clone(), workload: w.name.clone() })
    }
}

pub struct IdentityService {
    pub ca: ca::Shared,
    pub tokens: Arc<dyn Authenticator>,
    /// Lifetime of issued leaves.
    pub ttl: Duration,
}

/// The token from `authorization: Bearer <token>`.
pub fn bearer<T>(req: &Request<T>) -> Result<&str, Status> {
    req.metadata()
        .get(weft_api::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| Status::unauthenticated("missing token: send `authorization: Bearer <token>`"))
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(&self, req: Request<CertifyRequest>) -> Result<Response<CertifyResponse>, Status> {
        let identity = self.tokens.authenticate(bearer(&req)?).await?.identity;
        let ca = self.ca.borrow().clone();
        match ca.sign(&req.get_ref().csr_pem, &identity, self.ttl) {
            Ok(issued) => {
                tracing::info!(%identity, not_after = %issued.not_after, "issued certificate");
                Ok(Response::new(CertifyResponse {
                    cert_chain_pem: issued.cert_chain_pem,
                    trust_bundle_pem: issued.trust_bundle_pem,
                    not_after_unix: issued.not_after.unix_timestamp(),
                    identity: identity.to_string(),
                }))
            }
            Err(e @ ca::Error::WrongIdentity { .. }) => {
                tracing::warn!(%identity, "refused CSR: {e}");
                Err(Status::permission_denied(e.to_string()))
            }
            Err(e @ (ca::Error::WeakKey(_) | ca::Error::BadCsr(_))) => {
                tracing::warn!(%identity, "refused CSR: {e}");
                Err(Status::invalid_argument(e.to_string()))
            }
            Err(e) => {
                tracing::error!(%identity, "signing failed: {e}");
                Err(Status::internal(e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::ca::Ca;
    use rcgen::{CertificateParams, KeyPair, SanType};
    use weft_api::v1::{identity_client::IdentityClient, identity_server::IdentityServer};

    fn csr(san: &str) -> String {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(san.try_into().unwrap())];
        params.serialize_request(&KeyPair::generate().unwrap()).unwrap().pem().unwrap()
    }

    /// A real gRPC server on a real socket, and a real tonic client.
    async fn serve() -> IdentityClient<tonic::transport::Channel> {
        serve_with(ca::fixed(Ca::generate("weft.local").unwrap())).await
    }

    async fn serve_with(ca: ca::Shared) -> IdentityClient<tonic::transport::Channel> {
        let frontend: SpiffeId = "spiffe://weft.local/ns/shop/sa/frontend".parse().unwrap();
        let caller = Caller { identity: frontend, namespace: "shop".into(), workload: "frontend".into() };
        let tokens = StaticTokens([("frontend-token".to_string(), caller)].into_iter().collect());
        let svc = IdentityService { ca, tokens: Arc::new(tokens), ttl: Duration::from_secs(600) };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(IdentityServer::new(svc))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        IdentityClient::connect(format!("http://{addr}")).await.unwrap()
    }

    fn request(token: Option<&str>, csr_pem: String) -> Request<CertifyRequest> {
        let mut req = Request::new(CertifyRequest { csr_pem });
        if let Some(t) = token {
            req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        req
    }

    #[tokio::test]
    async fn certifies_the_identity_the_token_proves() {
        let mut client = serve().await;
        let me = "spiffe://weft.local/ns/shop/sa/frontend";
        let rsp = client.certify(request(Some("frontend-token"), csr(me))).await.unwrap().into_inner();
        assert_eq!(rsp.identity, me);
        assert!(rsp.cert_chain_pem.contains("BEGIN CERTIFICATE"));
        assert!(rsp.trust_bundle_pem.contains("BEGIN CERTIFICATE"));
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!((rsp.not_after_unix - now - 600).abs() <= 5);
    }

    #[tokio::test]
    async fn refuses_bad_tokens_and_other_identities() {
        let mut client = serve().await;
        let me = "spiffe://weft.local/ns/shop/sa/frontend";
        let status = client.certify(request(None, csr(me))).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        let status = client.certify(request(Some("stolen"), csr(me))).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        let other = "spiffe://weft.local/ns/shop/sa/payments";
        let status = client.certify(request(Some("frontend-token"), csr(other))).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        let status = client.certify(request(Some("frontend-token"), "garbage".into())).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn a_changed_ca_signs_from_the_next_request_on() {
        let old = Ca::generate("weft.local").unwrap();
        let old_bundle = old.trust_bundle_pem().to_string();
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(old));
        let mut client = serve_with(rx).await;
        let me = "spiffe://weft.local/ns/shop/sa/frontend";
        let first = client.certify(request(Some("frontend-token"), csr(me))).await.unwrap().into_inner();
        assert_eq!(first.trust_bundle_pem, old_bundle);
        let new = Ca::generate("weft.local").unwrap();
        let new_bundle = new.trust_bundle_pem().to_string();
        tx.send_replace(Arc::new(new));
        let next = client.certify(request(Some("frontend-token"), csr(me))).await.unwrap().into_inner();
        assert_eq!(next.trust_bundle_pem, new_bundle);
        assert_ne!(next.cert_chain_pem, first.cert_chain_pem);
    }
}
