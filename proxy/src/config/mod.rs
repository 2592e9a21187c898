//! Every setting of weft-proxy, read from the environment in one place.
//!
//! Names are `WEFT_*`; docs/config.md documents each one. Parsing goes through the
//! [`Env`] trait so tests hand in a map instead of mutating the process environment.
//! A bad value fails startup with an error naming the variable and what it expects.

mod env;
mod otel;

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use ipnet::IpNet;

use env::{duration, err, flag, list, parse, parse_opt, ports, HostPorts};
pub use env::{parse_duration, Env, Error, ProcessEnv};
use otel::trace_config;
pub use otel::*;

// === names ===

// Set by `weft up` and the injector too, so named where both see them.
pub use weft_api::env::{
    ACCESS_LOG, ADMIN_ADDR, APP_ADDR, CONTROL_ADDR, DEFAULT_INBOUND_POLICY, IDENTITY, INBOUND_ADDR,
    INBOUND_PORTS, INBOUND_PROBES, INIT_SKIP_INBOUND_PORTS, INIT_SKIP_OUTBOUND_PORTS, LOG, OPAQUE_PORTS,
    OUTBOUND_ADDR, PROXY_UID, TOKEN, TOKEN_FILE, WORKLOAD,
};
pub const DETECT_TIMEOUT: &str = "WEFT_DETECT_TIMEOUT";
pub const MESH_NETWORKS: &str = "WEFT_MESH_NETWORKS";
pub const CONNECT_TIMEOUT: &str = "WEFT_CONNECT_TIMEOUT";
pub const TCP_IDLE_TIMEOUT: &str = "WEFT_TCP_IDLE_TIMEOUT";
pub const QUEUE_TIMEOUT: &str = "WEFT_QUEUE_TIMEOUT";
pub const MAX_HEADER_BYTES: &str = "WEFT_MAX_HEADER_BYTES";
pub const HEADER_READ_TIMEOUT: &str = "WEFT_HEADER_READ_TIMEOUT";
pub const KEEPALIVE_IDLE_TIMEOUT: &str = "WEFT_KEEPALIVE_IDLE_TIMEOUT";
pub const POOL_IDLE_TIMEOUT: &str = "WEFT_POOL_IDLE_TIMEOUT";
pub const POOL_MAX_IDLE: &str = "WEFT_POOL_MAX_IDLE_PER_HOST";
pub const H2_MAX_CONCURRENT_STREAMS: &str = "WEFT_H2_MAX_CONCURRENT_STREAMS";
pub const DRAIN_GRACE: &str = "WEFT_DRAIN_GRACE";
pub const ADMIN_MAX_CONNECTIONS: &str = "WEFT_ADMIN_MAX_CONNECTIONS";
pub const WATCH_IDLE_TIMEOUT: &str = "WEFT_WATCH_IDLE_TIMEOUT";
pub const MAX_CONNECTIONS: &str = "WEFT_MAX_CONNECTIONS";
pub const MAX_WATCHES: &str = "WEFT_MAX_WATCHES";
pub const LOG_FORMAT: &str = "WEFT_LOG_FORMAT";
pub const WORKER_THREADS: &str = "WEFT_WORKER_THREADS";

/// Ports whose protocols are known to be server-speaks-first or otherwise not worth
/// detecting (SMTP, MySQL, Postgres, Redis, Memcached, …): the same set Linkerd ships.
const DEFAULT_OPAQUE_PORTS: &str = "25,587,3306,4444,5432,6379,9300,11211";

