//! Bindings to libtorch's own c10d (the engine under `torch.distributed`) through
//! kernels/c10d.cpp: a rendezvous [`Store`] (TCPStore on MASTER_ADDR:MASTER_PORT as
//! torchrun uses it, or a FileStore in the run dir) and a [`ProcessGroup`] (NCCL for CUDA
//! tensors, gloo for CPU tensors). Built only when libtorch has CUDA (the `tuner_c10d`
//! cfg from build.rs); otherwise every constructor says so.

use anyhow::{bail, Result};
use std::time::Duration;
use tch::Tensor;

#[cfg(tuner_c10d)]
mod ffi {
    use std::os::raw::{c_char, c_int, c_void};
    extern "C" {
        pub fn tuner_c10d_free(p: *mut c_void);
        pub fn tuner_c10d_tcp_store(
            host: *const c_char,
            port: c_int,
            is_server: c_int,
            world: c_int,
            timeout_ms: i64,
            prefix: *const c_char,
            err: *mut *mut c_char,
        ) -> *mut c_void;
        pub fn tuner_c10d_file_store(
            path: *const c_char,
            world: c_int,
            timeout_ms: i64,
            err: *mut *mut c_char,
        ) -> *mut c_void;
        pub fn tuner_c10d_store_free(s: *mut c_void);
        pub fn tuner_c10d_store_set(
            s: *mut c_void,
            key: *const c_char,
            data: *const u8,
            len: usize,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn tuner_c10d_store_get(
            s: *mut c_void,
            key: *const c_char,
            timeout_ms: i64,
            out: *mut *mut u8,
            len: *mut usize,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn tuner_c10d_store_check(
            s: *mut c_void,
            key: *const c_char,
            present: *mut c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn tuner_c10d_store_add(
            s: *mut c_void,
            key: *const c_char,
            delta: i64,
            value: *mut i64,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn tuner_c10d_set_cuda_device(device: c_int, err: *mut *mut c_char) -> c_int;
        pub fn tuner_c10d_group(
            s: *mut c_void,
            rank: c_int,
            world: c_int,
            nccl: c_int,
            timeout_ms: i64,
            err: *mut *mut c_char,
        ) -> *mut c_void;
        pub fn tuner_c10d_group_free(g: *mut c_void);
        pub fn tuner_c10d_allreduce_sum(
            g: *mut c_void,
            tensors: *const *mut c_void,
            n: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn tuner_c10d_broadcast(g: *mut c_void, t: *mut c_void, root: c_int, err: *mut *mut c_char) -> c_int;
    }
}

/// Which c10d backend a process group uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// NCCL: CUDA tensors.
    Nccl,
    /// gloo: CPU tensors.
    Gloo,
}

impl Backend {
    /// The backend's name as torch.distributed spells it.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nccl => "nccl",
            Backend::Gloo => "gloo",
        }
    }
}

#[cfg(not(tuner_c10d))]
fn unavailable<T>() -> Result<T> {
    bail!("this tuner was built without c10d (its libtorch has no CUDA, or the wheel's NCCL headers were missing at build time): multi-process training is unavailable")
}

#[cfg(tuner_c10d)]
fn check(rc: i32, err: *mut std::os::raw::c_char, what: &str) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    bail!("{what}: {}", take_err(err))
}

#[cfg(tuner_c10d)]
fn take_err(err: *mut std::os::raw::c_char) -> String {
    if err.is_null() {
        return "unknown error".into();
    }
    // SAFETY: the shim hands back a NUL-terminated strdup'd string, freed here once.
    let s = unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().trim().to_string();
    unsafe { ffi::tuner_c10d_free(err.cast()) };
    s
}

#[cfg(tuner_c10d)]
fn cstr(s: &str) -> Result<std::ffi::CString> {
    Ok(std::ffi::CString::new(s)?)
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// Make `index` this process's current CUDA device (`torch.cuda.set_device`).
#[cfg_attr(not(tuner_c10d), allow(unused_variables))]
pub fn set_cuda_device(index: usize) -> Result<()> {
    #[cfg(tuner_c10d)]
    {
        let mut err = std::ptr::null_mut();
        let rc = unsafe { ffi::tuner_c10d_set_cuda_device(index as i32, &mut err) };
        check(rc, err, &format!("cannot make cuda:{index} the current device"))
    }
    #[cfg(not(tuner_c10d))]
    unavailable()
}

/// A c10d key-value store shared by every rank.
pub struct Store {
    #[cfg_attr(not(tuner_c10d), allow(dead_code))]
    ptr: *mut std::os::raw::c_void,
}

impl Store {
    /// A TCPStore on `host:port`, served by this process when `is_server`; keys go under
    /// `prefix`. The server waits up to `timeout` for all `world` ranks.
    #[cfg_attr(not(tuner_c10d), allow(unused_variables))]
    pub fn tcp(host: &str, port: u16, is_server: bool, world: usize, timeout: Duration, prefix: &str) -> Result<Store> {
        #[cfg(tuner_c10d)]
        {
            let mut err = std::ptr::null_mut();
            let (h, pre) = (cstr(host)?, cstr(prefix)?);
            let ptr = unsafe {
                ffi::tuner_c10d_tcp_store(
                    h.as_ptr(),
                    port as i32,
                    is_server as i32,
                    world as i32,
                    ms(timeout),
                    pre.as_ptr(),
                    &mut err,
                )
            };
            if ptr.is_null() {
                bail!(
                    "rendezvous on {host}:{port} (TCPStore, {}) failed: {}",
                    if is_server { "serving" } else { "client" },
                    take_err(err)
                );
            }
            Ok(Store { ptr })
        }
        #[cfg(not(tuner_c10d))]
        unavailable()
    }

    /// A FileStore at `path` (one host).
    #[cfg_attr(not(tuner_c10d), allow(unused_variables))]
    pub fn file(path: &std::path::Path, world: usize, timeout: Duration) -> Result<Store> {
        #[cfg(tuner_c10d)]
        {
            let mut err = std::ptr::null_mut();
            let p = cstr(&path.to_string_lossy())?;
            let ptr = unsafe { ffi::tuner_c10d_file_store(p.as_ptr(), world as i32, ms(timeout), &mut err) };
            if ptr.is_null() {
                bail!("rendezvous through {} (FileStore) failed: {}", path.display(), take_err(err));
            }
            Ok(Store { ptr })
        }
        #[cfg(not(tuner_c10d))]
        unavailable()
    }

    /// Set `key` to `value`.
    #[cfg_attr(not(tuner_c10d), allow(unused_variables))]
    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        #[cfg(tuner_c10d)]
        {
            let mut err = std::ptr::null_mut();
            let k = cstr(key)?;
            let rc = unsafe { ffi::tuner_c10d_store_set(self.ptr, k.as_ptr(), value.as_ptr(), value.len(), &mut err) };
            check(rc, err, &format!("store set `{key}`"))
        }
        #[cfg(not(tuner_c10d))]
        unavailable()
    }

    /// The value of `key`, waiting up to `timeout` for it to be set.
    #[cfg_attr(not(tuner_c10d), allow(unused_variables))]
    pub fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        #[cfg(tuner_c10d)]
        {
            let mut err = std::ptr::null_mut();
            let k = cstr(key)?;
            let (mut out, mut len) = (std::ptr::null_mut(), 0usize);
            let rc =
                unsafe { ffi::tuner_c10d_store_get(self.ptr, k.as_ptr(), ms(timeout), &mut out, &mut len, &mut err) };
            check(rc, err, &format!("store get `{key}`"))?;
            // SAFETY: the shim malloc'd `len` bytes at `out`; copied, then freed once.
            let v = unsafe { std::slice::from_raw_parts(out, len) }.to_vec();
            unsafe { ffi::tuner_c10d_free(out.cast()) };
            Ok(v)
        }
        #[cfg(not(tuner_c10d))]
        unavailable()
    }

