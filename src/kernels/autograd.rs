//! Fused ops with their own backward inside autograd's graph. An op computes its outputs without
//! a graph (a kernel, or its reference under `no_grad`), then [`attach`] makes one autograd node
//! their grad_fn, with the inputs' gradient edges as its next edges and a Rust closure as its
//! backward (kernels/custom_op.cpp). That is how Gemma 3n's checkpointed recomputation, which
//! autograd differentiates, runs the fused AltUp, sparse-GeGLU and RoPE kernels and their
//! hand-written backwards.
//!
//! Follows libtorch's generated `VariableType` code for a built-in op (`collect_next_edges`,
//! `set_history`); the closure plays the role of a derivative formula of `derivatives.yaml`.
//! The tests check each op's node against autograd through its reference.
//!
//! [`backward`] is `torch.autograd.backward(roots, grads)` (the same shim): the backward of a
//! non-scalar output with a given upstream gradient.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::AssertUnwindSafe;

use anyhow::{anyhow, bail, Result};
use tch::Tensor;

/// An op's backward: the gradients of its outputs in (zeros for outputs that received none), one
/// gradient per input out (`None` for inputs that need none).
pub type Backward = Box<dyn FnOnce(Vec<Tensor>) -> Result<Vec<Option<Tensor>>> + Send>;

/// Whether this build has the node (kernels/custom_op.cpp compiled).
pub fn available() -> bool {
    cfg!(tuner_custom_op)
}

/// Make one node named `name` the grad_fn of `outputs` (computed without a graph), with
/// `backward` as its backward. Returns whether a node was attached: not when grad mode is off or
/// no input requires a gradient (then `backward` is dropped).
pub fn attach(name: &str, inputs: &[&Tensor], outputs: &[&Tensor], backward: Backward) -> Result<bool> {
    if outputs.iter().any(|t| t.requires_grad()) {
        bail!("{name}: its outputs must be computed without a graph");
    }
    attach_node(name, inputs, outputs, backward)
}

#[cfg(tuner_custom_op)]
fn attach_node(name: &str, inputs: &[&Tensor], outputs: &[&Tensor], backward: Backward) -> Result<bool> {
    let n_inputs = inputs.len();
    let state = Box::into_raw(Box::new(State { backward: Some(backward), n_inputs })) as *mut c_void;
    let mut ins: Vec<*mut c_void> = inputs.iter().map(|t| t.as_ptr() as *mut c_void).collect();
    let mut outs: Vec<*mut c_void> = outputs.iter().map(|t| t.as_ptr() as *mut c_void).collect();
    let cname = std::ffi::CString::new(name)?;
    let mut err = [0 as c_char; 1024];
    // SAFETY: the pointers are live `at::Tensor*` of tch tensors borrowed for the call; `state`
    // passes to the shim, which drops it exactly once through `drop_state` (at once when no node
    // is attached or on error, else after the backward or with the node).
    let rc = unsafe {
        tuner_custom_op(
            cname.as_ptr(),
            ins.as_mut_ptr(),
            n_inputs as c_int,
            outs.as_mut_ptr(),
            outs.len() as c_int,
            state,
            run_backward,
            drop_state,
            err.as_mut_ptr(),
            err.len() as c_int,
        )
    };
    match rc {
        1 => Ok(true),
        0 => Ok(false),
        _ => {
            // SAFETY: the shim wrote a NUL-terminated message into `err`.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
            bail!("{name}: cannot attach its autograd node: {msg}")
        }
    }
}

#[cfg(not(tuner_custom_op))]
fn attach_node(name: &str, _inputs: &[&Tensor], _outputs: &[&Tensor], _backward: Backward) -> Result<bool> {
    bail!("{name}: this build has no custom autograd node (kernels/custom_op.cpp was not compiled)")
}

/// Autograd's backward from `roots` with upstream gradients `grads` (one each, same shapes):
/// accumulates into the leaves' `.grad` and frees the graph, as `torch.autograd.backward` does.
/// Without the shim, the same through the scalar `Σ (root · grad).sum()`.
pub fn backward(roots: &[&Tensor], grads: &[&Tensor]) -> Result<()> {
    if roots.len() != grads.len() {
        bail!("backward: {} roots but {} gradients", roots.len(), grads.len());
    }
    for (r, g) in roots.iter().zip(grads) {
        if r.size() != g.size() {
            bail!("backward: a root of shape {:?} has a gradient of shape {:?}", r.size(), g.size());
        }
    }
    run_root_backward(roots, grads)
}

