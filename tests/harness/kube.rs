//! A fake Kubernetes API server for tests: no kube-apiserver can run on these machines
//! (../shared/RIG.md), so this loopback HTTP server speaks the parts of its API that
//! `weft control --source kubernetes` uses, as the real one speaks them: `list` with a
//! `resourceVersion`, `?watch=true&resourceVersion=N` streams of newline-delimited JSON
//! events (ADDED, MODIFIED, DELETED, BOOKMARK, and an ERROR with 410 Gone for a version
//! that has been compacted), `get` of Secrets and ConfigMaps, TokenReview and
//! SelfSubjectAccessReview, the proxy to a pod's port; and a kubeconfig that points at it. Its state survives a
//! [`FakeApi::restart`], as etcd's would.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Frame, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::watch};

/// One collection the server serves: its plural, API group/version and kind.
struct Kind {
    plural: &'static str,
    api_version: &'static str,
    kind: &'static str,
}

const KINDS: [Kind; 11] = [
    Kind { plural: "namespaces", api_version: "v1", kind: "Namespace" },
    Kind {
        plural: "mutatingwebhookconfigurations",
        api_version: "admissionregistration.k8s.io/v1",
        kind: "MutatingWebhookConfiguration",
    },
    Kind { plural: "services", api_version: "v1", kind: "Service" },
    Kind { plural: "pods", api_version: "v1", kind: "Pod" },
    Kind { plural: "secrets", api_version: "v1", kind: "Secret" },
    Kind { plural: "configmaps", api_version: "v1", kind: "ConfigMap" },
    Kind { plural: "endpointslices", api_version: "discovery.k8s.io/v1", kind: "EndpointSlice" },
    Kind { plural: "httproutes", api_version: "gateway.networking.k8s.io/v1", kind: "HTTPRoute" },
    Kind { plural: "grpcroutes", api_version: "gateway.networking.k8s.io/v1", kind: "GRPCRoute" },
    Kind { plural: "inboundpolicies", api_version: "policy.weft.dev/v1alpha1", kind: "InboundPolicy" },
    Kind { plural: "trafficpolicies", api_version: "policy.weft.dev/v1alpha1", kind: "TrafficPolicy" },
];

/// Kinds without a namespace.
fn cluster_scoped(kind: &Kind) -> bool {
    matches!(kind.kind, "Namespace" | "MutatingWebhookConfiguration")
}

fn kind_of(kind: &str) -> &'static Kind {
    KINDS.iter().find(|k| k.kind == kind).unwrap_or_else(|| panic!("the fake API server has no kind {kind}"))
}

/// A service account a token proves.
#[derive(Clone)]
struct Account {
    namespace: String,
    name: String,
    pod: Option<String>,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// plural → (namespace, name) → object.
    objects: HashMap<&'static str, BTreeMap<(String, String), Value>>,
    /// Every change: (resourceVersion, plural, event type, object).
    events: Vec<(u64, &'static str, &'static str, Value)>,
    /// Watches from an older version get 410 Gone (compacted history).
    expired_below: u64,
    tokens: HashMap<String, Account>,
    /// Whether SelfSubjectAccessReview allows creating TokenReviews.
    may_review: bool,
    /// Collections that answer 404 (a CRD that is not installed).
    missing: Vec<&'static str>,
    /// Requests seen, by path (for tests that count lists and watches).
    requests: Vec<String>,
    /// The minor version `/version` reports (1.x).
    minor: u32,
}

pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// Wakes watches on every change (the new resourceVersion), and ends them on a bump
    /// of the epoch.
    changed: watch::Sender<(u64, u64)>,
    rt: Option<tokio::runtime::Runtime>,
    dir: PathBuf,
    /// The network namespace it serves in (`None`: this process's own).
    netns: Option<String>,
}

impl FakeApi {
    pub fn start() -> FakeApi {
        Self::start_at(None, ([127, 0, 0, 1], 0).into())
    }

