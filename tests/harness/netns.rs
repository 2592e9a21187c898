//! Pods as Linux network namespaces, as ../shared/RIG.md describes: a private "node"
//! namespace with a bridge, and one namespace per pod joined to it by a veth pair.
//! Nothing leaves the namespaces the test made (the node has no uplink).
//!
//! Teardown runs on drop, so a failing test still removes everything; namespaces left
//! by a test that was SIGKILLed are removed by the next run (their names carry the PID).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
};

static COUNTER: AtomicUsize = AtomicUsize::new(0);
const PREFIX: &str = "weft-t";

pub struct Pod {
    pub ns: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

pub struct Net {
    pub node: String,
    pub pods: Vec<Pod>,
    children: Vec<Child>,
}

fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn must(args: &[&str]) -> String {
    sh(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Whether this machine lets us make namespaces (root with iproute2 and iptables).
pub fn available() -> Result<(), String> {
    sh(&["ip", "netns", "list"]).map_err(|e| format!("ip netns unavailable: {e}"))?;
    sh(&["iptables", "--version"]).map_err(|e| format!("iptables unavailable: {e}"))?;
    Ok(())
}

/// Deletes namespaces of earlier test runs whose process is gone.
fn remove_leftovers() {
    let Ok(list) = sh(&["ip", "netns", "list"]) else { return };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(PREFIX) else { continue };
        let Some(pid) = rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            delete_ns(name);
        }
    }
}

fn delete_ns(name: &str) {
    // A process inside keeps a deleted namespace alive: kill them first.
    if let Ok(pids) = sh(&["ip", "netns", "pids", name]) {
        for pid in pids.split_whitespace() {
            let _ = sh(&["kill", "-9", pid]);
        }
    }
    let _ = sh(&["ip", "netns", "del", name]);
}

impl Net {
    /// A node with `n` pods at 10.77.0.2, 10.77.0.3, … and fd77::2, fd77::3, …
    pub fn new(n: usize) -> Net {
        remove_leftovers();
        let id = format!("{PREFIX}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst));
        let node = format!("{id}-node");
        let mut net = Net { node: node.clone(), pods: vec![], children: vec![] };
        must(&["ip", "netns", "add", &node]);
        net.node_exec(&["ip", "link", "set", "lo", "up"]);
        net.node_exec(&["ip", "link", "add", "br0", "type", "bridge"]);
        net.node_exec(&["ip", "addr", "add", "10.77.0.1/24", "dev", "br0"]);
        // `nodad`: usable at once, without waiting for duplicate address detection.
        net.node_exec(&["ip", "addr", "add", "fd77::1/64", "dev", "br0", "nodad"]);
        net.node_exec(&["ip", "link", "set", "br0", "up"]);
        for i in 0..n {
            let ns = format!("{id}-p{i}");
            let ip = Ipv4Addr::new(10, 77, 0, 2 + i as u8);
            let ip6 = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2 + i as u16);
            must(&["ip", "netns", "add", &ns]);
            net.pods.push(Pod { ns: ns.clone(), ip, ip6 });
            let veth = format!("veth{i}");
            must(&[
                "ip", "link", "add", &veth, "netns", &node, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            net.node_exec(&["ip", "link", "set", &veth, "master", "br0"]);
            net.node_exec(&["ip", "link", "set", &veth, "up"]);
            net.exec(i, &["ip", "link", "set", "lo", "up"]);
            net.exec(i, &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            net.exec(i, &["ip", "link", "set", "eth0", "up"]);
            net.exec(i, &["ip", "route", "add", "default", "via", "10.77.0.1"]);
            net.exec(i, &["ip", "addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"]);
        }
        net
    }

    fn node_exec(&self, args: &[&str]) -> String {
        self.node_try_exec(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs a command in the node namespace (on the bridge, outside every pod).
    pub fn node_try_exec(&self, args: &[&str]) -> Result<String, String> {
        let mut a = vec!["ip", "netns", "exec", &self.node];
        a.extend_from_slice(args);
        sh(&a)
    }

    /// Runs a command in pod `i` and returns its stdout; panics on failure.
    pub fn exec(&self, i: usize, args: &[&str]) -> String {
        must(&self.cmd_args(i, args))
    }

    /// Like `exec` but returns the error instead of panicking.
    pub fn try_exec(&self, i: usize, args: &[&str]) -> Result<String, String> {
        sh(&self.cmd_args(i, args))
    }

    fn cmd_args<'a>(&'a self, i: usize, args: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["ip", "netns", "exec", self.pods[i].ns.as_str()];
        a.extend_from_slice(args);
        a
    }

    /// Starts a long-running process in pod `i`; it is killed at teardown.
    pub fn spawn(&mut self, i: usize, args: &[&str], envs: &[(&str, &str)], log: &std::path::Path) -> usize {
        let ns = self.pods[i].ns.clone();
        self.spawn_in(&ns, args, envs, log)
    }

    /// Starts a long-running process in the node namespace (e.g. the control plane, at
    /// 10.77.0.1); it is killed at teardown.
    pub fn spawn_node(&mut self, args: &[&str], envs: &[(&str, &str)], log: &std::path::Path) -> usize {
        let ns = self.node.clone();
        self.spawn_in(&ns, args, envs, log)
    }

    /// Kills (SIGKILL) a process `spawn`/`spawn_node` started, by the number they
    /// returned: what a node failure does to it. `ip netns exec` execs the command, so
    /// the pid is the command's.
    pub fn kill(&self, process: usize) {
        let _ = sh(&["kill", "-9", &self.children[process].id().to_string()]);
    }

    /// Sends SIGTERM to a process `spawn` started, as a kubelet stops a container.
    pub fn terminate(&self, process: usize) {
        let _ = sh(&["kill", "-TERM", &self.children[process].id().to_string()]);
    }

    /// A started process's exit status, once it has exited.
    pub fn try_wait(&mut self, process: usize) -> Option<std::process::ExitStatus> {
        self.children[process].try_wait().ok().flatten()
    }

    fn spawn_in(&mut self, ns: &str, args: &[&str], envs: &[(&str, &str)], log: &std::path::Path) -> usize {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).args(args);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::null()).stderr(std::fs::File::create(log).unwrap());
        self.children.push(cmd.spawn().unwrap_or_else(|e| panic!("spawn {args:?}: {e}")));
        self.children.len() - 1
    }

    pub fn names(&self) -> Vec<String> {
        std::iter::once(self.node.clone()).chain(self.pods.iter().map(|p| p.ns.clone())).collect()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.names() {
            delete_ns(&ns);
        }
    }
}

/// Whether a namespace of this name exists.
pub fn exists(name: &str) -> bool {
    sh(&["ip", "netns", "list"])
        .map(|l| l.lines().any(|x| x.split_whitespace().next() == Some(name)))
        .unwrap_or(false)
}
