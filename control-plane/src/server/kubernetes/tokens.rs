//! Proxies prove who they are with their pod's projected ServiceAccount token (audience
//! `weft`); the control plane asks the API server's TokenReview whether it is genuine,
//! requires `authenticated: true`, the audience, and a `system:serviceaccount:NS:SA`
//! user, and answers for that service account only. Answers are cached by the token's
//! hash for a short time, as every gRPC call of a proxy carries its token.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
};
use kube::{api::PostParams, Api, Client};
use sha2::{Digest, Sha256};
use tonic::Status;

use crate::server::identity::{Authenticator, Caller};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the control plane may not create TokenReviews, so it cannot check any proxy's token: grant its \
         service account `create` on tokenreviews.authentication.k8s.io (a ClusterRole bound to it; see \
         docs/kubernetes.md)"
    )]
    NotAllowed,
    #[error("cannot check the control plane's own permissions: {0}")]
    Check(kube::Error),
}

/// Fails start-up when the control plane may not create TokenReviews, rather than at the
/// first proxy's request.
pub async fn check_permission(client: &Client) -> Result<(), Error> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some("authentication.k8s.io".into()),
                resource: Some("tokenreviews".into()),
                verb: Some("create".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let answer = api.create(&PostParams::default(), &review).await.map_err(Error::Check)?;
    match answer.status.map(|s| s.allowed) {
        Some(true) => Ok(()),
        _ => Err(Error::NotAllowed),
    }
}

/// How long an answer is reused: a good token for a minute (a kubelet rotates them after
/// 80 % of an hour at the earliest), a refused one briefly.
const GOOD_FOR: Duration = Duration::from_secs(60);
const BAD_FOR: Duration = Duration::from_secs(2);
/// Cached answers at most; the cache is emptied when full.
const MAX_CACHED: usize = 10_000;

pub struct TokenReviews {
    client: Client,
    audience: String,
    trust_domain: String,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

/// An answer about a token (by its hash) and when it was made.
type Cached = (Instant, Result<Caller, Status>);

impl TokenReviews {
    pub fn new(client: Client, audience: String, trust_domain: String) -> TokenReviews {
        TokenReviews { client, audience, trust_domain, cache: Mutex::default() }
    }

    async fn review(&self, token: &str) -> Result<Caller, Status> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api.create(&PostParams::default(), &review).await.map_err(|e| {
            tracing::warn!("TokenReview failed: {e}");
            Status::unavailable(format!("cannot check the token with the Kubernetes API now: {e}"))
        })?;
        let status = answer.status.unwrap_or_default();
        let refused = |why: String| {
            tracing::info!("refused a token: {why}");
            Err(Status::unauthenticated(format!("token refused: {why}")))
        };
        if status.authenticated != Some(true) {
            return refused(status.error.unwrap_or_else(|| "not authenticated".into()));
        }
        if let Some(audiences) = &status.audiences {
            if !audiences.contains(&self.audience) {
                return refused(format!(
                    "not issued for audience {:?}; mount a projected token with it",
                    self.audience
                ));
            }
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((ns, sa)) = username.strip_prefix("system:serviceaccount:").and_then(|r| r.split_once(':'))
        else {
            return refused(format!("{username:?} is not a service account"));
        };
        let identity = format!("spiffe://{}/ns/{ns}/sa/{sa}", self.trust_domain)
            .parse()
            .map_err(|e| Status::unauthenticated(format!("token refused: {e}")))?;
        let pod = user
            .extra
            .as_ref()
            .and_then(|x| x.get("authentication.kubernetes.io/pod-name"))
            .and_then(|v| v.first())
            .cloned();
        Ok(Caller { identity, namespace: ns.to_string(), workload: pod.unwrap_or_else(|| sa.to_string()) })
    }
}

#[tonic::async_trait]
impl Authenticator for TokenReviews {
    async fn authenticate(&self, token: &str) -> Result<Caller, Status> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        if let Some((at, answer)) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            let ttl = if answer.is_ok() { GOOD_FOR } else { BAD_FOR };
            if now.duration_since(*at) < ttl {
                return answer.clone();
            }
        }
        let answer = self.review(token).await;
        // An API outage is not an answer about the token: it is not cached.
        if answer.as_ref().err().is_none_or(|s| s.code() != tonic::Code::Unavailable) {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
            cache.insert(key, (now, answer.clone()));
        }
        answer
    }
}
