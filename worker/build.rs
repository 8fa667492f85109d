//! Links the worker's binaries, tests and benches against the libtorch that torch-sys found, with an
//! rpath so they run without LD_LIBRARY_PATH.

use std::env;

fn main() {
    // torch-sys (links = "tch") exports the folder of libtorch's shared libraries.
    let lib_dir = env::var("DEP_TCH_LIBTORCH_LIB").expect(
        "torch-sys did not report DEP_TCH_LIBTORCH_LIB; run scripts/setup so LIBTORCH is set",
    );
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    println!("cargo:rustc-env=EQIM_LIBTORCH_LIB_AT_BUILD={lib_dir}");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");

    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        // rustc passes --as-needed, which drops libtorch_cuda since no symbol of it is referenced
        // directly; without it CUDA looks unavailable at run time.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