    /// Serves at `addr` inside the network namespace `netns` (a pod network's node, so
    /// that a control plane there reaches it).
    pub fn start_in(netns: &str, addr: SocketAddr) -> FakeApi {
        Self::start_at(Some(netns.to_string()), addr)
    }

    fn start_at(netns: Option<String>, addr: SocketAddr) -> FakeApi {
        let n = DIRS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("weft-fakeapi-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let state = Arc::new(Mutex::new(State { may_review: true, rv: 1, minor: 33, ..State::default() }));
        let (changed, _) = watch::channel((1, 0));
        let mut api = FakeApi { addr, state, changed, rt: None, dir, netns };
        api.serve();
        api
    }

    /// A runtime and a listener made on a thread that entered the namespace: sockets and
    /// threads belong to the namespace of the thread that makes them.
    fn runtime(&self) -> (tokio::runtime::Runtime, std::net::TcpListener) {
        let (netns, addr) = (self.netns.clone(), self.addr);
        std::thread::spawn(move || {
            if let Some(ns) = netns {
                let file = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            }
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            // Tokio's bind sets SO_REUSEADDR, so a restart can take the address again at once.
            let listener =
                crate::eventually(std::time::Duration::from_secs(5), "the API server's address", || {
                    rt.block_on(TcpListener::bind(addr)).ok()
                });
            let listener = listener.into_std().unwrap();
            (rt, listener)
        })
        .join()
        .unwrap()
    }

    fn serve(&mut self) {
        let (rt, listener) = self.runtime();
        let listener = {
            let _guard = rt.enter();
            TcpListener::from_std(listener).unwrap()
        };
        self.addr = listener.local_addr().unwrap();
        let (state, changed) = (self.state.clone(), self.changed.clone());
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (state, changed) = (state.clone(), changed.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(req, state.clone(), changed.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        self.rt = Some(rt);
    }

    /// Stops the server, cutting every connection and watch; its state is kept.
    pub fn stop(&mut self) {
        if let Some(rt) = self.rt.take() {
            // Waits for the workers to drop every task, the listener included.
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
        }
    }

    /// Starts it again on the same address.
    pub fn restart(&mut self) {
        self.stop();
        self.serve();
    }

    /// A kubeconfig that points at this server.
    pub fn kubeconfig(&self) -> PathBuf {
        let path = self.dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             users:\n- name: weft\n  user:\n    token: control-plane-token\ncontexts:\n- name: fake\n  context:\n    \
             cluster: fake\n    user: weft\ncurrent-context: fake\n",
            self.addr
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The CA's Secret `weft/weft-identity` with a new root (tls.crt, tls.key), as an
    /// installer makes it; returns the root's PEM.
    pub fn identity_secret(&self) -> String {
        self.rotate_identity_secret("")
    }

    /// The Secret `weft/weft-identity` with a new root, and `ca.crt` holding the roots
    /// still trusted (`trusted`, PEM) and the new one: the first step of a rotation.
    /// Returns the new root's PEM.
    pub fn rotate_identity_secret(&self, trusted: &str) -> String {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "weft test root");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        let mut data = json!({"tls.crt": cert.pem(), "tls.key": key.serialize_pem()});
        if !trusted.is_empty() {
            data["ca.crt"] = json!(format!("{trusted}{}", cert.pem()));
        }
        self.apply(json!({
            "kind": "Secret",
            "metadata": {"name": "weft-identity", "namespace": "weft"},
            "type": "kubernetes.io/tls",
            "stringData": data,
        }));
        cert.pem()
    }

    /// Adds or replaces an object (its `kind` says which collection), as `kubectl apply`.
    /// A Secret's `stringData` is stored as `data` (base64), as the API server does.
    pub fn apply(&self, mut object: Value) {
        let kind = kind_of(object["kind"].as_str().expect("objects need a kind"));
        if let Some(Value::Object(strings)) = object.as_object_mut().and_then(|o| o.remove("stringData")) {
            use base64::Engine;
            let data: serde_json::Map<String, Value> = strings
                .into_iter()
                .map(|(k, v)| {
                    (k, json!(base64::engine::general_purpose::STANDARD.encode(v.as_str().unwrap_or(""))))
                })
                .collect();
            object["data"] = Value::Object(data);
        }
        object["apiVersion"] = json!(kind.api_version);
        let ns = match cluster_scoped(kind) {
            true => String::new(),
            false => object["metadata"]["namespace"].as_str().unwrap_or("default").to_string(),
        };
        let name = object["metadata"]["name"].as_str().expect("objects need metadata.name").to_string();
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        if !cluster_scoped(kind) {
            object["metadata"]["namespace"] = json!(ns);
        }
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object["metadata"]["uid"] = json!(format!("uid-{}-{ns}-{name}", kind.plural));
        if object["metadata"]["creationTimestamp"].is_null() {
            object["metadata"]["creationTimestamp"] =
                json!(format!("2026-01-01T00:{:02}:{:02}Z", rv / 60 % 60, rv % 60));
        }
        let objects = st.objects.entry(kind.plural).or_default();
        let kind_of_event =
            if objects.contains_key(&(ns.clone(), name.clone())) { "MODIFIED" } else { "ADDED" };
        objects.insert((ns, name), object.clone());
        st.events.push((rv, kind.plural, kind_of_event, object));
        drop(st);
        self.changed.send_modify(|(v, _)| *v = rv);
    }

    pub fn delete(&self, kind: &str, ns: &str, name: &str) {
        let kind = kind_of(kind);
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let Some(mut object) = st.objects.entry(kind.plural).or_default().remove(&(ns.into(), name.into()))
        else {
            return;
        };
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.events.push((rv, kind.plural, "DELETED", object));
        drop(st);
        self.changed.send_modify(|(v, _)| *v = rv);
    }

    /// Compacts the history and ends every watch: watchers must relist (410 Gone).
    pub fn expire_watches(&self) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        st.expired_below = st.rv;
        let rv = st.rv;
        drop(st);
        self.changed.send_modify(|(v, epoch)| {
            *v = rv;
            *epoch += 1;
        });
    }

    /// A token that TokenReview accepts for `namespace/service_account`, bound to `pod`.
    pub fn token(&self, token: &str, namespace: &str, service_account: &str, pod: Option<&str>) {
        let account = Account {
            namespace: namespace.into(),
            name: service_account.into(),
            pod: pod.map(str::to_string),
        };
        self.state.lock().unwrap().tokens.insert(token.into(), account);
    }

    /// TokenReview no longer accepts `token` (it expired or was rotated away).
    pub fn revoke(&self, token: &str) {
        self.state.lock().unwrap().tokens.remove(token);
    }

    /// The Kubernetes version `/version` reports: 1.`minor`.
    pub fn version(&self, minor: u32) {
        self.state.lock().unwrap().minor = minor;
    }

    /// Whether the control plane may create TokenReviews (its RBAC).
    pub fn allow_token_reviews(&self, allowed: bool) {
        self.state.lock().unwrap().may_review = allowed;
    }

    /// Makes a collection answer 404, as when its CRD is not installed.
    pub fn without(&self, plural: &'static str) {
        self.state.lock().unwrap().missing.push(plural);
    }

    /// An object as the server holds it (`ns` empty for cluster-scoped kinds).
    pub fn get(&self, kind: &str, ns: &str, name: &str) -> Option<Value> {
        let kind = kind_of(kind);
        self.state.lock().unwrap().objects.get(kind.plural)?.get(&(ns.into(), name.into())).cloned()
    }

    /// Requests seen whose path and query contain `part`.
    pub fn requests(&self, part: &str) -> usize {
        self.state.lock().unwrap().requests.iter().filter(|r| r.contains(part)).count()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static DIRS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

type Body = BoxBody<Bytes, Infallible>;

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut rsp = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *rsp.status_mut() = status;
    rsp.headers_mut().insert("content-type", "application/json".parse().unwrap());
    rsp
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
    changed: watch::Sender<(u64, u64)>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let query: HashMap<String, String> = crate::query_params(req.uri());
    state.lock().unwrap().requests.push(req.uri().to_string());
    let method = req.method().clone();
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if path == "/version" {
        let minor = state.lock().unwrap().minor;
        return Ok(json_response(
            StatusCode::OK,
            &json!({"major": "1", "minor": minor.to_string(), "gitVersion": format!("v1.{minor}.0"),
                    "gitCommit": "fake", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                    "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"}),
        ));
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // /api/v1/... or /apis/<group>/<version>/...
    let rest = match parts.as_slice() {
        ["api", "v1", rest @ ..] => rest,
        ["apis", _, _, rest @ ..] => rest,
        _ => &[][..],
    };
    if let ["namespaces", ns, "pods", target, "proxy", path @ ..] = rest {
        return Ok(pod_proxy(&state, ns, target, &path.join("/"), &method, &body).await);
    }
    if method == Method::POST {
        return Ok(match rest {
            ["tokenreviews"] => token_review(&state, &body),
            ["selfsubjectaccessreviews"] => {
                let allowed = state.lock().unwrap().may_review;
                let mut answer = body.clone();
                answer["status"] = json!({"allowed": allowed});
                json_response(StatusCode::CREATED, &answer)
            }
            _ => json_response(
                StatusCode::NOT_FOUND,
                &status(404, "NotFound", "the server could not find the requested resource"),
            ),
        });
    }
    if let (["namespaces", ns, plural, name, "status"], true) = (rest, method == Method::PATCH) {
        let Some(kind) = KINDS.iter().find(|k| k.plural == *plural) else {
            return Ok(json_response(StatusCode::NOT_FOUND, &status(404, "NotFound", "no such resource")));
        };
        return Ok(patch(&state, &changed, kind, (ns, name), Patch::Status, body));
    }
    let (plural, ns, name) = match rest {
        [plural] => (*plural, None, None),
        ["namespaces", ns, plural] => (*plural, Some(*ns), None),
        ["namespaces", ns, plural, name] => (*plural, Some(*ns), Some(*name)),
        [plural, name] => (*plural, Some(""), Some(*name)),
        _ => ("", None, None),
    };
    let kind = KINDS.iter().find(|k| k.plural == plural);
    let missing = state.lock().unwrap().missing.contains(&plural);
    let Some(kind) = kind.filter(|_| !missing) else {
        return Ok(json_response(
            StatusCode::NOT_FOUND,
            &status(404, "NotFound", "the server could not find the requested resource"),
        ));
    };
    if let (Some(name), true) = (name, method == Method::PATCH) {
        return Ok(patch(&state, &changed, kind, (ns.unwrap_or(""), name), Patch::Json, body));
    }
    if let Some(name) = name {
        let st = state.lock().unwrap();
        let found = st.objects.get(kind.plural).and_then(|o| o.get(&(ns.unwrap_or("").into(), name.into())));
        return Ok(match found {
            Some(o) => json_response(StatusCode::OK, o),
            None => json_response(
                StatusCode::NOT_FOUND,
                &status(404, "NotFound", &format!("{} \"{name}\" not found", kind.plural)),
            ),
        });
    }
    if query.get("watch").map(String::as_str) == Some("true")
        || query.get("watch").map(String::as_str) == Some("1")
    {
        let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
        return Ok(watch_stream(kind, ns.map(str::to_string), from, bookmarks, state, changed.subscribe()));
    }
    let st = state.lock().unwrap();
    let items: Vec<&Value> = st
        .objects
        .get(kind.plural)
        .map(|o| o.iter().filter(|((n, _), _)| ns.is_none_or(|ns| ns == n)).map(|(_, v)| v).collect())
        .unwrap_or_default();
    let list = json!({
        "apiVersion": kind.api_version, "kind": format!("{}List", kind.kind),
        "metadata": {"resourceVersion": st.rv.to_string()}, "items": items,
    });
    Ok(json_response(StatusCode::OK, &list))
}

/// The API server's proxy to a pod's port (`pods/[https:]NAME[:PORT]/proxy/PATH`), as
/// `weft check` uses it to reach the control plane's replicas: to the pod's IP, and for
/// `https:` without checking the pod's certificate, as the real API server does. Sent
/// with curl; its answer's status and body are passed back.
async fn pod_proxy(
    state: &Arc<Mutex<State>>,
    ns: &str,
    target: &str,
    path: &str,
    method: &Method,
    body: &Value,
) -> Response<Body> {
    let (scheme, rest) = match target.split_once(':') {
        Some((s @ ("http" | "https"), rest)) => (s, rest),
        _ => ("http", target),
    };
    let (name, port) = rest.split_once(':').unwrap_or((rest, "80"));
    let ip = {
        let st = state.lock().unwrap();
        let pod = st.objects.get("pods").and_then(|o| o.get(&(ns.to_string(), name.to_string())));
        pod.and_then(|p| p["status"]["podIP"].as_str().map(str::to_string))
    };
    let Some(ip) = ip else {
        return json_response(
            StatusCode::NOT_FOUND,
            &status(404, "NotFound", &format!("pods \"{name}\" not found")),
        );
    };
    let url = format!("{scheme}://{ip}:{port}/{path}");
    let mut curl = tokio::process::Command::new("curl");
    curl.args(["-sk", "--max-time", "5", "-w", "\n%{http_code}", "-X", method.as_str(), &url]);
    if !body.is_null() {
        curl.args(["-H", "content-type: application/json", "--data-binary", &body.to_string()]);
    }
    let out =
        curl.output().await.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let (text, code) = out.rsplit_once('\n').unwrap_or(("", "000"));
    match code.parse::<u16>().ok().filter(|c| *c >= 100).and_then(|c| StatusCode::from_u16(c).ok()) {
        Some(code) => {
            let mut rsp = Response::new(Full::new(Bytes::from(text.to_string())).boxed());
            *rsp.status_mut() = code;
            rsp
        }
        // What the real one says when the pod does not answer.
        None => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &status(
                503,
                "ServiceUnavailable",
                &format!("error trying to reach service: dial tcp {ip}:{port}: connect: connection refused"),
            ),
        ),
    }
}

/// How a PATCH changes an object.
#[derive(Clone, Copy, PartialEq)]
enum Patch {
    /// A JSON patch (RFC 6902) of the object, as `kubectl patch --type json` sends it.
    Json,
    /// A merge patch (RFC 7386) of its `status` subresource, as controllers write it:
    /// only `status` changes, and a `metadata.resourceVersion` in the patch is a
    /// precondition (409 Conflict when the object has moved on), as the API server does.
    Status,
}

/// One stored object changed by `body`, as a new resourceVersion and a MODIFIED event.
fn patch(
    state: &Arc<Mutex<State>>,
    changed: &watch::Sender<(u64, u64)>,
    kind: &'static Kind,
    (ns, name): (&str, &str),
    how: Patch,
    body: Value,
) -> Response<Body> {
    let mut st = state.lock().unwrap();
    let key = (ns.to_string(), name.to_string());
    let Some(mut object) = st.objects.get(kind.plural).and_then(|o| o.get(&key)).cloned() else {
        return json_response(StatusCode::NOT_FOUND, &status(404, "NotFound", &format!("{name} not found")));
    };
    let refused =
        |code: StatusCode, reason: &str, msg: &str| json_response(code, &status(code.as_u16(), reason, msg));
    match how {
        Patch::Json => {
            let Ok(ops) = serde_json::from_value::<json_patch::Patch>(body) else {
                return refused(StatusCode::BAD_REQUEST, "BadRequest", "not a JSON patch");
            };
            if let Err(e) = json_patch::patch(&mut object, &ops) {
                return refused(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &e.to_string());
            }
        }
        Patch::Status => {
            let wanted = &body["metadata"]["resourceVersion"];
            if !wanted.is_null() && *wanted != object["metadata"]["resourceVersion"] {
                let msg = format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified",
                    kind.plural
                );
                return refused(StatusCode::CONFLICT, "Conflict", &msg);
            }
            if object.get("status").is_none() {
                object["status"] = json!({});
            }
            json_patch::merge(&mut object["status"], &body["status"]);
        }
    }
    st.rv += 1;
    let rv = st.rv;
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    st.objects.entry(kind.plural).or_default().insert(key, object.clone());
    st.events.push((rv, kind.plural, "MODIFIED", object.clone()));
    drop(st);
    changed.send_modify(|(v, _)| *v = rv);
    json_response(StatusCode::OK, &object)
}

fn token_review(state: &Arc<Mutex<State>>, body: &Value) -> Response<Body> {
    let token = body["spec"]["token"].as_str().unwrap_or("");
    let audiences = body["spec"]["audiences"].clone();
    let account = state.lock().unwrap().tokens.get(token).cloned();
    let mut answer = body.clone();
    answer["status"] = match account {
        Some(a) => {
            let mut extra = json!({});
            if let Some(pod) = &a.pod {
                extra["authentication.kubernetes.io/pod-name"] = json!([pod]);
            }
            json!({
                "authenticated": true,
                "user": {"username": format!("system:serviceaccount:{}:{}", a.namespace, a.name),
                         "groups": ["system:serviceaccounts"], "extra": extra},
                "audiences": audiences,
            })
        }
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    json_response(StatusCode::CREATED, &answer)
}

/// A watch: the events after `from`, then each new one as it happens, with a bookmark
/// at the start; an ERROR 410 for a compacted version; ended on an epoch bump.
fn watch_stream(
    kind: &'static Kind,
    ns: Option<String>,
    from: u64,
    bookmarks: bool,
    state: Arc<Mutex<State>>,
    mut changed: watch::Receiver<(u64, u64)>,
) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    let line = |v: Value| Ok(Frame::data(Bytes::from(format!("{v}\n"))));
    tokio::spawn(async move {
        let epoch = changed.borrow_and_update().1;
        let expired = state.lock().unwrap().expired_below;
        if from < expired {
            let gone = status(410, "Expired", &format!("too old resource version: {from} ({expired})"));
            let _ = tx.send(line(json!({"type": "ERROR", "object": gone}))).await;
            return;
        }
        let mut sent = from;
        if bookmarks {
            let rv = state.lock().unwrap().rv;
            let mark = json!({"apiVersion": kind.api_version, "kind": kind.kind, "metadata": {"resourceVersion": rv.to_string()}});
            let _ = tx.send(line(json!({"type": "BOOKMARK", "object": mark}))).await;
        }
        loop {
            let batch: Vec<(u64, Value)> = {
                let st = state.lock().unwrap();
                st.events
                    .iter()
                    .filter(|(rv, plural, _, o)| {
                        *rv > sent
                            && *plural == kind.plural
                            && ns.as_deref().is_none_or(|ns| o["metadata"]["namespace"] == ns)
                    })
                    .map(|(rv, _, t, o)| (*rv, json!({"type": t, "object": o})))
                    .collect()
            };
            for (rv, event) in batch {
                if tx.send(line(event)).await.is_err() {
                    return;
                }
                sent = rv;
            }
            if changed.changed().await.is_err() || changed.borrow_and_update().1 != epoch {
                return;
            }
        }
    });
    let stream = tokio_stream_from(rx);
    let mut rsp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    rsp.headers_mut().insert("content-type", "application/json".parse().unwrap());
    rsp
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