    /// Whether `key` is set (does not wait).
    #[cfg_attr(not(tuner_c10d), allow(unused_variables))]
    pub fn check(&self, key: &str) -> Result<bool> {
        #[cfg(tuner_c10d)]
        {
            let mut err = std::ptr::null_mut();
            let k = cstr(key)?;
            let mut present = 0;
            let rc = unsafe { ffi::tuner_c10d_store_check(self.ptr, k.as_ptr(), &mut present, &mut err) };
            check(rc, err, &format!("store check `{key}`"))?;
            Ok(present != 0)
        }
        #[cfg(not(tuner_c10d))]
        unavailable()
    }

    /// Atomically add `delta` to the counter `key`; returns the new value.
    #[cfg_attr(not(tuner_c10d), allow(unused_variables))]
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        #[cfg(tuner_c10d)]
        {
            let mut err = std::ptr::null_mut();
            let k = cstr(key)?;
            let mut v = 0i64;
            let rc = unsafe { ffi::tuner_c10d_store_add(self.ptr, k.as_ptr(), delta, &mut v, &mut err) };
            check(rc, err, &format!("store add `{key}`"))?;
            Ok(v)
        }
        #[cfg(not(tuner_c10d))]
        unavailable()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        #[cfg(tuner_c10d)]
        unsafe {
            ffi::tuner_c10d_store_free(self.ptr)
        }
    }
}

