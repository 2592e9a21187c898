//! A pod spec run as a kubelet runs it, in a network-namespace pod (`netns`), from the
//! spec itself: init containers in order (a native sidecar, `restartPolicy: Always`, is
//! started and its `startupProbe` polled before the next one), then the containers. Each
//! container's image is mapped to a binary of this machine, its env resolved (values,
//! `$(VAR)` references, the downward API's `fieldRef`s), its volume mounts mapped to
//! folders (a projected ServiceAccount token is written there), and `runAsUser` kept
//! with `setpriv`. No kubelet or container runtime can run here; this is the part of one
//! the injected pod's order and settings depend on.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde_json::Value;

use crate::netns::Net;

/// A pod being run: its processes in the `Net`, by container name.
pub struct RunningPod {
    pub name: String,
    pub processes: BTreeMap<String, usize>,
    /// The order containers started in.
    pub started: Vec<String>,
}

pub struct Kubelet {
    /// Image (without tag) → the binary that stands for it.
    pub images: BTreeMap<String, PathBuf>,
    /// Where this kubelet's volumes live.
    pub dir: PathBuf,
}

impl Kubelet {
    pub fn new(images: &[(&str, PathBuf)]) -> Kubelet {
        let dir = std::env::temp_dir().join(format!(
            "weft-kubelet-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Kubelet { images: images.iter().map(|(i, p)| (i.to_string(), p.clone())).collect(), dir }
    }

    /// Runs `pod` (an object with `metadata` and `spec`) named `name` in pod `i` of
    /// `net`; `token` is what the kubelet would project for its ServiceAccount.
    pub fn run(&self, net: &mut Net, i: usize, name: &str, pod: &Value, token: &str) -> RunningPod {
        let spec = &pod["spec"];
        let volumes = self.volumes(name, spec, token);
        let mut running =
            RunningPod { name: name.to_string(), processes: BTreeMap::new(), started: Vec::new() };
        for c in spec["initContainers"].as_array().into_iter().flatten() {
            let cname = c["name"].as_str().unwrap().to_string();
            if c["restartPolicy"] == "Always" {
                let idx = self.start(net, i, name, pod, c, &volumes);
                running.processes.insert(cname.clone(), idx);
                running.started.push(cname.clone());
                if let Some(probe) = c.get("startupProbe") {
                    let port = probe["httpGet"]["port"].as_u64().unwrap();
                    let url =
                        format!("http://127.0.0.1:{port}{}", probe["httpGet"]["path"].as_str().unwrap());
                    crate::eventually(
                        Duration::from_secs(20),
                        &format!("{cname}'s startup probe {url}"),
                        || net.try_exec(i, &["curl", "-sf", "-o", "/dev/null", "--max-time", "1", &url]).ok(),
                    );
                }
            } else {
                let (program, args, env) = self.command(name, pod, c, &volumes);
                let mut cmd = as_user(c, &program, &args);
                let mut full = vec!["env".to_string()];
                full.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
                full.append(&mut cmd);
                let refs: Vec<&str> = full.iter().map(String::as_str).collect();
                net.try_exec(i, &refs).unwrap_or_else(|e| panic!("init container {cname} failed: {e}"));
                running.started.push(cname);
            }
        }
        for c in spec["containers"].as_array().into_iter().flatten() {
            let cname = c["name"].as_str().unwrap().to_string();
            let idx = self.start(net, i, name, pod, c, &volumes);
            running.processes.insert(cname.clone(), idx);
            running.started.push(cname);
        }
        running
    }

    fn start(
        &self,
        net: &mut Net,
        i: usize,
        name: &str,
        pod: &Value,
        c: &Value,
        volumes: &BTreeMap<String, PathBuf>,
    ) -> usize {
        let (program, args, env) = self.command(name, pod, c, volumes);
        let cmd = as_user(c, &program, &args);
        let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let log = self.dir.join(format!("{name}-{}.log", c["name"].as_str().unwrap()));
        net.spawn(i, &refs, &env_refs, &log)
    }

    /// The log of a container.
    pub fn log(&self, pod: &str, container: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{pod}-{container}.log"))).unwrap_or_default()
    }

    /// Volume name → host folder; a projected token is written in its folder.
    fn volumes(&self, name: &str, spec: &Value, token: &str) -> BTreeMap<String, PathBuf> {
        let mut out = BTreeMap::new();
        for v in spec["volumes"].as_array().into_iter().flatten() {
            let vname = v["name"].as_str().unwrap();
            let dir = self.dir.join(format!("{name}-{vname}"));
            std::fs::create_dir_all(&dir).unwrap();
            for source in v["projected"]["sources"].as_array().into_iter().flatten() {
                if let Some(path) = source["serviceAccountToken"]["path"].as_str() {
                    std::fs::write(dir.join(path), token).unwrap();
                }
            }
            // Readable by the containers' users, as a kubelet's fsGroup handling makes it.
            let _ = std::process::Command::new("chmod").args(["-R", "a+rX"]).arg(&dir).status();
            out.insert(vname.to_string(), dir);
        }
        let _ = std::process::Command::new("chmod").args(["a+rx"]).arg(&self.dir).status();
        out
    }

    /// The program, arguments and environment of container `c`.
    fn command(
        &self,
        name: &str,
        pod: &Value,
        c: &Value,
        volumes: &BTreeMap<String, PathBuf>,
    ) -> (String, Vec<String>, Vec<(String, String)>) {
        let image = c["image"].as_str().unwrap();
        let repo = image.rsplit_once(':').map_or(image, |(r, _)| r);
        let program = self.images.get(repo).unwrap_or_else(|| panic!("no binary stands for image {image}"));
        let mut args: Vec<String> = c["command"]
            .as_array()
            .into_iter()
            .flatten()
            .skip(1)
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        args.extend(c["args"].as_array().into_iter().flatten().map(|a| a.as_str().unwrap().to_string()));
        // Mounts: a path under a mountPath is the volume's folder on this machine.
        let mounts: Vec<(String, PathBuf)> = c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                (m["mountPath"].as_str().unwrap().to_string(), volumes[m["name"].as_str().unwrap()].clone())
            })
            .collect();
        let mut env: Vec<(String, String)> = Vec::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let key = e["name"].as_str().unwrap().to_string();
            let value = match (e.get("value"), e.pointer("/valueFrom/fieldRef/fieldPath")) {
                (Some(v), _) => expand(v.as_str().unwrap(), &env),
                (None, Some(path)) => match path.as_str().unwrap() {
                    "metadata.name" => name.to_string(),
                    "metadata.namespace" => {
                        pod["metadata"]["namespace"].as_str().unwrap_or("default").to_string()
                    }
                    "spec.serviceAccountName" => {
                        pod["spec"]["serviceAccountName"].as_str().unwrap_or("default").to_string()
                    }
                    other => panic!("fieldRef {other} is not supported here"),
                },
                _ => panic!("env {key}: only value and fieldRef are supported here"),
            };
            let value = mounts
                .iter()
                .fold(value, |v, (mount, dir)| v.replace(mount.as_str(), &dir.display().to_string()));
            env.push((key, value));
        }
        (program.display().to_string(), args, env)
    }
}

/// `$(VAR)` references to earlier variables, as the kubelet expands them.
fn expand(value: &str, env: &[(String, String)]) -> String {
    env.iter().fold(value.to_string(), |v, (k, val)| v.replace(&format!("$({k})"), val))
}

/// The command, under `setpriv` when the container runs as a user other than root.
fn as_user(c: &Value, program: &str, args: &[String]) -> Vec<String> {
    let mut cmd = Vec::new();
    if let Some(uid) = c.pointer("/securityContext/runAsUser").and_then(Value::as_u64).filter(|u| *u != 0) {
        let gid = c.pointer("/securityContext/runAsGroup").and_then(Value::as_u64).unwrap_or(uid);
        cmd.extend([
            "setpriv".to_string(),
            "--reuid".into(),
            uid.to_string(),
            "--regid".into(),
            gid.to_string(),
            "--clear-groups".into(),
        ]);
    }
    cmd.push(program.to_string());
    cmd.extend(args.iter().cloned());
    cmd
}

static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