/// Settings of the running proxy.
#[derive(Clone, Debug)]
pub struct Config {
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Admin connections open at once at most; more are closed as they arrive, so probes
    /// and scrapes flooding in cannot take the descriptors the data path needs.
    pub admin_max_connections: usize,
    /// Inbound connections open at once at most, and outbound as many. The default
    /// leaves the admin port and the control plane a reserve of the process's
    /// descriptors: a quarter each of what remains (a proxied connection holds two).
    pub max_connections: usize,
    /// Inbound destination for connections that were not redirected (explicit mode).
    pub app_addr: Option<SocketAddr>,
    /// The control plane; `None` runs standalone.
    pub control: Option<ControlConfig>,
    /// How long to wait for a client's first bytes before treating the connection as
    /// opaque TCP (server-speaks-first protocols must not stall).
    pub detect_timeout: Duration,
    pub opaque_ports: BTreeSet<u16>,
    /// The kubelet's probes of the app (`WEFT_INBOUND_PROBES`, set by the injector from
    /// the pod spec): plaintext GET/HEAD of exactly these (port, path) pairs (and gRPC
    /// health checks where listed) reach the app whatever the port's policy, as the
    /// kubelet has no mesh identity and an app that is never ready is an outage.
    pub inbound_probes: BTreeSet<(u16, String)>,
    /// Networks whose pods run a weft-proxy inbound: HTTP/1 to them is carried over
    /// HTTP/2 between the proxies and restored by the peer.
    pub mesh_networks: Vec<IpNet>,
    pub connect_timeout: Duration,
    pub tcp_idle_timeout: Duration,
    /// How long a request to a service with no endpoints waits for one before it fails
    /// with 503 `no-endpoints`.
    pub queue_timeout: Duration,
    pub http: HttpConfig,
    pub drain_grace: Duration,
    pub log: LogConfig,
    pub worker_threads: usize,
    /// The workload this proxy serves (`WEFT_WORKLOAD`): its spans' `service.name` and
    /// what peers see as `peer_workload`.
    pub workload: String,
    /// Span export; `None` when no OTLP endpoint is configured.
    pub tracing: Option<TraceConfig>,
}

/// How the proxy reaches the control plane and proves who it is.
#[derive(Clone, Debug)]
pub struct ControlConfig {
    /// `host:port` of `weft control`'s gRPC port; several for several replicas (calls
    /// are balanced over them, and one that goes away leaves its share to the others).
    pub addrs: Vec<String>,
    /// The SPIFFE ID this proxy asks a certificate for.
    pub identity: String,
    pub token: TokenSource,
    /// The policy of an app port the control plane has not answered for.
    pub default_inbound_policy: DefaultPolicy,
    /// The app's ports (`WEFT_INBOUND_PORTS`): the proxy is ready only once the control
    /// plane has answered for each.
    pub inbound_ports: BTreeSet<u16>,
    /// Discovery and route watches (one per authority clients use): closed when unused
    /// for `idle` (`WEFT_WATCH_IDLE_TIMEOUT`), at most `max` (`WEFT_MAX_WATCHES`).
    pub watches: WatchLimits,
}

/// Descriptors kept back from the data path: the admin port, the control plane's
/// channel, DNS, logs.
const FD_RESERVE: usize = 128;

/// A quarter of the descriptors left after the reserve (two directions, two descriptors
/// per proxied connection), from the process's soft limit; at least 64.
fn default_max_connections() -> usize {
    (weft_api::accept::open_files_limit().saturating_sub(FD_RESERVE) / 4).max(64)
}

/// When the proxy closes the control-plane watches clients' requests opened.
#[derive(Clone, Copy, Debug)]
pub struct WatchLimits {
    /// Unused this long, a watch is closed.
    pub idle: Duration,
    /// At most this many; beyond, the least recently used is closed.
    pub max: usize,
}

/// `WEFT_DEFAULT_INBOUND_POLICY`: what an inbound port gets before (or without) the
/// control plane's answer. Fail closed: `deny` unless said otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultPolicy {
    /// Nobody: plaintext and mesh clients are refused.
    Deny,
    /// Mesh clients (any identity), no plaintext.
    Strict,
    /// Anyone.
    Permissive,
}

/// Where the workload token comes from. A file is re-read for every request, because
/// Kubernetes rotates projected ServiceAccount tokens.
#[derive(Clone)]
pub enum TokenSource {
    Value(String),
    File(std::path::PathBuf),
}

