//! The real `weft control` binary with a real mesh file and real gRPC clients: discovery
//! pushes changes within a second, a bad file change is refused while the last good state
//! keeps serving, and the CA signs only the identity a token proves.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use tonic::Request;
use weft_api::v1::{
    discovery_client::DiscoveryClient, identity_client::IdentityClient, CertifyRequest, WatchRequest,
};
use weft_e2e::{
    bin,
    control::Control,
    free_addr, http_get,
    mesh::{token, MeshFile, Service},
    metric_value,
};

/// `web`, and `api-v1` (service account `api`) as the endpoint of `api:80` at `api`.
fn mesh(api: &str) -> String {
    MeshFile::new()
        .workload("web")
        .workload_as("api-v1", "api")
        .service(Service::new("api", 80).meshed(api, "api-v1"))
        .yaml()
}

fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn discovery_pushes_changes_and_survives_a_bad_file() {
    let c = Control::start(&mesh("127.0.0.1:9001"), &[]);
    rt().block_on(async {
        let mut client = DiscoveryClient::connect(format!("http://{}", c.grpc)).await.unwrap();
        let req = authed(WatchRequest { authority: "api:80".into() }, &token("web"));
        let mut stream = client.watch(req).await.unwrap().into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert!(first.known);
        assert_eq!(first.endpoints[0].address, "127.0.0.1:9001");
        assert_eq!(first.endpoints[0].identity, "spiffe://weft.local/ns/default/sa/api");

        // A broken edit: refused, nothing pushed, the metric says so.
        std::fs::write(&c.mesh, "workloads: [broken").unwrap();
        let none = tokio::time::timeout(Duration::from_millis(800), stream.message()).await;
        assert!(none.is_err(), "a refused file pushed an update");
        let m = http_get(c.admin, "/metrics").unwrap().1;
        assert_eq!(metric_value(&m, "weft_control_mesh_file_valid"), 0.0, "{m}");

        // A good edit reaches the watcher within a second.
        let start = Instant::now();
        std::fs::write(&c.mesh, mesh("127.0.0.1:9002")).unwrap();
        let next =
            tokio::time::timeout(Duration::from_secs(1), stream.message()).await.unwrap().unwrap().unwrap();
        eprintln!("discovery: file change reached the watcher in {:?}", start.elapsed());
        assert_eq!(next.endpoints[0].address, "127.0.0.1:9002");
        let m = http_get(c.admin, "/metrics").unwrap().1;
        assert_eq!(metric_value(&m, "weft_control_mesh_file_valid"), 1.0);

        // Unknown callers get nothing.
        let status =
            client.watch(authed(WatchRequest { authority: "api:80".into() }, "nope")).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    });
}

#[test]
fn the_ca_signs_only_the_tokens_identity() {
    let c = Control::start(&mesh("127.0.0.1:9001"), &[]);
    let csr = |san: &str| {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(san.try_into().unwrap())];
        params.serialize_request(&rcgen::KeyPair::generate().unwrap()).unwrap().pem().unwrap()
    };
    rt().block_on(async {
        let mut client = IdentityClient::connect(format!("http://{}", c.grpc)).await.unwrap();
        let api = "spiffe://weft.local/ns/default/sa/api";
        let ok =
            client.certify(authed(CertifyRequest { csr_pem: csr(api) }, &token("api-v1"))).await.unwrap();
        assert_eq!(ok.get_ref().identity, api);
        let web = "spiffe://weft.local/ns/default/sa/web";
        let denied = client.certify(authed(CertifyRequest { csr_pem: csr(web) }, &token("api-v1"))).await;
        assert_eq!(denied.unwrap_err().code(), tonic::Code::PermissionDenied);
    });
}

#[test]
fn a_bad_mesh_file_stops_startup_with_its_line() {
    let dir = std::env::temp_dir().join(format!("weft-control-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mesh = dir.join("mesh.yaml");
    std::fs::write(&mesh, "workloads:\n  - name: a\n    tokn: x\n").unwrap();
    let out = weft_e2e::run(Command::new(bin("weft")).args(["control", "--mesh"]).arg(&mesh).args([
        "--grpc-addr",
        &free_addr().to_string(),
        "--admin-addr",
        &free_addr().to_string(),
    ]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3") && err.contains("tokn"), "{err}");
}
