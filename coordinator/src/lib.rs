//! eqim's coordinator: owns the truth of a job (membership, generations, the data cursor and
//! ledger, checkpoints, evaluation leases) and serves the QUIC control plane and `/metrics`.
//! It never links libtorch, so it runs on a CPU head node.
#![forbid(unsafe_code)]

pub mod membership;
pub mod steps;

#[cfg(test)]
mod tests {
    /// The coordinator must run on a head node without libtorch: no torch-sys anywhere in its
    /// dependency tree (normal and build dependencies).
    #[test]
    fn coordinator_dependency_tree_has_no_libtorch() {
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
        let out = std::process::Command::new(env!("CARGO"))
            .args([
                "tree",
                "--manifest-path",
                manifest,
                "-p",
                "eqim-coordinator",
            ])
            .args(["-e", "normal,build", "--prefix", "none", "--offline"])
            .output()
            .expect("running cargo tree");
        assert!(
            out.status.success(),
            "cargo tree failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tree = String::from_utf8_lossy(&out.stdout);
        assert!(
            tree.contains("eqim-common"),
            "unexpected cargo tree output:\n{tree}"
        );
        for forbidden in ["torch-sys", "tch "] {
            assert!(
                !tree.lines().any(|l| l.starts_with(forbidden)),
                "coordinator depends on {forbidden}:\n{tree}"
            );
        }
    }
}
