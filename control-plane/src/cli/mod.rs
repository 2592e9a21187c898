//! The `weft` command line beyond the control plane: `weft up` runs a whole mesh on one
//! machine, `weft stat` reads its sidecars' golden signals, `weft example-app` is the
//! demo's apps, over a small keep-alive HTTP/1 client; `weft inject` meshes manifests;
//! `weft install` prints the cluster install; `weft check` checks it.

pub mod check;
pub mod example_app;
pub mod http_client;
pub mod inject;
pub mod install;
pub mod stat;
pub mod up;
