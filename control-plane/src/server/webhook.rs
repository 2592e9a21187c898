//! The mutating admission webhook: `POST /inject` with an AdmissionReview (v1) of a Pod
//! being created, answered with the JSONPatch that meshes it (`crate::inject`), over
//! HTTPS. Its serving certificate is issued by the mesh's CA for the webhook Service's
//! DNS names and renewed at 70 % of its lifetime; the API server trusts it through the
//! webhook configuration's `caBundle`, which the control plane keeps set to the CA's
//! roots. A pod whose `weft.dev/*` settings are invalid is refused with the reason, so
//! the error shows where the user looks (`kubectl get events`, the ReplicaSet's status).

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use kube::core::{
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    DynamicObject,
};
use prometheus_client::metrics::gauge::Gauge;
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use serde_json::Value;

use super::ca::{self, Ca};
use crate::inject::{self, Outcome};

/// Lifetime of the serving certificate; renewed at 70 % of it.
const CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// An AdmissionReview larger than this is refused (a Pod is a few KiB).
const MAX_BODY: usize = 4 << 20;
/// Time a client has to finish the TLS handshake and send its request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections held at once at most: the API server's, a few at a time.
const MAX_CONNECTIONS: usize = 128;

/// What the webhook injects, and which namespaces asked for it.
pub struct Webhook {
    pub inject: inject::Config,
    /// Whether a namespace has `weft.dev/inject: enabled` (label or annotation).
    pub namespace_opted_in: Box<dyn Fn(&str) -> bool + Send + Sync>,
}

impl Webhook {
    /// The AdmissionReview answering `body` (an AdmissionReview request).
    pub fn review(&self, body: &[u8]) -> Result<Value, String> {
        let review: AdmissionReview<DynamicObject> =
            serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
        let req: AdmissionRequest<DynamicObject> =
            review.try_into().map_err(|e| format!("an AdmissionReview without a request: {e}"))?;
        let rsp = self.admit(&req);
        let mut review = serde_json::to_value(rsp.into_review()).map_err(|e| e.to_string())?;
        // The API types the patch as bytes, which Kubernetes writes and documents as a
        // base64 string; kube-rs writes an array of numbers. Send what the API documents.
        if let Some(Value::Array(bytes)) = review.pointer("/response/patch") {
            use base64::Engine;
            let bytes: Vec<u8> =
                bytes.iter().filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok())).collect();
            review["response"]["patch"] =
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
        Ok(review)
    }

    fn admit(&self, req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        let rsp = AdmissionResponse::from(req);
        let is_pod = req.kind.kind == "Pod" && req.kind.group.is_empty();
        let (true, Operation::Create, Some(object)) = (is_pod, &req.operation, &req.object) else {
            return rsp;
        };
        let Ok(before) = serde_json::to_value(object) else { return rsp };
        let namespace = req.namespace.clone().or_else(|| object.metadata.namespace.clone());
        let opted_in = namespace.as_deref().is_some_and(|ns| (self.namespace_opted_in)(ns));
        let mut after = before.clone();
        let name = object.metadata.name.clone().or_else(|| object.metadata.generate_name.clone());
        let what = format!("pod {}/{}", namespace.as_deref().unwrap_or(""), name.as_deref().unwrap_or(""));
        match inject::pod(&mut after, namespace.as_deref(), opted_in, &self.inject) {
            Ok(Outcome::Injected) => {
                tracing::info!("{what}: injected");
                match rsp.clone().with_patch(json_patch::diff(&before, &after)) {
                    Ok(patched) => patched,
                    Err(e) => rsp.deny(format!("weft could not make the patch: {e}")),
                }
            }
            Ok(Outcome::Skipped(why)) => {
                tracing::debug!("{what}: left alone ({why})");
                rsp
            }
            Err(e) => {
                tracing::info!("{what}: refused: {e}");
                rsp.deny(format!("weft cannot inject this pod: {e}"))
            }
        }
    }
}

/// The serving certificate, swapped on renewal.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

