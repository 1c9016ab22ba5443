//! Build script: link `torch_cuda` even though nothing references it by symbol
//! (../shared/GPU.md: without `--no-as-needed` tch reports no CUDA on a GPU
//! machine), and record libtorch's folder as an rpath so tests and the binary
//! find it without LD_LIBRARY_PATH on the machine that built them.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Ok(libtorch) = std::env::var("LIBTORCH") else { return };
    let lib = PathBuf::from(libtorch).join("lib");
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-env=TUNER_LIBTORCH_DIR={}", lib.display());
}
