//! A census of the ops libtorch runs on the host (kernels/op_census.cpp): how many calls each
//! phase of a step issues and how much host time they take, and which ops those are. A
//! debugging aid for passes bound by the host (`TUNER_OP_CENSUS=1`, with
//! `RUST_LOG=tuner::train::step=debug`; docs/benchmarks.md): where the GPU waits on the host, the
//! lever is fewer calls, and this says which.
//!
//! libtorch's RecordFunction callbacks, which the census installs, are process-wide (as
//! torch.profiler's are), so there is one census per process: [`OpCensus::start`] installs it
//! once and returns a handle; every handle reads the same tally.

use anyhow::Result;

/// A handle on the process's op census (made only by [`OpCensus::start`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpCensus(());

/// One op's tally: calls, the calls that were top-level (issued by the program or the autograd
/// engine, not from inside another op), and inclusive host seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct OpRow {
    pub name: String,
    pub calls: u64,
    pub top: u64,
    pub seconds: f64,
}

impl OpCensus {
    /// Start counting (once per process; later calls return a handle on the same census).
    pub fn start() -> Result<OpCensus> {
        imp::start()?;
        Ok(OpCensus(()))
    }

    /// Top-level calls so far and the host seconds spent in them (all threads): what the
    /// program and the autograd engine issued. Differences between two readings give a phase's.
    pub fn totals(&self) -> (u64, f64) {
        imp::totals()
    }

    /// The tally by op since the last reset, most host time first; with `reset`, start afresh.
    pub fn rows(&self, reset: bool) -> Vec<OpRow> {
        let mut rows = imp::rows(reset);
        rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds).then_with(|| a.name.cmp(&b.name)));
        rows
    }
}

/// The `n` rows with the most top-level calls, as a table for the log: calls per pass
/// (`passes` divides the counts), host µs per call, and the share of the top-level host time.
pub fn table(rows: &[OpRow], n: usize, passes: usize) -> String {
    let mut top: Vec<&OpRow> = rows.iter().filter(|r| r.top > 0).collect();
    top.sort_by(|a, b| b.top.cmp(&a.top).then_with(|| a.name.cmp(&b.name)));
    let passes = passes.max(1) as f64;
    let mut out = format!("{:>9} {:>8}  op (top-level calls per pass, host µs per call)", "calls", "µs");
    for r in top.into_iter().take(n) {
        out.push_str(&format!(
            "\n{:>9.0} {:>8.1}  {}",
            r.top as f64 / passes,
            r.seconds * 1e6 / r.calls.max(1) as f64,
            r.name
        ));
    }
    out
}

#[cfg(tuner_custom_op)]
mod imp {
    use super::OpRow;
    use anyhow::{bail, Result};
    use std::ffi::{c_char, c_int, c_void, CStr};

    type RowFn = extern "C" fn(*mut c_void, *const c_char, u64, u64, u64);

    extern "C" {
        fn tuner_census_start(err: *mut c_char, err_len: c_int) -> c_int;
        fn tuner_census_totals(calls: *mut u64, ns: *mut u64);
        fn tuner_census_rows(sink: *mut c_void, row: RowFn, reset: c_int);
    }

    pub fn start() -> Result<()> {
        let mut err = [0 as c_char; 512];
        // SAFETY: the shim writes at most `err.len()` bytes, NUL-terminated.
        if unsafe { tuner_census_start(err.as_mut_ptr(), err.len() as c_int) } != 0 {
            // SAFETY: as above.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
            bail!("op census: cannot install libtorch's RecordFunction callbacks: {msg}");
        }
        Ok(())
    }

    pub fn totals() -> (u64, f64) {
        let (mut calls, mut ns) = (0u64, 0u64);
        // SAFETY: two valid out-pointers.
        unsafe { tuner_census_totals(&mut calls, &mut ns) };
        (calls, ns as f64 * 1e-9)
    }

    extern "C" fn push(sink: *mut c_void, name: *const c_char, calls: u64, top: u64, ns: u64) {
        // SAFETY: `sink` is the `Vec<OpRow>` `rows` passed, alive for the call; `name` is a
        // NUL-terminated string the shim owns for the duration of this callback.
        let (rows, name) = unsafe { (&mut *(sink as *mut Vec<OpRow>), CStr::from_ptr(name)) };
        rows.push(OpRow { name: name.to_string_lossy().into_owned(), calls, top, seconds: ns as f64 * 1e-9 });
    }

    pub fn rows(reset: bool) -> Vec<OpRow> {
        let mut rows: Vec<OpRow> = Vec::new();
        // SAFETY: `push` receives `&mut rows` back as `sink`, only during this call.
        unsafe { tuner_census_rows(&mut rows as *mut Vec<OpRow> as *mut c_void, push, reset as c_int) };
        rows
    }
}

#[cfg(not(tuner_custom_op))]
mod imp {
    use super::OpRow;
    use anyhow::{bail, Result};

    pub fn start() -> Result<()> {
        bail!("op census: this build has no libtorch host shims (kernels/op_census.cpp was not compiled)")
    }

    pub fn totals() -> (u64, f64) {
        (0, 0.0)
    }

    pub fn rows(_reset: bool) -> Vec<OpRow> {
        Vec::new()
    }
}