#[cfg(tuner_custom_op)]
fn run_root_backward(roots: &[&Tensor], grads: &[&Tensor]) -> Result<()> {
    let mut rs: Vec<*mut c_void> = roots.iter().map(|t| t.as_ptr() as *mut c_void).collect();
    let mut gs: Vec<*mut c_void> = grads.iter().map(|t| t.as_ptr() as *mut c_void).collect();
    let mut err = [0 as c_char; 1024];
    // SAFETY: the pointers are live `at::Tensor*` of tch tensors borrowed for the call; the shim
    // catches every C++ exception and writes a NUL-terminated message on failure.
    let rc = unsafe { tuner_backward(rs.as_mut_ptr(), gs.as_mut_ptr(), rs.len() as c_int, err.as_mut_ptr(), 1024) };
    if rc != 0 {
        // SAFETY: the shim wrote a NUL-terminated message into `err`.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
        bail!("backward: {msg}");
    }
    Ok(())
}

#[cfg(not(tuner_custom_op))]
fn run_root_backward(roots: &[&Tensor], grads: &[&Tensor]) -> Result<()> {
    let mut total: Option<Tensor> = None;
    for (r, g) in roots.iter().zip(grads) {
        let part = (*r * g.to_kind(r.kind())).sum(tch::Kind::Float);
        total = Some(match total {
            Some(t) => t + part,
            None => part,
        });
    }
    if let Some(t) = total {
        t.f_backward()?;
    }
    Ok(())
}

/// What the shim holds for one node.
struct State {
    backward: Option<Backward>,
    n_inputs: usize,
}

type BackwardFn =
    extern "C" fn(*mut c_void, *mut *mut c_void, c_int, *mut *mut c_void, c_int, *mut c_char, c_int) -> c_int;

#[cfg(tuner_custom_op)]
extern "C" {
    fn tuner_custom_op(
        name: *const c_char,
        inputs: *mut *mut c_void,
        n_inputs: c_int,
        outputs: *mut *mut c_void,
        n_outputs: c_int,
        state: *mut c_void,
        bwd: BackwardFn,
        drop: extern "C" fn(*mut c_void),
        err: *mut c_char,
        err_len: c_int,
    ) -> c_int;
    fn tuner_backward(
        roots: *mut *mut c_void,
        grads: *mut *mut c_void,
        n: c_int,
        err: *mut c_char,
        err_len: c_int,
    ) -> c_int;
}

extern "C" fn drop_state(state: *mut c_void) {
    // SAFETY: `state` came from `Box::into_raw` in `attach_node`, and the shim drops it once.
    drop(unsafe { Box::from_raw(state as *mut State) });
}

/// The shim's call into a node's backward: takes ownership of `grads` (new references), hands
/// back one new tensor per input (or null). A panic or an error becomes a message and rc 1.
extern "C" fn run_backward(
    state: *mut c_void,
    grads: *mut *mut c_void,
    n_grads: c_int,
    out: *mut *mut c_void,
    n_out: c_int,
    err: *mut c_char,
    err_len: c_int,
) -> c_int {
    // SAFETY: `state` is the live `State` of this node (the shim holds its lock); `grads` holds
    // `n_grads` new `at::Tensor*` whose ownership passes here.
    let st = unsafe { &mut *(state as *mut State) };
    let grads: Vec<Tensor> =
        (0..n_grads as usize).map(|i| unsafe { Tensor::from_ptr(*grads.add(i) as *mut _) }).collect();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<Vec<Option<Tensor>>> {
        let f = st.backward.take().ok_or_else(|| anyhow!("called twice"))?;
        let v = f(grads)?;
        if v.len() != st.n_inputs || v.len() != n_out as usize {
            bail!("returned {} gradients for {} inputs", v.len(), st.n_inputs);
        }
        Ok(v)
    }));
    let message = match result {
        Ok(Ok(v)) => {
            for (i, g) in v.into_iter().enumerate() {
                if let Some(mut g) = g {
                    // SAFETY: `out` has `n_out` slots; the shim takes ownership of the tensor.
                    unsafe { *out.add(i) = g.as_mut_ptr() as *mut c_void };
                    std::mem::forget(g);
                }
            }
            return 0;
        }
        Ok(Err(e)) => format!("{e:#}"),
        Err(p) => {
            let what = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            format!("panicked: {}", what.unwrap_or_default())
        }
    };
    let bytes = message.as_bytes();
    let n = bytes.len().min(err_len.max(1) as usize - 1);
    // SAFETY: `err` has `err_len` bytes; n + 1 ≤ err_len.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr() as *const c_char, err, n);
        *err.add(n) = 0;
    }
    1
}
