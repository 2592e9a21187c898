//! Weft's own policy resources → the mesh: InboundPolicies (by pod selector and port)
//! and TrafficPolicies (a Service's balancer, outlier detection, concurrency limit,
//! fault and retry budget). Objects are taken oldest first, as the Gateway API breaks
//! ties; what cannot be honoured is left out whole and reported.

use std::{collections::HashMap, sync::Arc, time::Duration};

use k8s_openapi::apimachinery::pkg::{
    apis::meta::v1::{LabelSelector, ObjectMeta},
    util::intstr::IntOrString,
};
use weft_api::duration::Setting;

use super::{
    gateway::Problem,
    resources::{self, InboundPolicy, TrafficPolicy},
};
use crate::server::{mesh, routes};

pub fn inbound_policies(
    trust_domain: &str,
    policies: &[Arc<InboundPolicy>],
    problems: &mut Vec<Problem>,
) -> Vec<mesh::InboundPolicy> {
    let mut out = Vec::new();
    for p in oldest_first(policies) {
        let (ns, name) = ns_name(&p.metadata);
        let at = |field: &str, msg: String| format!("InboundPolicy {ns}/{name}: {field}: {msg}");
        let allow = match &p.spec.allow {
            None => None,
            Some(a) => {
                let mut ids = Vec::new();
                for sa in &a.service_accounts {
                    let sns = sa.namespace.as_deref().unwrap_or(&ns);
                    ids.push(format!("spiffe://{trust_domain}/ns/{sns}/sa/{}", sa.name));
                }
                ids.extend(a.namespaces.iter().map(|n| format!("spiffe://{trust_domain}/ns/{n}/sa/*")));
                for id in &a.identities {
                    if let Err(e) = id.parse::<crate::server::ca::SpiffeId>() {
                        problems.push(at("spec.allow.identities", e.to_string()));
                        continue;
                    }
                    ids.push(id.clone());
                }
                Some(ids)
            }
        };
        let (port, port_name) = match port(&p.spec.port) {
            Ok(port) => port,
            Err(e) => {
                problems.push(at("spec.port", e));
                continue;
            }
        };
        let expressions = match expressions(&p.spec.pod_selector) {
            Ok(e) => e,
            Err((field, e)) => {
                problems.push(at(&format!("spec.podSelector.{field}"), e));
                continue;
            }
        };
        let rate_limit = p.spec.rate_limit.as_ref().map(|r| mesh::RateLimit {
            requests_per_second: r.requests_per_second.max(1),
            burst: r.burst,
            per_identity: r.per_identity,
        });
        out.push(mesh::InboundPolicy {
            workload: String::new(),
            port,
            port_name,
            mode: match p.spec.mode {
                resources::Mode::Strict => mesh::Mode::Strict,
                resources::Mode::Permissive => mesh::Mode::Permissive,
            },
            allow,
            rate_limit,
            pods: Some(mesh::PodSelector {
                namespace: ns.clone(),
                labels: p.spec.pod_selector.match_labels.clone().unwrap_or_default(),
                expressions,
            }),
        });
    }
    out
}

/// A port by number (1–65535), or by a container port's name (`port_name`; `0` then).
fn port(p: &IntOrString) -> Result<(u16, Option<String>), String> {
    match p {
        IntOrString::Int(n) => match u16::try_from(*n) {
            Ok(n) if n > 0 => Ok((n, None)),
            _ => Err(format!("{n} is not a port; use 1-65535 or a container port's name")),
        },
        // A container port's name: an IANA service name, at most 15 characters.
        IntOrString::String(name) => {
            let ok = !name.is_empty()
                && name.len() <= 15
                && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && name.chars().any(|c| c.is_ascii_lowercase());
            match (ok, name.parse::<u16>()) {
                // "8080" in quotes: meant as the number.
                (_, Ok(n)) if n > 0 => Ok((n, None)),
                (true, _) => Ok((0, Some(name.clone()))),
                (false, _) => Err(format!(
                    "{name:?} is not a port name (up to 15 lowercase letters, digits and '-') or number"
                )),
            }
        }
    }
}

