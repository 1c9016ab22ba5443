//! Build script:
//! - link `torch_cuda` even though nothing references it by symbol
//!   (../shared/GPU.md: without `--no-as-needed` tch reports no CUDA on a GPU machine);
//! - compile the host shims kernels/alloc_stats.cpp (CUDA allocator statistics),
//!   kernels/torch_stream.cpp (libtorch's current stream, for the NVRTC kernels) and
//!   kernels/side_stream.cpp (side-stream copies for activation offload) and
//!   kernels/flash_varlen.cpp (libtorch's varlen flash attention, for packed rows) when
//!   libtorch has CUDA, and say so with the `tuner_cuda_shim` cfg;
//! - compile kernels/c10d.cpp (libtorch's c10d stores, NCCL and gloo process groups for
//!   src/dist/) when libtorch has CUDA and the wheel's NCCL headers are there, and say so
//!   with the `tuner_c10d` cfg;
//! - compile kernels/custom_op.cpp (an autograd node whose backward is a Rust function, for the
//!   fused ops of src/kernels/) whenever libtorch's headers are there, and say so with the
//!   `tuner_custom_op` cfg, and with it kernels/op_census.cpp (a count of the ops libtorch runs,
//!   a debugging aid);
//! - record libtorch's folder as an rpath so tests and the binary find it without
//!   LD_LIBRARY_PATH on the machine that built them.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=kernels/alloc_stats.cpp");
    println!("cargo:rerun-if-changed=kernels/torch_stream.cpp");
    println!("cargo:rerun-if-changed=kernels/side_stream.cpp");
    println!("cargo:rerun-if-changed=kernels/flash_varlen.cpp");
    println!("cargo::rustc-check-cfg=cfg(tuner_cuda_shim)");
    println!("cargo:rerun-if-changed=kernels/custom_op.cpp");
    println!("cargo:rerun-if-changed=kernels/op_census.cpp");
    println!("cargo::rustc-check-cfg=cfg(tuner_custom_op)");
    let Ok(libtorch) = std::env::var("LIBTORCH") else { return };
    let root = PathBuf::from(&libtorch);
    let lib = root.join("lib");
    // Fused ops with their own backward inside autograd's graph (src/kernels/autograd.rs):
    // libtorch's headers only, so on every machine.
    if root.join("include/torch/csrc/autograd/function.h").exists() {
        cc::Build::new()
            .cpp(true)
            .file("kernels/custom_op.cpp")
            .file("kernels/op_census.cpp")
            .include(root.join("include/torch/csrc/api/include"))
            .include(root.join("include"))
            .flag("-std=c++17")
            .define("_GLIBCXX_USE_CXX11_ABI", "1")
            .warnings(false)
            .compile("tuner_custom_op");
        println!("cargo:rustc-cfg=tuner_custom_op");
    }
    // The CUDA runtime headers come with the PyPI torch install: nvidia/cu13 has most of them,
    // and triton's copy supplies the `crt/` folder that cu13 lacks.
    let cuda_headers = root.join("../nvidia/cu13/include");
    let crt_headers = root.join("../triton/backends/nvidia/include");
    if lib.join("libtorch_cuda.so").exists()
        && cuda_headers.join("cuda_runtime_api.h").exists()
        && crt_headers.join("crt/host_config.h").exists()
    {
        cc::Build::new()
            .cpp(true)
            .file("kernels/alloc_stats.cpp")
            .file("kernels/torch_stream.cpp")
            .file("kernels/side_stream.cpp")
            .file("kernels/flash_varlen.cpp")
            .include(root.join("include/torch/csrc/api/include"))
            .include(root.join("include"))
            .include(&cuda_headers)
            .include(&crt_headers)
            .flag("-std=c++17")
            .define("_GLIBCXX_USE_CXX11_ABI", "1")
            .warnings(false)
            .compile("tuner_alloc_stats");
        println!("cargo:rustc-cfg=tuner_cuda_shim");
    }
    // Data parallel (src/dist/): libtorch's own c10d, through kernels/c10d.cpp. The wheel
    // lacks gloo's headers and CCCL's <nv/target>; kernels/c10d_stub/ declares what the
    // c10d headers name (see its README).
    println!("cargo:rerun-if-changed=kernels/c10d.cpp");
    println!("cargo:rerun-if-changed=kernels/c10d_stub");
    println!("cargo::rustc-check-cfg=cfg(tuner_c10d)");
    let nccl_headers = root.join("../nvidia/nccl/include");
    if lib.join("libtorch_cuda.so").exists()
        && cuda_headers.join("cuda_runtime_api.h").exists()
        && crt_headers.join("crt/host_config.h").exists()
        && nccl_headers.join("nccl.h").exists()
    {
        cc::Build::new()
            .cpp(true)
            .file("kernels/c10d.cpp")
            .include("kernels/c10d_stub")
            .include(root.join("include"))
            .include(root.join("include/torch/csrc/api/include"))
            .include(&cuda_headers)
            .include(&crt_headers)
            .include(&nccl_headers)
            .flag("-std=c++17")
            .flag("-Wno-interference-size")
            .define("_GLIBCXX_USE_CXX11_ABI", "1")
            .define("USE_C10D_GLOO", None)
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .warnings(false)
            .compile("tuner_c10d");
        println!("cargo:rustc-cfg=tuner_c10d");
    }
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-lc10_cuda");
        println!("cargo:rustc-link-arg=-lc10");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-env=TUNER_LIBTORCH_DIR={}", lib.display());
}
