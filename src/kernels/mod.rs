//! The CUDA kernels of `kernels/*.cu`, compiled at run time with NVRTC and launched on
//! libtorch's current stream, with the CPU reference of each beside its launcher
//! (`dequant_4bit`, `rms_norm`, `rope`, `glu`, the loss's `cross_entropy`, and Gemma 3n's `topk_glu`, `altup_predict`,
//! `altup_correct`, `altup_first`, and the optimizer's `adamw_8bit`), and the varlen flash attention libtorch has but tch does not bind (`varlen`).
//! Ops that need a gradient under autograd run as one node with their hand-written backward
//! ([`autograd`], kernels/custom_op.cpp). [`op_census`] counts the ops libtorch runs on the host
//! (a debugging aid for passes bound by the host).
//!
//! - NVRTC and the driver API come through `cudarc`, which loads `libnvrtc` and `libcuda` at
//!   run time: nothing CUDA is linked, and a CPU machine never touches them. libnvrtc is the one
//!   that ships with the PyPI torch (`nvidia/cu13/lib`), loaded by its path next to libtorch.
//! - The kernels run in libtorch's primary context, on the stream `c10::cuda::getCurrentCUDAStream`
//!   returns (kernels/torch_stream.cpp), so they are ordered with libtorch's own work and its
//!   caching allocator's stream semantics hold for the tensors they read and write.
//! - A [`Kernels`] handle is made per model load and shared by the blocks that use it
//!   (`Option<Arc<Kernels>>`: `None` on a CPU, when disabled, or when compiling failed, and then
//!   every block takes its reference path). There is no process-wide state.
//!
//! Every kernel has a CPU reference and a check (`check.rs`) run by the tests on a GPU and by
//! `tuner kernels`, which also times each kernel against the card's copy bandwidth.

pub mod adamw_8bit;
pub mod altup_correct;
pub mod altup_first;
pub mod altup_predict;
pub mod autograd;
pub mod check;
pub mod checker;
pub mod cross_entropy;
pub mod dequant_4bit;
pub mod glu;
pub mod op_census;
pub mod rms_norm;
pub mod rope;
pub mod topk_glu;
pub mod varlen;

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use tch::{Device, Kind, Tensor};

/// Turn the CUDA profiler's collection on or off for the current context (`cuProfilerStart` /
/// `cuProfilerStop`), so that `ncu --profile-from-start off` records only a chosen window (see
/// `train::step::ProfileWindow`). Without a profiler attached these calls do nothing; a failure
/// (no driver) is logged, never fatal.
pub fn cuda_profiler(on: bool) {
    let r = if on { cudarc::driver::profiler_start() } else { cudarc::driver::profiler_stop() };
    if let Err(e) = r {
        log::warn!("cuProfiler{}: {e:?}", if on { "Start" } else { "Stop" });
    }
}

/// (file, source, kernel names) of every kernel source; each is compiled with
/// kernels/prelude.cuh in front.
const SOURCES: [(&str, &str, &[&str]); 10] = [
    ("dequant_4bit.cu", include_str!("../../kernels/dequant_4bit.cu"), &["dequant_4bit", "dequant_4bit_rows"]),
    (
        "rms_norm.cu",
        include_str!("../../kernels/rms_norm.cu"),
        &["rms_norm_fwd", "rms_norm_bwd", "rms_norm_fwd_x8", "rms_norm_bwd_x8"],
    ),
    ("rope.cu", include_str!("../../kernels/rope.cu"), &["rope", "rope_x8"]),
    ("glu.cu", include_str!("../../kernels/glu.cu"), &["glu_fwd", "glu_bwd", "glu_fwd_x8", "glu_bwd_x8"]),
    ("cross_entropy.cu", include_str!("../../kernels/cross_entropy.cu"), &["cross_entropy"]),
    ("topk_glu.cu", include_str!("../../kernels/topk_glu.cu"), &["topk_glu_fwd", "topk_glu_bwd", "topk_glu_bwd_r"]),
    (
        "altup_predict.cu",
        include_str!("../../kernels/altup_predict.cu"),
        &["altup_predict_fwd", "altup_predict_bwd", "altup_predict_fwd_x8", "altup_predict_bwd_x8"],
    ),
    (
        "altup_correct.cu",
        include_str!("../../kernels/altup_correct.cu"),
        &["altup_correct_fwd", "altup_correct_bwd", "altup_correct_fwd_x8", "altup_correct_bwd_x8"],
    ),
    ("altup_first.cu", include_str!("../../kernels/altup_first.cu"), &["altup_first_fwd", "altup_first_bwd"]),
    ("adamw_8bit.cu", include_str!("../../kernels/adamw_8bit.cu"), &["adamw_8bit"]),
];
const PRELUDE: &str = include_str!("../../kernels/prelude.cuh");

