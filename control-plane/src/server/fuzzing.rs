//! Entry point for the mesh-file fuzz target (fuzz/) and the stable test that replays its
//! corpus: arbitrary text must parse or be refused with an error, never panic, and what
//! validates must be servable.

use super::{mesh::Mesh, watch};

pub fn mesh_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(mesh) = Mesh::parse("fuzz.yaml", text) else { return };
    for s in &mesh.services {
        for authority in mesh.authorities(s) {
            let set = watch::endpoint_set(&mesh, &authority, &s.namespace);
            assert!(set.known, "{authority} of a valid mesh is not known");
            let routes = mesh.route_set(&authority, &s.namespace);
            assert!(routes.rules.iter().all(|r| !r.name.is_empty()));
        }
    }
    let _ = mesh.tokens();
}

#[cfg(test)]
mod tests {
    /// The fuzz corpus's inputs (fuzz/corpus/mesh_file), replayed on stable.
    #[test]
    fn the_fuzz_corpus_replays() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/mesh_file");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            super::mesh_file(&std::fs::read(entry.path()).unwrap());
            n += 1;
        }
        assert!(n > 0, "no corpus in {}", dir.display());
    }
}