/// `matchExpressions`, checked as the API server checks them for built-in selectors.
fn expressions(s: &LabelSelector) -> Result<Vec<(String, mesh::LabelOp)>, (String, String)> {
    let mut out = Vec::new();
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let field = |f: &str| format!("matchExpressions[{i}].{f}");
        let values = e.values.clone().unwrap_or_default();
        let op = match (e.operator.as_str(), values.is_empty()) {
            ("In", false) => mesh::LabelOp::In(values),
            ("NotIn", false) => mesh::LabelOp::NotIn(values),
            ("Exists", true) => mesh::LabelOp::Exists,
            ("DoesNotExist", true) => mesh::LabelOp::DoesNotExist,
            ("In" | "NotIn", true) => return Err((field("values"), format!("{} needs values", e.operator))),
            ("Exists" | "DoesNotExist", false) => {
                return Err((field("values"), format!("{} takes no values", e.operator)))
            }
            (other, _) => {
                return Err((
                    field("operator"),
                    format!("{other:?} is not an operator; use In, NotIn, Exists or DoesNotExist"),
                ))
            }
        };
        out.push((e.key.clone(), op));
    }
    Ok(out)
}

/// Objects in the order the Gateway API breaks ties between them: the oldest first,
/// then by namespace and name. When two conflict, the first wins.
fn oldest_first<K: kube::Resource>(objects: &[Arc<K>]) -> Vec<&Arc<K>> {
    let mut sorted: Vec<&Arc<K>> = objects.iter().collect();
    sorted.sort_by_key(|o| order(o.meta()));
    sorted
}

pub type Order = (Option<k8s_openapi::jiff::Timestamp>, Option<String>, Option<String>);

pub fn order(m: &ObjectMeta) -> Order {
    (m.creation_timestamp.as_ref().map(|t| t.0), m.namespace.clone(), m.name.clone())
}

fn ns_name(m: &ObjectMeta) -> (String, String) {
    (m.namespace.clone().unwrap_or_default(), m.name.clone().unwrap_or_default())
}

/// A TrafficPolicy's settings, checked.
pub struct Traffic {
    port: Option<u16>,
    balancer: Option<mesh::Balancer>,
    outlier: Option<mesh::OutlierDetection>,
    max_concurrent_requests: Option<u32>,
    fault: Option<routes::Fault>,
    budget: Option<routes::RetryBudget>,
}

impl Traffic {
    pub fn for_port(&self, port: u16) -> Option<&Traffic> {
        self.port.is_none_or(|p| p == port).then_some(self)
    }

    pub fn apply(&self, s: &mut mesh::Service) {
        if let Some(b) = self.balancer {
            s.balancer = b;
        }
        if let Some(o) = &self.outlier {
            s.outlier_detection = o.clone();
        }
        s.max_concurrent_requests = self.max_concurrent_requests.or(s.max_concurrent_requests);
    }
}