/// Compiled kernels for one CUDA device.
pub struct Kernels {
    #[cfg_attr(not(tuner_cuda_shim), allow(dead_code))]
    ordinal: usize,
    ctx: Arc<cudarc::driver::CudaContext>,
    funcs: HashMap<&'static str, cudarc::driver::CudaFunction>,
    /// Streaming multiprocessors (grid sizing of grid-stride kernels).
    pub sm_count: u32,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels").field("ordinal", &self.ordinal).field("kernels", &self.funcs.len()).finish()
    }
}

impl Kernels {
    /// The kernels for `device` when it is a CUDA device and `enabled`; `None` otherwise. A
    /// failure to compile is logged once, with the cause, and the reference paths are used.
    pub fn for_device(device: Device, enabled: bool) -> Option<Arc<Kernels>> {
        let Device::Cuda(ordinal) = device else { return None };
        if !enabled {
            log::info!("CUDA kernels disabled (train.cuda_kernels = false); using the reference paths");
            return None;
        }
        match Kernels::compile(ordinal) {
            Ok(k) => Some(Arc::new(k)),
            Err(e) => {
                log::warn!("CUDA kernels unavailable, using the reference paths: {e:#}");
                None
            }
        }
    }

    /// Compile every kernel for device `ordinal`.
    pub fn compile(ordinal: usize) -> Result<Kernels> {
        if !cfg!(tuner_cuda_shim) {
            bail!("this build's libtorch has no CUDA (kernels/torch_stream.cpp was not compiled)");
        }
        let started = std::time::Instant::now();
        preload_nvrtc()?;
        let ctx =
            cudarc::driver::CudaContext::new(ordinal).context("cannot open the CUDA device through the driver API")?;
        let (major, minor) = ctx.compute_capability()?;
        let sm_count =
            ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let mut funcs = HashMap::new();
        for (file, ptx, names) in compile_ptx(major, minor)? {
            let module = ctx.load_module(ptx).with_context(|| format!("cannot load kernels/{file}"))?;
            for &name in names {
                funcs.insert(
                    name,
                    module.load_function(name).with_context(|| format!("no `{name}` in kernels/{file}"))?,
                );
            }
        }
        log::info!(
            "compiled {} CUDA kernels for sm_{major}{minor} in {:.2}s",
            funcs.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(Kernels { ordinal, ctx, funcs, sm_count })
    }

    /// Launch `name` on libtorch's current stream with a 1-D grid.
    pub(crate) fn launch(&self, name: &str, grid: u32, block: u32, args: Args) -> Result<()> {
        self.launch_2d(name, (grid, 1), block, args)
    }

    /// Launch `name` on libtorch's current stream with a 2-D grid `(x, y)` of 1-D blocks.
    pub(crate) fn launch_2d(&self, name: &str, grid: (u32, u32), block: u32, args: Args) -> Result<()> {
        let f = self.funcs.get(name).ok_or_else(|| anyhow!("no kernel `{name}`"))?;
        self.ctx.bind_to_thread()?;
        let stream = current_stream(self.ordinal)?;
        let mut slots = args.0;
        let mut params: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
        // SAFETY: every slot holds one argument of the kernel's signature (pointers, 64-bit and
        // 32-bit integers, f32), in order, little-endian in an 8-byte slot; the tensors behind the
        // pointers are alive and on this device for the launch, which is ordered on their stream.
        unsafe {
            cudarc::driver::result::launch_kernel(
                f.cu_function(),
                (grid.0.max(1), grid.1.max(1), 1),
                (block, 1, 1),
                0,
                stream as _,
                &mut params,
            )
        }
        .with_context(|| format!("launching `{name}`"))?;
        Ok(())
    }

    /// Blocks for a grid-stride kernel over `n` items: enough to fill the card, no more.
    pub(crate) fn grid_for(&self, n: i64, block: u32) -> u32 {
        let want = (n.max(1) as u64).div_ceil(block as u64);
        want.min(self.sm_count as u64 * 16).max(1) as u32
    }
}

/// Every kernel source compiled to PTX for compute capability `major.minor` by NVRTC (no GPU
/// needed: the tests compile them on a CPU machine too), as (file, PTX, kernel names).
pub fn compile_ptx(major: i32, minor: i32) -> Result<Vec<(&'static str, cudarc::nvrtc::Ptx, &'static [&'static str])>> {
    preload_nvrtc()?;
    let mut out = Vec::new();
    for (file, src, names) in SOURCES {
        let opts = cudarc::nvrtc::CompileOptions {
            options: vec![format!("--gpu-architecture=compute_{major}{minor}"), "--std=c++17".into()],
            name: Some(file.to_string()),
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(format!("{PRELUDE}\n{src}"), opts)
            .map_err(|e| anyhow!("NVRTC cannot compile kernels/{file}: {e:?}"))?;
        out.push((file, ptx, names));
    }
    Ok(out)
}

/// Kernel arguments in order, each in an 8-byte slot.
#[derive(Default)]
pub(crate) struct Args(Vec<u64>);

impl Args {
    /// A tensor's device address.
    pub fn ptr(mut self, t: &Tensor) -> Self {
        self.0.push(t.data_ptr() as u64);
        self
    }
    /// A tensor's address, or null.
    pub fn ptr_opt(mut self, t: Option<&Tensor>) -> Self {
        self.0.push(t.map_or(0, |t| t.data_ptr() as u64));
        self
    }
    pub fn i64(mut self, v: i64) -> Self {
        self.0.push(v as u64);
        self
    }
    pub fn i32(mut self, v: i64) -> Self {
        self.0.push(v as i32 as u32 as u64);
        self
    }
    pub fn f32(mut self, v: f64) -> Self {
        self.0.push((v as f32).to_bits() as u64);
        self
    }
}

/// The prelude's dtype code of `kind`, when a kernel handles it.
pub(crate) fn dtype_code(kind: Kind) -> Option<i64> {
    match kind {
        Kind::Float => Some(0),
        Kind::BFloat16 => Some(1),
        Kind::Half => Some(2),
        _ => None,
    }
}

/// Whether `kernels` can run on `ts`: all on its device, contiguous, and in a handled dtype.
pub(crate) fn usable<'a>(kernels: Option<&'a Kernels>, ts: &[&Tensor]) -> Option<&'a Kernels> {
    let k = kernels?;
    let ok =
        ts.iter().all(|t| t.device() == Device::Cuda(k.ordinal) && t.is_contiguous() && dtype_code(t.kind()).is_some());
    ok.then_some(k)
}

/// Whether `kernels` can run on `ts` once they are made contiguous: all on its device, in a
/// handled dtype (the fused autograd ops copy strided inputs).
pub(crate) fn on_device<'a>(kernels: Option<&'a Kernels>, ts: &[&Tensor]) -> Option<&'a Kernels> {
    let k = kernels?;
    let ok = ts.iter().all(|t| t.device() == Device::Cuda(k.ordinal) && dtype_code(t.kind()).is_some());
    ok.then_some(k)
}

