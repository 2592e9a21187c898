//! Reading and checking values: the [`Env`] source, and parsers whose errors name the
//! variable and what it expects.

use std::{collections::BTreeSet, str::FromStr, time::Duration};

/// Where configuration values come from.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for std::collections::HashMap<&str, &str> {
    fn get(&self, name: &str) -> Option<String> {
        std::collections::HashMap::get(self, name).map(|v| v.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid {name}={value:?}: expected {expected}")]
pub struct Error {
    name: &'static str,
    value: String,
    expected: &'static str,
}

// === parsing helpers ===

pub fn err(name: &'static str, value: &str, expected: &'static str) -> Error {
    Error { name, value: value.to_string(), expected }
}

pub fn parse<T: FromStr>(
    env: &dyn Env,
    name: &'static str,
    default: &str,
    expected: &'static str,
) -> Result<T, Error> {
    let value = env.get(name).unwrap_or_else(|| default.to_string());
    value.trim().parse().map_err(|_| err(name, &value, expected))
}

pub fn parse_opt<T: FromStr>(
    env: &dyn Env,
    name: &'static str,
    expected: &'static str,
) -> Result<Option<T>, Error> {
    match env.get(name) {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| err(name, &v, expected)),
    }
}

pub fn list<T: FromStr>(
    env: &dyn Env,
    name: &'static str,
    default: &str,
    expected: &'static str,
) -> Result<Vec<T>, Error> {
    let value = env.get(name).unwrap_or_else(|| default.to_string());
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| err(name, &value, expected)))
        .collect()
}

/// Ports as a comma-separated list of numbers and inclusive ranges: `25,3306,8000-8010`.
pub fn ports(env: &dyn Env, name: &'static str, default: &str) -> Result<BTreeSet<u16>, Error> {
    const EXPECTED: &str = "comma-separated ports or ranges like 25,3306,8000-8010";
    let value = env.get(name).unwrap_or_else(|| default.to_string());
    let mut out = BTreeSet::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (lo, hi) = item.split_once('-').unwrap_or((item, item));
        let lo: u16 = lo.trim().parse().map_err(|_| err(name, &value, EXPECTED))?;
        let hi: u16 = hi.trim().parse().map_err(|_| err(name, &value, EXPECTED))?;
        if lo == 0 || lo > hi {
            return Err(err(name, &value, EXPECTED));
        }
        out.extend(lo..=hi);
    }
    Ok(out)
}

/// `port:path` pairs, comma-separated: `8080:/healthz,9090:/grpc.health.v1.Health/Check`.
pub fn probe_paths(env: &dyn Env, name: &'static str) -> Result<BTreeSet<(u16, String)>, Error> {
    const EXPECTED: &str = "comma-separated port:path pairs like 8080:/healthz,8080:/ready";
    let value = env.get(name).unwrap_or_default();
    let mut out = BTreeSet::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (port, path) = item.split_once(':').ok_or_else(|| err(name, &value, EXPECTED))?;
        let port: u16 = port.trim().parse().map_err(|_| err(name, &value, EXPECTED))?;
        if port == 0 || !path.starts_with('/') {
            return Err(err(name, &value, EXPECTED));
        }
        out.insert((port, path.to_string()));
    }
    Ok(out)
}

pub fn flag(env: &dyn Env, name: &'static str) -> Result<bool, Error> {
    match env.get(name).as_deref().map(str::trim) {
        None | Some("") | Some("0") | Some("false") | Some("off") => Ok(false),
        Some("1") | Some("true") | Some("on") => Ok(true),
        Some(other) => Err(err(name, other, "true or false")),
    }
}

pub fn duration(env: &dyn Env, name: &'static str, default: &str) -> Result<Duration, Error> {
    let value = env.get(name).unwrap_or_else(|| default.to_string());
    parse_duration(value.trim()).ok_or_else(|| err(name, &value, "a duration like 100ms, 10s, 5m or 1h"))
}

/// The duration grammar Weft shares (`weft_api::duration`).
pub fn parse_duration(s: &str) -> Option<Duration> {
    weft_api::duration::parse(s).ok()
}

/// `host:port` with a non-empty host and a numeric port.
pub struct HostPorts(pub Vec<String>);

/// One `host:port` or several, comma-separated.
impl FromStr for HostPorts {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let mut out = Vec::new();
        for one in s.split(',').map(str::trim) {
            let (host, port) = one.rsplit_once(':').ok_or(())?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(());
            }
            out.push(one.to_string());
        }
        Ok(HostPorts(out))
    }
}