pub fn traffic_policies(
    policies: &[Arc<TrafficPolicy>],
    problems: &mut Vec<Problem>,
) -> HashMap<(String, String), Traffic> {
    let mut out = HashMap::new();
    for p in oldest_first(policies) {
        let (ns, name) = ns_name(&p.metadata);
        let at = |field: &str, msg: String| format!("TrafficPolicy {ns}/{name}: {field}: {msg}");
        let duration = |field: &str, d: &Option<String>, default: Duration| -> Result<Setting, Problem> {
            match d {
                None => Ok(Setting(default)),
                Some(d) => weft_api::duration::parse(d).map(Setting).map_err(|e| at(field, e.to_string())),
            }
        };
        let spec = &p.spec;
        let outlier = match &spec.outlier_detection {
            None => None,
            Some(o) => {
                let base = mesh::OutlierDetection::default();
                let ejection =
                    duration("spec.outlierDetection.ejectionTime", &o.ejection_time, base.ejection_time.0);
                let max = duration(
                    "spec.outlierDetection.maxEjectionTime",
                    &o.max_ejection_time,
                    base.max_ejection_time.0,
                );
                match (ejection, max) {
                    (Ok(ejection_time), Ok(max_ejection_time)) => Some(mesh::OutlierDetection {
                        consecutive_failures: o.consecutive_failures.unwrap_or(base.consecutive_failures),
                        ejection_time,
                        max_ejection_time,
                    }),
                    (Err(e), _) | (_, Err(e)) => {
                        problems.push(e);
                        continue;
                    }
                }
            }
        };
        let fault = match &spec.fault {
            None => None,
            Some(f) => {
                let delay = match &f.delay {
                    None => None,
                    Some(d) => {
                        match duration("spec.fault.delay.duration", &Some(d.duration.clone()), Duration::ZERO)
                        {
                            Ok(duration) => Some(routes::FaultDelay { percent: d.percent, duration }),
                            Err(e) => {
                                problems.push(e);
                                continue;
                            }
                        }
                    }
                };
                let abort =
                    f.abort.as_ref().map(|a| routes::FaultAbort { percent: a.percent, status: a.status });
                Some(routes::Fault { delay, abort })
            }
        };
        let key = (ns.clone(), spec.target_ref.name.clone());
        if out.contains_key(&key) {
            problems.push(at("spec.targetRef", "an older TrafficPolicy already targets this Service".into()));
            continue;
        }
        out.insert(
            key,
            Traffic {
                port: spec.target_ref.port,
                balancer: spec.balancer.map(|b| match b {
                    resources::Balancer::PeakEwma => mesh::Balancer::PeakEwma,
                    resources::Balancer::RoundRobin => mesh::Balancer::RoundRobin,
                }),
                outlier,
                max_concurrent_requests: spec.max_concurrent_requests,
                fault,
                budget: spec.retry_budget.as_ref().map(|b| routes::RetryBudget {
                    percent: b.percent,
                    min_per_second: b.min_retries_per_second,
                }),
            },
        );
    }
    out
}

/// A TrafficPolicy's retry budget caps every rule of its Service's routes that retries
/// and names no budget of its own.
pub fn add_budgets(
    traffic: &HashMap<(String, String), Traffic>,
    services: &[mesh::Service],
    routes: &mut [routes::Route],
) {
    for s in services {
        let policy = traffic.get(&(s.namespace.clone(), s.name.clone())).and_then(|t| t.for_port(s.port));
        let Some(budget) = policy.and_then(|t| t.budget.clone()) else { continue };
        for r in routes.iter_mut().filter(|r| r.service == s.authority()) {
            for retry in r.rules.iter_mut().filter_map(|rule| rule.retry.as_mut()) {
                retry.budget.get_or_insert_with(|| budget.clone());
            }
        }
    }
}

/// A TrafficPolicy's fault applies to every request to its Service: added to each rule
/// of the Service's routes that has none, and as a last rule that matches everything.
pub fn add_faults(
    traffic: &HashMap<(String, String), Traffic>,
    services: &[mesh::Service],
    routes: &mut Vec<routes::Route>,
) {
    for s in services {
        let policy = traffic.get(&(s.namespace.clone(), s.name.clone())).and_then(|t| t.for_port(s.port));
        let Some(fault) = policy.and_then(|t| t.fault.clone()) else { continue };
        for r in routes.iter_mut().filter(|r| r.service == s.authority()) {
            for rule in r.rules.iter_mut().filter(|rule| rule.fault.is_none()) {
                rule.fault = Some(fault.clone());
            }
        }
        routes.push(routes::Route {
            name: format!("{}/{}-fault", s.namespace, s.name),
            service: s.authority(),
            rules: vec![routes::Rule { fault: Some(fault), ..routes::Rule::default() }],
            consumer_namespace: None,
        });
    }
}
