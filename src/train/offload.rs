//! Activation offload: the checkpointed layer inputs go to pinned host memory as the forward
//! makes them, copied on a side stream so the forward does not wait, and come back in the
//! backward one layer ahead of use (double-buffered: the layer being differentiated and the next
//! one's input are on the device, no others). Frees ~`layers × B × T × H × 2` bytes of GPU
//! memory (1 GiB on Llama-3.1-8B at 2 × 2048 tokens) for two PCIe copies per layer that overlap
//! the compute. The copies and events are libtorch's (kernels/side_stream.cpp); the pattern is
//! the one Unsloth's and torchtune's CPU offloading use.

use std::ffi::c_void;

use anyhow::{bail, Result};
use tch::{Device, Tensor};

#[cfg(tuner_cuda_shim)]
extern "C" {
    fn tuner_empty_pinned_like(like: *const c_void) -> *mut c_void;
    fn tuner_empty_device_like(like: *const c_void, device: i32) -> *mut c_void;
    fn tuner_copy_on_side_stream(dst: *mut c_void, src: *const c_void, device: i32) -> *mut c_void;
    fn tuner_event_wait(event: *mut c_void, device: i32) -> i32;
    fn tuner_event_free(event: *mut c_void);
}

/// A CUDA event from the shim, freed on drop.
struct Event(*mut c_void);

impl Drop for Event {
    fn drop(&mut self) {
        #[cfg(tuner_cuda_shim)]
        // SAFETY: an event the shim allocated, freed once.
        unsafe {
            tuner_event_free(self.0)
        }
    }
}

/// Where a layer input is.
enum Slot {
    Empty,
    /// On the host (or on its way there, until the event).
    Host(Tensor, Event),
    /// Back on the device (or on its way, until the event).
    Device(Tensor, Event),
}

/// The layer inputs of one micro-batch, offloaded.
pub struct Offloader {
    ordinal: i32,
    slots: Vec<Slot>,
}

impl Offloader {
    /// An offloader for a CUDA `device`; an error on a CPU or in a build without the CUDA shim.
    pub fn new(device: Device, layers: usize) -> Result<Offloader> {
        let Device::Cuda(i) = device else { bail!("activation offload needs a CUDA device") };
        if !cfg!(tuner_cuda_shim) {
            bail!("this build's libtorch has no CUDA (kernels/side_stream.cpp was not compiled)");
        }
        Ok(Offloader { ordinal: i as i32, slots: (0..layers).map(|_| Slot::Empty).collect() })
    }

    /// Start copying layer `l`'s input `x` to pinned host memory (returns at once).
    pub fn store(&mut self, l: usize, x: &Tensor) {
        let host = self.alloc(x, true);
        let ev = self.copy(&host, x);
        self.slots[l] = Slot::Host(host, ev);
    }

    /// Start bringing layer `l`'s input back (no-op when already back or never stored).
    pub fn prefetch(&mut self, l: usize) {
        if let Slot::Host(host, stored) = &self.slots[l] {
            // The copy back starts after the current stream's work, which then includes the
            // copy out (made on another side stream).
            self.wait(stored);
            let dev = self.alloc(host, false);
            let ev = self.copy(&dev, host);
            self.slots[l] = Slot::Device(dev, ev); // the host copy may go: the event orders its read
        }
    }

    /// Layer `l`'s input on the device; the current stream waits for its copy.
    pub fn take(&mut self, l: usize) -> Tensor {
        self.prefetch(l);
        match std::mem::replace(&mut self.slots[l], Slot::Empty) {
            Slot::Device(t, ev) => {
                self.wait(&ev);
                t
            }
            _ => panic!("layer {l}'s input was never offloaded"),
        }
    }

    fn alloc(&self, like: &Tensor, pinned_host: bool) -> Tensor {
        #[cfg(tuner_cuda_shim)]
        {
            let like = like.as_ptr() as *const c_void;
            // SAFETY: `like` is a live tensor; the shim returns a new heap at::Tensor (or null)
            // whose ownership passes to the returned Tensor.
            let p = unsafe {
                if pinned_host {
                    tuner_empty_pinned_like(like)
                } else {
                    tuner_empty_device_like(like, self.ordinal)
                }
            };
            assert!(
                !p.is_null(),
                "cannot allocate an offload buffer ({})",
                if pinned_host { "pinned host" } else { "device" }
            );
            unsafe { Tensor::from_ptr(p as *mut _) }
        }
        #[cfg(not(tuner_cuda_shim))]
        {
            let _ = (like, pinned_host);
            unreachable!("Offloader::new refuses builds without the CUDA shim")
        }
    }

    fn copy(&self, dst: &Tensor, src: &Tensor) -> Event {
        #[cfg(tuner_cuda_shim)]
        {
            // SAFETY: both tensors are live; the shim keeps their memory from being reused until
            // the copy is done (recordStream) and returns a new event (or null).
            let ev = unsafe {
                tuner_copy_on_side_stream(dst.as_ptr() as *mut c_void, src.as_ptr() as *const c_void, self.ordinal)
            };
            assert!(!ev.is_null(), "side-stream copy failed");
            Event(ev)
        }
        #[cfg(not(tuner_cuda_shim))]
        {
            let _ = (dst, src);
            unreachable!("Offloader::new refuses builds without the CUDA shim")
        }
    }

    fn wait(&self, ev: &Event) {
        #[cfg(tuner_cuda_shim)]
        // SAFETY: a live event from the shim.
        unsafe {
            assert_eq!(tuner_event_wait(ev.0, self.ordinal), 0, "waiting on an offload copy failed");
        }
        #[cfg(not(tuner_cuda_shim))]
        let _ = ev;
    }
}
