//! Links the worker's binaries, tests and benches against the libtorch that torch-sys found, with an
//! rpath so they run without LD_LIBRARY_PATH, and compiles the c10d shim (worker/cpp/c10d_shim.cpp)
//! against libtorch's headers and the gloo headers that scripts/setup unpacks.

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    // torch-sys (links = "tch") exports the folder of libtorch's shared libraries.
    let lib_dir = env::var("DEP_TCH_LIBTORCH_LIB").expect(
        "torch-sys did not report DEP_TCH_LIBTORCH_LIB; run scripts/setup so LIBTORCH is set",
    );
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    println!("cargo:rustc-env=EQIM_LIBTORCH_LIB_AT_BUILD={lib_dir}");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");

    let cuda = env::var_os("CARGO_FEATURE_CUDA").is_some();
    if cuda {
        // rustc passes --as-needed, which drops libtorch_cuda since no symbol of it is referenced
        // directly; without it CUDA looks unavailable at run time.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }

    compile_c10d_shim(Path::new(&lib_dir), cuda);
}

/// Compiles the C ABI over c10d. The torch wheel ships no gloo headers, and without
/// `USE_C10D_GLOO` ProcessGroupGloo.hpp silently declares nothing, so both are required here.
fn compile_c10d_shim(lib_dir: &Path, cuda: bool) {
    let torch_dir = lib_dir
        .parent()
        .expect("DEP_TCH_LIBTORCH_LIB has a parent folder (the torch folder)")
        .to_path_buf();
    let gloo_include = gloo_include_dir(&torch_dir);
    println!("cargo:rerun-if-changed=cpp/c10d_shim.cpp");
    println!("cargo:rerun-if-changed=cpp/precision_shim.cpp");
    println!("cargo:rerun-if-changed=cpp/shim_guard.h");
    println!("cargo:rerun-if-env-changed=EQIM_GLOO_INCLUDE");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let abi = env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        // libtorch's headers are noisy under -Wall; the shim's own code is small and reviewed.
        .warnings(false)
        .include(torch_dir.join("include"))
        .include(torch_dir.join("include/torch/csrc/api/include"))
        .include(&gloo_include)
        .flag("-std=c++20")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .define("USE_C10D_GLOO", None)
        .file("cpp/c10d_shim.cpp")
        .file("cpp/precision_shim.cpp");
    if cuda {
        // CUDA and NCCL headers come from the pip wheels next to torch/ (scripts/setup --gpu
        // installs nvidia-cuda-crt and nvidia-cuda-cccl; nvidia-nccl comes with torch).
        let nvidia = torch_dir
            .canonicalize()
            .unwrap_or_else(|_| torch_dir.clone())
            .parent()
            .map(|p| p.join("nvidia"))
            .expect("the torch folder has a parent");
        for sub in ["cu13/include", "cu13/include/cccl", "nccl/include"] {
            build.include(nvidia.join(sub));
        }
        build
            .define("USE_C10D_NCCL", None)
            .define("EQIM_WITH_NCCL", None);
        println!("cargo:rustc-link-lib=torch_cuda");
        println!("cargo:rustc-link-lib=c10_cuda");
    }
    build.compile("eqim_c10d_shim");
    // The shim's symbols resolve against these; name them explicitly so the link never depends
    // on what torch-sys happens to list.
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=torch_cpu");
    println!("cargo:rustc-link-lib=c10");
}

/// `$EQIM_GLOO_INCLUDE`, else `<torch folder>/../gloo/usr/include` where scripts/setup puts
/// Debian's libgloo-dev headers. The parent is taken lexically: with `scripts/setup --gpu` the
/// torch folder is a symlink into .venv, and `..` would resolve inside the venv.
fn gloo_include_dir(torch_dir: &Path) -> PathBuf {
    let dir = match env::var_os("EQIM_GLOO_INCLUDE") {
        Some(dir) => PathBuf::from(dir),
        None => torch_dir
            .parent()
            .expect("the torch folder has a parent")
            .join("gloo/usr/include"),
    };
    if !dir.join("gloo/algorithm.h").is_file() {
        panic!(
            "gloo headers not found at {} (expected gloo/algorithm.h there): run scripts/setup, \
             which unpacks Debian's libgloo-dev next to libtorch, or set EQIM_GLOO_INCLUDE to a \
             folder holding gloo/",
            dir.display()
        );
    }
    dir
}