fn certified(ca: &Ca, names: &[String]) -> Result<(Arc<CertifiedKey>, time::OffsetDateTime), String> {
    let (issued, key_pem) = ca.serving(names, CERT_TTL).map_err(|e| e.to_string())?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(issued.cert_chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| e.to_string())?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| e.to_string())?;
    Ok((Arc::new(CertifiedKey::new(chain, signing)), issued.not_after))
}

/// Issues the webhook's certificate (an error when the CA cannot), then serves the
/// webhook on `listener` in a task of its own until the process ends.
pub fn start(
    listener: tokio::net::TcpListener,
    ca: ca::Shared,
    names: Vec<String>,
    hook: Arc<Webhook>,
    refused: super::listen::Refused,
    expiry: Gauge,
) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (cert, not_after) =
        certified(&ca.borrow(), &names).map_err(|e| anyhow::anyhow!("webhook certificate: {e}"))?;
    expiry.set(not_after.unix_timestamp());
    let current = Arc::new(Current(RwLock::new(cert)));
    tokio::spawn(renew(ca, names, current.clone(), not_after, expiry));
    let mut tls = rustls::ServerConfig::builder().with_no_client_auth().with_cert_resolver(current);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    tokio::spawn(serve(listener, acceptor, hook, refused));
    Ok(())
}

async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    hook: Arc<Webhook>,
    refused: super::listen::Refused,
) {
    let mut accepts = weft_api::accept::Acceptor::new("webhook");
    let cap = super::listen::Cap::new("webhook", MAX_CONNECTIONS, refused);
    loop {
        let (stream, peer) = accepts.accept(&listener).await;
        let Some(permit) = cap.admit() else { continue };
        let (acceptor, hook) = (acceptor.clone(), hook.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(%peer, "webhook TLS handshake failed: {e}"),
                Err(_) => return tracing::debug!(%peer, "webhook TLS handshake timed out"),
            };
            let svc = service_fn(move |req| {
                let hook = hook.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&hook, req).await) }
            });
            let mut server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            server.http1().timer(TokioTimer::new()).header_read_timeout(HANDSHAKE_TIMEOUT);
            server
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(10));
            let _ = server.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// Renews the certificate at 70 % of its life, and at once when the CA changes (the
/// webhook configuration's caBundle follows it); `expiry` shows when the one served ends
/// (`weft check` reads it).
async fn renew(
    mut ca: ca::Shared,
    names: Vec<String>,
    current: Arc<Current>,
    mut not_after: time::OffsetDateTime,
    expiry: Gauge,
) {
    loop {
        let left = (not_after - time::OffsetDateTime::now_utc()).max(time::Duration::ZERO);
        let wait =
            Duration::try_from(left * 0.7).unwrap_or(Duration::from_secs(60)).max(Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // A CA that never changes ends this branch for good.
            Ok(()) = ca.changed() => {}
        }
        let signer = ca.borrow_and_update().clone();
        match certified(&signer, &names) {
            Ok((cert, next)) => {
                *current.0.write().unwrap_or_else(|e| e.into_inner()) = cert;
                not_after = next;
                expiry.set(next.unix_timestamp());
                tracing::info!(not_after = %next, "webhook certificate renewed");
            }
            Err(e) => {
                tracing::error!("webhook certificate renewal failed, retrying at 70 % of the time left: {e}")
            }
        }
    }
}

async fn handle(hook: &Webhook, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        let mut rsp = Response::new(Full::new(Bytes::from(body)));
        *rsp.status_mut() = status;
        rsp.headers_mut()
            .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        rsp
    };
    if (req.method(), req.uri().path()) != (&Method::POST, "/inject") {
        return reply(StatusCode::NOT_FOUND, r#"{"error":"POST an AdmissionReview to /inject"}"#.into());
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return reply(StatusCode::BAD_REQUEST, serde_json::json!({"error": e.to_string()}).to_string())
        }
    };
    match hook.review(&body) {
        Ok(review) => reply(StatusCode::OK, review.to_string()),
        Err(e) => reply(StatusCode::BAD_REQUEST, serde_json::json!({"error": e}).to_string()),
    }
}