impl std::fmt::Debug for TokenSource {
    /// Never prints the token itself: the configuration is logged at startup.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Value(_) => write!(f, "{TOKEN}=<redacted>"),
            TokenSource::File(p) => write!(f, "{TOKEN_FILE}={}", p.display()),
        }
    }
}

impl TokenSource {
    pub fn read(&self) -> std::io::Result<String> {
        match self {
            TokenSource::Value(v) => Ok(v.clone()),
            TokenSource::File(p) => Ok(std::fs::read_to_string(p)?.trim().to_string()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Largest request head (request line plus headers) accepted from a client.
    pub max_header_bytes: usize,
    /// Time a client has to send a complete request head, from its first byte (or, for
    /// a new connection, from the connection).
    pub header_read_timeout: Duration,
    /// Time an HTTP/1 connection may stay idle between requests.
    pub keepalive_idle_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    pub h2_max_concurrent_streams: u32,
}

#[derive(Clone, Debug)]
pub struct LogConfig {
    /// A `tracing` filter directive, e.g. `info` or `weft_proxy=debug`.
    pub filter: String,
    pub json: bool,
    pub access_log: bool,
}

/// Settings of `weft-proxy init`, the iptables installer.
#[derive(Clone, Debug)]
pub struct InitConfig {
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub admin_port: u16,
    pub proxy_uid: u32,
    pub skip_inbound_ports: BTreeSet<u16>,
    pub skip_outbound_ports: BTreeSet<u16>,
}

impl Config {
    pub fn from_env(env: &dyn Env) -> Result<Self, Error> {
        Ok(Config {
            inbound_addr: parse(env, INBOUND_ADDR, "0.0.0.0:4143", "an address like 0.0.0.0:4143")?,
            outbound_addr: parse(env, OUTBOUND_ADDR, "127.0.0.1:4140", "an address like 127.0.0.1:4140")?,
            admin_addr: parse(env, ADMIN_ADDR, "0.0.0.0:4191", "an address like 0.0.0.0:4191")?,
            admin_max_connections: parse(env, ADMIN_MAX_CONNECTIONS, "32", "a count like 32")?,
            max_connections: parse(
                env,
                MAX_CONNECTIONS,
                &default_max_connections().to_string(),
                "a count like 10000",
            )?,
            app_addr: parse_opt(env, APP_ADDR, "an address like 127.0.0.1:8080")?,
            control: control(env)?,
            detect_timeout: duration(env, DETECT_TIMEOUT, "100ms")?,
            opaque_ports: ports(env, OPAQUE_PORTS, DEFAULT_OPAQUE_PORTS)?,
            inbound_probes: env::probe_paths(env, INBOUND_PROBES)?,
            mesh_networks: list(env, MESH_NETWORKS, "", "comma-separated CIDRs like 10.0.0.0/8")?,
            connect_timeout: duration(env, CONNECT_TIMEOUT, "1s")?,
            tcp_idle_timeout: duration(env, TCP_IDLE_TIMEOUT, "1h")?,
            queue_timeout: duration(env, QUEUE_TIMEOUT, "3s")?,
            http: HttpConfig {
                max_header_bytes: parse(env, MAX_HEADER_BYTES, "65536", "a byte count like 65536")?,
                header_read_timeout: duration(env, HEADER_READ_TIMEOUT, "10s")?,
                keepalive_idle_timeout: duration(env, KEEPALIVE_IDLE_TIMEOUT, "120s")?,
                pool_idle_timeout: duration(env, POOL_IDLE_TIMEOUT, "60s")?,
                pool_max_idle_per_host: parse(env, POOL_MAX_IDLE, "256", "a count like 256")?,
                h2_max_concurrent_streams: parse(env, H2_MAX_CONCURRENT_STREAMS, "250", "a count like 250")?,
            },
            drain_grace: duration(env, DRAIN_GRACE, "30s")?,
            log: LogConfig {
                filter: env.get(LOG).unwrap_or_else(|| "info".into()),
                json: match env.get(LOG_FORMAT).as_deref().unwrap_or("plain") {
                    "plain" => false,
                    "json" => true,
                    other => return Err(err(LOG_FORMAT, other, "plain or json")),
                },
                access_log: flag(env, ACCESS_LOG)?,
            },
            worker_threads: parse(env, WORKER_THREADS, "2", "a thread count like 2")?,
            workload: workload(env),
            tracing: trace_config(env, &workload(env))?,
        })
    }
}

/// `WEFT_WORKLOAD`, else `OTEL_SERVICE_NAME`, else the service account of `WEFT_IDENTITY`.
fn workload(env: &dyn Env) -> String {
    let from_identity = || env.get(IDENTITY).and_then(|id| id.rsplit('/').next().map(str::to_string));
    [env.get(WORKLOAD), env.get(OTEL_SERVICE_NAME), from_identity()]
        .into_iter()
        .flatten()
        .find(|w| !w.trim().is_empty())
        .map_or_else(|| "weft-proxy".to_string(), |w| w.trim().to_string())
}

impl InitConfig {
    pub fn from_env(env: &dyn Env) -> Result<Self, Error> {
        let port_of = |name, default| -> Result<u16, Error> {
            let addr: SocketAddr = parse(env, name, default, "an address like 0.0.0.0:4143")?;
            Ok(addr.port())
        };
        Ok(InitConfig {
            inbound_port: port_of(INBOUND_ADDR, "0.0.0.0:4143")?,
            outbound_port: port_of(OUTBOUND_ADDR, "127.0.0.1:4140")?,
            admin_port: port_of(ADMIN_ADDR, "0.0.0.0:4191")?,
            proxy_uid: parse(env, PROXY_UID, "2102", "a numeric uid like 2102")?,
            skip_inbound_ports: ports(env, INIT_SKIP_INBOUND_PORTS, "")?,
            skip_outbound_ports: ports(env, INIT_SKIP_OUTBOUND_PORTS, "")?,
        })
    }
}

/// With `WEFT_CONTROL_ADDR` set, an identity and a token are required too.
fn control(env: &dyn Env) -> Result<Option<ControlConfig>, Error> {
    let form = "host:port, e.g. weft-control.weft:8090, or several replicas' comma-separated";
    let Some(HostPorts(addrs)) = parse_opt(env, CONTROL_ADDR, form)? else {
        return Ok(None);
    };
    const ID_FORM: &str =
        "the proxy's SPIFFE ID, spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>";
    let identity = env.get(IDENTITY).unwrap_or_default();
    if identity.parse::<weft_api::spiffe::SpiffeId>().is_err() {
        return Err(err(IDENTITY, &identity, ID_FORM));
    }
    let token =
        match (env.get(TOKEN).filter(|t| !t.is_empty()), env.get(TOKEN_FILE).filter(|t| !t.is_empty())) {
            (Some(t), None) => TokenSource::Value(t),
            (None, Some(f)) => TokenSource::File(f.into()),
            (Some(_), Some(_)) => {
                return Err(err(TOKEN_FILE, "(both set)", "only one of WEFT_TOKEN and WEFT_TOKEN_FILE"))
            }
            (None, None) => {
                return Err(err(
                    TOKEN,
                    "",
                    "the workload's token (or WEFT_TOKEN_FILE) when WEFT_CONTROL_ADDR is set",
                ))
            }
        };
    let default_inbound_policy = match env.get(DEFAULT_INBOUND_POLICY).as_deref().map(str::trim) {
        None | Some("") | Some("deny") => DefaultPolicy::Deny,
        Some("strict") => DefaultPolicy::Strict,
        Some("permissive") => DefaultPolicy::Permissive,
        Some(other) => return Err(err(DEFAULT_INBOUND_POLICY, other, "deny, strict or permissive")),
    };
    let inbound_ports = ports(env, INBOUND_PORTS, "")?;
    let watches = WatchLimits {
        idle: duration(env, WATCH_IDLE_TIMEOUT, "60s")?,
        max: parse(env, MAX_WATCHES, "10000", "a count like 10000")?,
    };
    Ok(Some(ControlConfig { addrs, identity, token, default_inbound_policy, inbound_ports, watches }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&'static str, &'static str)]) -> Result<Config, Error> {
        let env: HashMap<&str, &str> = pairs.iter().copied().collect();
        Config::from_env(&env)
    }

    #[test]
    fn defaults() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.inbound_addr, "0.0.0.0:4143".parse().unwrap());
        assert_eq!(c.outbound_addr, "127.0.0.1:4140".parse().unwrap());
        assert_eq!(c.admin_addr, "0.0.0.0:4191".parse().unwrap());
        assert_eq!(c.app_addr, None);
        assert!(c.control.is_none());
        assert_eq!(c.detect_timeout, Duration::from_millis(100));
        assert!(c.opaque_ports.contains(&3306));
        assert!(!c.log.json);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = cfg(&[(INBOUND_ADDR, "nope")]).unwrap_err().to_string();
        assert!(e.contains("WEFT_INBOUND_ADDR") && e.contains("0.0.0.0:4143"), "{e}");
        let e = cfg(&[(DETECT_TIMEOUT, "100")]).unwrap_err().to_string();
        assert!(e.contains("WEFT_DETECT_TIMEOUT") && e.contains("100ms"), "{e}");
        let e = cfg(&[(CONTROL_ADDR, "no-port")]).unwrap_err().to_string();
        assert!(e.contains("WEFT_CONTROL_ADDR"), "{e}");
        let e = cfg(&[(CONTROL_ADDR, "cp:8090")]).unwrap_err().to_string();
        assert!(e.contains("WEFT_IDENTITY") && e.contains("spiffe://"), "{e}");
        let e = cfg(&[(CONTROL_ADDR, "cp:8090"), (IDENTITY, "spiffe://weft.local/ns/a/sa/b")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("WEFT_TOKEN"), "{e}");
        let e = cfg(&[(OPAQUE_PORTS, "10-5")]).unwrap_err().to_string();
        assert!(e.contains("WEFT_OPAQUE_PORTS"), "{e}");
        assert!(cfg(&[(LOG_FORMAT, "xml")]).is_err());
        assert!(cfg(&[(ACCESS_LOG, "maybe")]).is_err());
        assert!(cfg(&[(MESH_NETWORKS, "10.0.0.0/99")]).is_err());
        for bad in ["8080", "8080:healthz", "0:/x", "http:/x"] {
            let e = cfg(&[(INBOUND_PROBES, bad)]).unwrap_err().to_string();
            assert!(e.contains("WEFT_INBOUND_PROBES") && e.contains("port:path"), "{e}");
        }
        let probes =
            cfg(&[(INBOUND_PROBES, "8080:/healthz?x=1, 9090:/grpc.health.v1.Health/Check")]).unwrap();
        assert!(probes.inbound_probes.contains(&(8080, "/healthz?x=1".to_string())));
        assert_eq!(probes.inbound_probes.len(), 2);
    }

    #[test]
    fn lists_and_ranges() {
        let c = cfg(&[
            (OPAQUE_PORTS, "25, 8000-8002"),
            (MESH_NETWORKS, "10.77.0.0/24,fd00::/64"),
            (APP_ADDR, "127.0.0.1:8080"),
            (CONTROL_ADDR, "weft-control.weft:8090"),
            (IDENTITY, "spiffe://weft.local/ns/shop/sa/web"),
            (TOKEN, "s3cret-token"),
            (ACCESS_LOG, "on"),
        ])
        .unwrap();
        assert_eq!(c.opaque_ports.iter().copied().collect::<Vec<_>>(), vec![25, 8000, 8001, 8002]);
        assert_eq!(c.mesh_networks.len(), 2);
        assert_eq!(c.app_addr, Some("127.0.0.1:8080".parse().unwrap()));
        let control = c.control.as_ref().unwrap();
        assert_eq!(control.addrs, ["weft-control.weft:8090"]);
        assert!(!format!("{c:?}").contains("s3cret"), "the token must not be logged");
        assert!(c.log.access_log);
    }

    #[test]
    fn several_control_plane_replicas() {
        let with = |addr: &'static str| {
            cfg(&[
                (IDENTITY, "spiffe://weft.local/ns/shop/sa/web"),
                (TOKEN, "s3cret-token"),
                (CONTROL_ADDR, addr),
            ])
        };
        let c = with("10.0.0.1:8090, 10.0.0.2:8090").unwrap();
        assert_eq!(c.control.unwrap().addrs, ["10.0.0.1:8090", "10.0.0.2:8090"]);
        let e = with("10.0.0.1:8090,nope").unwrap_err().to_string();
        assert!(e.contains("WEFT_CONTROL_ADDR") && e.contains("comma-separated"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("5d"), None);
    }

    #[test]
    fn init_ports_follow_listener_addrs() {
        let env: HashMap<&str, &str> =
            [(INBOUND_ADDR, "0.0.0.0:5143"), (INIT_SKIP_OUTBOUND_PORTS, "443")].into_iter().collect();
        let c = InitConfig::from_env(&env).unwrap();
        assert_eq!(c.inbound_port, 5143);
        assert_eq!(c.outbound_port, 4140);
        assert_eq!(c.proxy_uid, 2102);
        assert!(c.skip_outbound_ports.contains(&443));
    }

    #[test]
    fn tracing_follows_the_otel_variables() {
        assert!(cfg(&[]).unwrap().tracing.is_none(), "no endpoint: no export");
        let t = cfg(&[(OTEL_ENDPOINT, "http://jaeger:4318/"), (OTEL_PROTOCOL, "http/protobuf")])
            .unwrap()
            .tracing
            .unwrap();
        assert_eq!(t.endpoint, "http://jaeger:4318/v1/traces");
        assert_eq!(t.sampler, Sampler { ratio: 1.0, parent_based: true });
        let t = cfg(&[
            (OTEL_TRACES_ENDPOINT, "http://c:4317"),
            (OTEL_SAMPLER, "parentbased_traceidratio"),
            (OTEL_SAMPLER_ARG, "0.25"),
            (IDENTITY, "spiffe://weft.local/ns/shop/sa/cart"),
        ])
        .unwrap();
        let tr = t.tracing.unwrap();
        assert_eq!(
            (tr.protocol, tr.sampler.ratio, tr.service_name.as_str()),
            (OtlpProtocol::Grpc, 0.25, "cart")
        );
        assert_eq!(t.workload, "cart");
        assert!(cfg(&[(OTEL_ENDPOINT, "http://c:4317"), (OTEL_SDK_DISABLED, "true")])
            .unwrap()
            .tracing
            .is_none());
        assert!(cfg(&[(OTEL_ENDPOINT, "http://c:4317"), (OTEL_TRACES_EXPORTER, "none")])
            .unwrap()
            .tracing
            .is_none());
        for (bad, var) in [
            (&[(OTEL_ENDPOINT, "https://c:4317")][..], OTEL_ENDPOINT),
            (&[(OTEL_ENDPOINT, "c:4317")], OTEL_ENDPOINT),
            (&[(OTEL_ENDPOINT, "http://c:4317"), (OTEL_PROTOCOL, "http/json")], OTEL_PROTOCOL),
            (&[(OTEL_ENDPOINT, "http://c:4317"), (OTEL_SAMPLER, "sometimes")], OTEL_SAMPLER),
            (
                &[(OTEL_ENDPOINT, "http://c:4317"), (OTEL_SAMPLER, "traceidratio"), (OTEL_SAMPLER_ARG, "2")],
                OTEL_SAMPLER_ARG,
            ),
            (
                &[(OTEL_ENDPOINT, "http://c:4317"), (OTEL_BSP_MAX_QUEUE_SIZE, "10")],
                OTEL_BSP_MAX_EXPORT_BATCH_SIZE,
            ),
            (&[(OTEL_TRACES_EXPORTER, "zipkin")], OTEL_TRACES_EXPORTER),
        ] {
            let e = cfg(bad).unwrap_err().to_string();
            assert!(e.contains(var), "{e}");
        }
    }
}