/// A c10d process group over every rank of a [`Store`].
pub struct ProcessGroup {
    #[cfg_attr(not(tuner_c10d), allow(dead_code))]
    ptr: *mut std::os::raw::c_void,
    pub backend: Backend,
    pub timeout: Duration,
}

impl ProcessGroup {
    /// Join the group as `rank` of `world`; collectives that take longer than `timeout` fail
    /// (NCCL: its watchdog aborts the communicator and ends the process).
    #[cfg_attr(not(tuner_c10d), allow(unused_variables))]
    pub fn new(store: &Store, rank: usize, world: usize, backend: Backend, timeout: Duration) -> Result<ProcessGroup> {
        #[cfg(tuner_c10d)]
        {
            let mut err = std::ptr::null_mut();
            let ptr = unsafe {
                ffi::tuner_c10d_group(
                    store.ptr,
                    rank as i32,
                    world as i32,
                    (backend == Backend::Nccl) as i32,
                    ms(timeout),
                    &mut err,
                )
            };
            if ptr.is_null() {
                bail!("cannot create the {} process group (rank {rank} of {world}): {}", backend.name(), take_err(err));
            }
            Ok(ProcessGroup { ptr, backend, timeout })
        }
        #[cfg(not(tuner_c10d))]
        unavailable()
    }

    /// Sum each tensor in place across ranks (one collective per tensor, all in flight together).
    #[cfg_attr(not(tuner_c10d), allow(unused_variables))]
    pub fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()> {
        #[cfg(tuner_c10d)]
        {
            let ptrs: Vec<*mut std::os::raw::c_void> = tensors.iter_mut().map(|t| t.as_mut_ptr().cast()).collect();
            let mut err = std::ptr::null_mut();
            let rc = unsafe { ffi::tuner_c10d_allreduce_sum(self.ptr, ptrs.as_ptr(), ptrs.len() as i32, &mut err) };
            check(rc, err, &format!("{} all-reduce", self.backend.name()))
        }
        #[cfg(not(tuner_c10d))]
        unavailable()
    }

    /// Overwrite `t` on every rank with rank `root`'s.
    #[cfg_attr(not(tuner_c10d), allow(unused_variables))]
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        #[cfg(tuner_c10d)]
        {
            let mut err = std::ptr::null_mut();
            let rc = unsafe { ffi::tuner_c10d_broadcast(self.ptr, t.as_mut_ptr().cast(), root as i32, &mut err) };
            check(rc, err, &format!("{} broadcast", self.backend.name()))
        }
        #[cfg(not(tuner_c10d))]
        unavailable()
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        #[cfg(tuner_c10d)]
        unsafe {
            ffi::tuner_c10d_group_free(self.ptr)
        }
    }
}
