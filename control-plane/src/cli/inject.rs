//! `weft inject [FILE|-]`: the manifests with every pod meshed, as the admission webhook
//! would mesh them, printed for `kubectl apply -f -` (like `linkerd inject --manual`).
//! What happened to each pod goes to stderr; a pod that cannot be injected as written
//! fails the whole command, naming the document, the object and the field.

use std::io::Read;

use anyhow::Context;

use crate::inject::{self, manifests, Outcome};

pub fn run(file: &str, cfg: &inject::Config) -> anyhow::Result<()> {
    let text = match file {
        "-" => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).context("cannot read the manifests from stdin")?;
            s
        }
        path => std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?,
    };
    let (out, reports) = manifests::inject_yaml(&text, cfg)?;
    for r in &reports {
        match &r.outcome {
            Outcome::Injected => eprintln!("{}: injected", r.object),
            Outcome::Skipped(why) => eprintln!("{}: left alone ({why})", r.object),
        }
    }
    if reports.is_empty() {
        eprintln!("no pods found: weft inject meshes Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs");
    }
    print!("{out}");
    Ok(())
}
