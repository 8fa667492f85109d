//! The crate map holds: the worker (and the `eqim` CLI) never links the coordinator, neither as a
//! dependency nor as a dev-dependency; it reaches the coordinator only through `eqim-common`'s
//! client and, for `eqim coordinator`/`eqim launch`, the `eqim-coordinator` binary.

#[test]
fn the_worker_dependency_tree_has_no_coordinator() {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let out = std::process::Command::new(env!("CARGO"))
        .args(["tree", "--manifest-path", manifest, "-p", "eqim-worker"])
        .args(["-e", "normal,build,dev", "--prefix", "none", "--offline"])
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        tree.lines().any(|l| l.starts_with("eqim-common ")),
        "unexpected cargo tree output:\n{tree}"
    );
    assert!(
        !tree.lines().any(|l| l.starts_with("eqim-coordinator ")),
        "eqim-worker depends on eqim-coordinator:\n{tree}"
    );
}
