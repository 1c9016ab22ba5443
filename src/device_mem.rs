//! Device memory readings: libtorch's CUDA caching-allocator statistics (the
//! numbers `torch.cuda.max_memory_allocated` reports), read through the small
//! C++ shim in kernels/alloc_stats.cpp, and the process RSS on the CPU.

/// CUDA allocator statistics of one device, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CudaMem {
    pub allocated: i64,
    pub peak_allocated: i64,
    pub reserved: i64,
    pub peak_reserved: i64,
}

#[cfg(tuner_cuda_shim)]
extern "C" {
    fn tuner_cuda_mem_stats(device: i32, out: *mut i64) -> i32;
    fn tuner_cuda_reset_peak(device: i32) -> i32;
}

/// The allocator statistics of CUDA device `device`, or None without CUDA.
pub fn cuda(device: usize) -> Option<CudaMem> {
    #[cfg(tuner_cuda_shim)]
    {
        if !tch::Cuda::is_available() {
            return None;
        }
        let mut out = [0i64; 4];
        // SAFETY: the shim writes exactly four i64 into `out` and catches every C++ exception.
        let rc = unsafe { tuner_cuda_mem_stats(device as i32, out.as_mut_ptr()) };
        (rc == 0).then_some(CudaMem {
            allocated: out[0],
            peak_allocated: out[1],
            reserved: out[2],
            peak_reserved: out[3],
        })
    }
    #[cfg(not(tuner_cuda_shim))]
    {
        let _ = device;
        None
    }
}

/// Reset the peak counters of CUDA device `device` (no-op without CUDA).
pub fn reset_cuda_peak(device: usize) {
    #[cfg(tuner_cuda_shim)]
    if tch::Cuda::is_available() {
        // SAFETY: plain call into the shim, which catches every C++ exception.
        unsafe { tuner_cuda_reset_peak(device as i32) };
    }
    #[cfg(not(tuner_cuda_shim))]
    let _ = device;
}

/// The host memory available to new allocations (`MemAvailable` of /proc/meminfo), in bytes;
/// `None` where it cannot be read.
pub fn host_available_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = s.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    Some(kib * 1024)
}

/// Peak and current resident memory of this process in bytes (CPU), from /proc.
pub fn rss_bytes() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}
