//! `weft-proxy init`: installs the nat rules that send a pod's TCP through the proxy.
//!
//! This is what the Kubernetes init container runs. Inbound TCP (PREROUTING) goes to the
//! inbound port except the admin port and skipped ports; outbound TCP (OUTPUT) goes to
//! the outbound port except the proxy's own traffic (by uid), loopback and skipped
//! ports. Rules live in our own chains, which are flushed and refilled, so running init
//! twice leaves exactly one copy. `--remove` takes everything out again.

use std::process::Command;

use crate::config::InitConfig;

const IN_CHAIN: &str = "WEFT_INBOUND";
const OUT_CHAIN: &str = "WEFT_OUTBOUND";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run {cmd}: {source}; is iptables installed (apt-get install iptables)?")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("`{cmd}` failed: {stderr}; the init container needs NET_ADMIN and NET_RAW")]
    Failed { cmd: String, stderr: String },
}

/// The chain contents, one rule (argument list after `-A CHAIN`) per line.
pub fn inbound_rules(cfg: &InitConfig) -> Vec<Vec<String>> {
    let mut rules = vec![];
    for port in std::iter::once(cfg.admin_port).chain(cfg.skip_inbound_ports.iter().copied()) {
        rules.push(args(&["-p", "tcp", "--dport", &port.to_string(), "-j", "RETURN"]));
    }
    rules.push(args(&["-p", "tcp", "-j", "REDIRECT", "--to-ports", &cfg.inbound_port.to_string()]));
    rules
}

pub fn outbound_rules(cfg: &InitConfig) -> Vec<Vec<String>> {
    let mut rules = vec![
        // The proxy's own upstream connections must leave, not come back to it.
        args(&["-m", "owner", "--uid-owner", &cfg.proxy_uid.to_string(), "-j", "RETURN"]),
        args(&["-o", "lo", "-j", "RETURN"]),
    ];
    for port in &cfg.skip_outbound_ports {
        rules.push(args(&["-p", "tcp", "--dport", &port.to_string(), "-j", "RETURN"]));
    }
    rules.push(args(&["-p", "tcp", "-j", "REDIRECT", "--to-ports", &cfg.outbound_port.to_string()]));
    rules
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Installs (or with `remove`, removes) the rules with `iptables`, and with `ip6tables`
/// when the kernel has IPv6 nat.
pub fn run(cfg: &InitConfig, remove: bool) -> Result<(), Error> {
    for (i, bin) in ["iptables", "ip6tables"].into_iter().enumerate() {
        let ipt = Ipt { bin };
        if i > 0 && ipt.run(&["-t", "nat", "-L", "-n"]).is_err() {
            eprintln!("weft-proxy init: {bin} has no nat table here; IPv6 traffic is not intercepted");
            continue;
        }
        if remove {
            ipt.remove()?;
        } else {
            ipt.install(cfg)?;
        }
        println!("weft-proxy init: {bin}: {}", if remove { "rules removed" } else { "rules installed" });
    }
    Ok(())
}

struct Ipt {
    bin: &'static str,
}

impl Ipt {
    fn run(&self, a: &[&str]) -> Result<(), Error> {
        let cmd = format!("{} {}", self.bin, a.join(" "));
        let out = Command::new(self.bin)
            .args(a)
            .output()
            .map_err(|source| Error::Spawn { cmd: cmd.clone(), source })?;
        if !out.status.success() {
            return Err(Error::Failed {
                cmd,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    fn install(&self, cfg: &InitConfig) -> Result<(), Error> {
        for (hook, chain, rules) in
            [("PREROUTING", IN_CHAIN, inbound_rules(cfg)), ("OUTPUT", OUT_CHAIN, outbound_rules(cfg))]
        {
            // -N fails when the chain exists; -F then empties it either way.
            let _ = self.run(&["-t", "nat", "-N", chain]);
            self.run(&["-t", "nat", "-F", chain])?;
            for rule in rules {
                let mut a = vec!["-t", "nat", "-A", chain];
                a.extend(rule.iter().map(String::as_str));
                self.run(&a)?;
            }
            if self.run(&["-t", "nat", "-C", hook, "-p", "tcp", "-j", chain]).is_err() {
                self.run(&["-t", "nat", "-A", hook, "-p", "tcp", "-j", chain])?;
            }
        }
        Ok(())
    }

    fn remove(&self) -> Result<(), Error> {
        for (hook, chain) in [("PREROUTING", IN_CHAIN), ("OUTPUT", OUT_CHAIN)] {
            while self.run(&["-t", "nat", "-D", hook, "-p", "tcp", "-j", chain]).is_ok() {}
            if self.run(&["-t", "nat", "-F", chain]).is_ok() {
                self.run(&["-t", "nat", "-X", chain])?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> InitConfig {
        InitConfig {
            inbound_port: 4143,
            outbound_port: 4140,
            admin_port: 4191,
            proxy_uid: 2102,
            skip_inbound_ports: [22].into(),
            skip_outbound_ports: [443].into(),
        }
    }

    #[test]
    fn inbound_skips_admin_then_redirects() {
        let r = inbound_rules(&cfg());
        assert_eq!(r[0].join(" "), "-p tcp --dport 4191 -j RETURN");
        assert_eq!(r[1].join(" "), "-p tcp --dport 22 -j RETURN");
        assert_eq!(r.last().unwrap().join(" "), "-p tcp -j REDIRECT --to-ports 4143");
    }

    #[test]
    fn outbound_skips_proxy_uid_and_loopback() {
        let r = outbound_rules(&cfg());
        assert_eq!(r[0].join(" "), "-m owner --uid-owner 2102 -j RETURN");
        assert_eq!(r[1].join(" "), "-o lo -j RETURN");
        assert_eq!(r[2].join(" "), "-p tcp --dport 443 -j RETURN");
        assert_eq!(r.last().unwrap().join(" "), "-p tcp -j REDIRECT --to-ports 4140");
    }
}