#[cfg(tuner_cuda_shim)]
extern "C" {
    fn tuner_cuda_current_stream(device: i32, out: *mut *mut c_void) -> i32;
}

/// libtorch's current stream on device `ordinal`.
fn current_stream(ordinal: usize) -> Result<*mut c_void> {
    #[cfg(tuner_cuda_shim)]
    {
        let mut s: *mut c_void = std::ptr::null_mut();
        // SAFETY: a plain query of libtorch's stream registry that writes one pointer; catches
        // every C++ exception. A null handle is the default stream, valid on any device.
        let rc = unsafe { tuner_cuda_current_stream(ordinal as i32, &mut s) };
        if rc != 0 {
            bail!("libtorch has no current stream for cuda:{ordinal}");
        }
        Ok(s)
    }
    #[cfg(not(tuner_cuda_shim))]
    {
        bail!("no CUDA in this build (cuda:{ordinal})")
    }
}

/// Load libnvrtc by its path next to libtorch (the PyPI layout: `torch/lib/../../nvidia/cu13/lib`),
/// so cudarc's load by name finds it already mapped. `TUNER_NVRTC` overrides the path.
fn preload_nvrtc() -> Result<()> {
    let mut candidates: Vec<std::path::PathBuf> = Vec::new();
    if let Ok(p) = std::env::var("TUNER_NVRTC") {
        candidates.push(p.into());
    }
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    if let Some(lib) =
        maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| p.ends_with("/libtorch_cuda.so"))
    {
        let dir = std::path::Path::new(lib).parent().unwrap_or(std::path::Path::new("/"));
        for rel in ["../../nvidia/cu13/lib/libnvrtc.so.13", "../../nvidia/cuda_nvrtc/lib/libnvrtc.so.12"] {
            candidates.push(dir.join(rel));
        }
    }
    candidates.push("/usr/local/cuda/lib64/libnvrtc.so.13".into());
    candidates.push("/usr/local/cuda/lib64/libnvrtc.so".into());
    for c in &candidates {
        if !c.exists() {
            continue;
        }
        let path = std::ffi::CString::new(c.to_string_lossy().as_bytes())?;
        // SAFETY: dlopen of a shared library by path; the handle is kept for the process's life.
        let h = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if !h.is_null() {
            // NVRTC opens its builtins library by name when it first compiles; map the one beside
            // it now, so that name resolves without LD_LIBRARY_PATH.
            let dir = c.parent().unwrap_or(std::path::Path::new("."));
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("libnvrtc-builtins.so") {
                    let p = std::ffi::CString::new(entry.path().to_string_lossy().as_bytes())?;
                    // SAFETY: as above.
                    unsafe { libc::dlopen(p.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
                }
            }
            return Ok(());
        }
    }
    bail!(
        "libnvrtc not found (looked at {}); set TUNER_NVRTC to its path",
        candidates.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}
