//! Data parallel training over several processes, one per GPU, on libtorch's own c10d
//! (the engine under `torch.distributed`): NCCL for the collectives on CUDA, gloo on the
//! CPU (what the tests use), rendezvous through a c10d store (torchrun's TCPStore on
//! MASTER_ADDR:MASTER_PORT, or a FileStore in the run dir for `tuner run --gpus N`).
//!
//! Follows torch DDP's recipe, written out for LoRA (torch/nn/parallel/distributed.py,
//! torch/distributed/run.py):
//! - every rank holds the same base and adapter; each optimizer step's
//!   `micro_batch_size × gradient_accumulation_steps × world_size` micro-batches are drawn
//!   from one shared data cursor and rank r trains the r-th block of them;
//! - after backward, one small all-reduce sums (NLL, trained tokens, tokens, stop flag);
//!   each rank's gradients (normalised by its own trained tokens in `train::step`) are
//!   re-weighted by local/global trained tokens and summed in flat buckets of at most
//!   25 MiB (DDP's `bucket_cap_mb`), so the step's loss stays Σ NLL / Σ trained tokens over
//!   the whole world, exactly as on one process. LoRA gradients are small, so the
//!   buckets go after the backward, not overlapped with it;
//! - rank 0 is the leader: it runs the pipeline (fetch and tokenize once, train and
//!   evaluate with the others, export alone) and tells the other ranks, through the store,
//!   which stage to join ([`Dist::announce`], [`Dist::next_command`]); it alone writes files.
//!
//! Submodules: `env` (torchrun/Slurm/launcher variables), `c10d` (the bindings),
//! `launch` (`--gpus N`: one worker per GPU, stop all when one dies).

pub mod c10d;
pub mod env;
pub mod launch;

use crate::recipe::DeviceSpec;
use anyhow::{anyhow, bail, Result};
use c10d::{Backend, ProcessGroup, Store};
use env::{Rendezvous, WorldEnv};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// What the leader tells the other ranks to do next, sent through the store as JSON.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// Run the stage `name` (one whose `Stage::distributed` is true) for this fingerprint.
    Stage { name: String, fingerprint: String },
    /// The run is over; `ok` says whether rank 0 finished it.
    Exit { ok: bool },
}

// SAFETY: c10d stores and process groups are thread-safe C++ objects (torch.distributed
// calls them from several threads); the handles are only freed on drop.
unsafe impl Send for Store {}
unsafe impl Sync for Store {}
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

/// Gradient bucket size: torch DDP's default `bucket_cap_mb` (25 MiB).
pub const BUCKET_BYTES: i64 = 25 << 20;

/// A joined process group and the device this rank trains on.
pub struct Dist {
    pub world: WorldEnv,
    pub device: Device,
    store: Store,
    group: ProcessGroup,
    /// Counter for [`Dist::agree`] / [`Dist::gather_json`] keys (every rank calls them in the same order).
    seq: AtomicU64,
    /// Counter for the leader's stage commands.
    cmd: AtomicU64,
}

/// The device and backend of rank `local_rank` for `train.device`.
pub fn device_for(setting: DeviceSpec, local_rank: usize) -> Result<(Device, Backend)> {
    let cuda = tch::Cuda::is_available();
    match setting {
        DeviceSpec::Cpu => Ok((Device::Cpu, Backend::Gloo)),
        DeviceSpec::Auto if !cuda => Ok((Device::Cpu, Backend::Gloo)),
        s => {
            if !cuda {
                bail!("train.device = \"{s}\" but no CUDA device is visible");
            }
            let n = tch::Cuda::device_count() as usize;
            if local_rank >= n {
                bail!("local rank {local_rank} needs cuda:{local_rank}, but only {n} CUDA device(s) are visible");
            }
            Ok((Device::Cuda(local_rank), Backend::Nccl))
        }
    }
}

/// The dropout seed of `rank`: rank 0 keeps the run's seed (so a world of one is unchanged),
/// the others draw their own masks.
pub fn dropout_seed(seed: u64, rank: usize) -> u64 {
    if rank == 0 {
        return seed;
    }
    crate::data::SplitMix64(seed ^ (rank as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64()
}

/// Rank `rank`'s micro-batches among the `per_rank × world` of one optimizer step:
/// the `rank`-th contiguous block (a partition of the step's micro-batches).
pub fn shard_range(rank: usize, per_rank: usize) -> std::ops::Range<usize> {
    rank * per_rank..(rank + 1) * per_rank
}

/// Exit with `code`. A worker of a multi-process run (`WORLD_SIZE` or `SLURM_NTASKS` > 1) leaves without running
/// exit-time destructors: tearing down an NCCL process group while a peer is still inside a
/// collective can block, and the launcher must see the exit to stop the others.
pub fn exit(code: i32) -> ! {
    let many = |k: &str| std::env::var(k).ok().and_then(|w| w.parse::<usize>().ok()).is_some_and(|w| w > 1);
    if many("WORLD_SIZE") || many("SLURM_NTASKS") {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: ends the process; nothing runs after it.
        unsafe { libc::_exit(code) }
    }
    std::process::exit(code)
}

impl Dist {
    /// Rendezvous and join the process group; collectives time out after `timeout`. From here
    /// on a panic ends the process at once (after its message), for the reason given at [`exit`].
    pub fn connect(world: WorldEnv, device_setting: DeviceSpec, timeout: Duration) -> Result<Dist> {
        if world.world_size > 1 {
            let report = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                report(info);
                // SAFETY: ends the process; nothing runs after it.
                unsafe { libc::_exit(101) }
            }));
        }
        let (device, backend) = device_for(device_setting, world.local_rank)?;
        if let Device::Cuda(i) = device {
            c10d::set_cuda_device(i)?;
        }
        let store = match &world.rendezvous {
            Rendezvous::File(p) => Store::file(p, world.world_size, timeout)?,
            Rendezvous::Tcp { host, port, serve, prefix } => {
                Store::tcp(host, *port, *serve, world.world_size, timeout, prefix)?
            }
        };
        let group = ProcessGroup::new(&store, world.rank, world.world_size, backend, timeout)?;
        let where_ = match &world.rendezvous {
            Rendezvous::File(p) => format!("file {}", p.display()),
            Rendezvous::Tcp { host, port, serve, .. } => {
                format!("tcp://{host}:{port}{}", if *serve { " (serving)" } else { "" })
            }
        };
        // One write of the whole line: the ranks share stderr, and a line written in pieces
        // interleaves with another rank's.
        let line = format!(
            "dist: rank {} of {} (local rank {} of {}, launched by {}), {} on {:?}, rendezvous {where_}, collective timeout {}s\n",
            world.rank,
            world.world_size,
            world.local_rank,
            world.local_world_size,
            world.launcher,
            backend.name(),
            device,
            timeout.as_secs()
        );
        {
            use std::io::Write;
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
        Ok(Dist { world, device, store, group, seq: AtomicU64::new(0), cmd: AtomicU64::new(0) })
    }

    /// Rank 0.
    pub fn is_leader(&self) -> bool {
        self.world.rank == 0
    }

    /// The collective backend.
    pub fn backend(&self) -> Backend {
        self.group.backend
    }

    /// The collective timeout.
    pub fn timeout(&self) -> Duration {
        self.group.timeout
    }

    /// A value decided by rank 0 and handed to every rank: the leader runs `decide`; an
    /// error there becomes an error on every rank ("rank 0 stopped: …").
    pub fn agree(&self, what: &str, decide: impl FnOnce() -> Result<String>) -> Result<String> {
        let key = format!("agree/{}/{what}", self.seq.fetch_add(1, Ordering::SeqCst));
        if self.is_leader() {
            let v = decide();
            let wire = match &v {
                Ok(s) => format!("ok:{s}"),
                Err(e) => format!("err:{e:#}"),
            };
            self.store.set(&key, wire.as_bytes())?;
            return v;
        }
        let wire = String::from_utf8_lossy(&self.store.get(&key, self.timeout())?).into_owned();
        match wire.split_once(':') {
            Some(("ok", v)) => Ok(v.to_string()),
            Some((_, msg)) => Err(anyhow!("rank 0 stopped: {msg}")),
            None => bail!("store key `{key}`: unexpected value {wire:?}"),
        }
    }

    /// Every rank's `mine`, on the leader (rank order); None on the others.
    pub fn gather_json(&self, what: &str, mine: &serde_json::Value) -> Result<Option<Vec<serde_json::Value>>> {
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        self.store.set(&format!("gather/{n}/{what}/{}", self.world.rank), mine.to_string().as_bytes())?;
        if !self.is_leader() {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(self.world.world_size);
        for r in 0..self.world.world_size {
            let bytes = self.store.get(&format!("gather/{n}/{what}/{r}"), self.timeout())?;
            out.push(serde_json::from_slice(&bytes)?);
        }
        Ok(Some(out))
    }

    /// Leader: tell the other ranks what to do next.
    pub fn announce(&self, command: &Command) -> Result<()> {
        let n = self.cmd.fetch_add(1, Ordering::SeqCst);
        self.store.set(&format!("cmd/{n}"), serde_json::to_string(command)?.as_bytes())
    }

    /// Leader: tell the other ranks the run is over (`ok` or not). After a success, wait
    /// (up to the collective timeout) until each has read it: a TCPStore lives in rank 0's
    /// process, so rank 0 must not exit before the others are told. After a failure, do
    /// not wait: the others may be inside a collective, which fails once rank 0 is gone.
    pub fn finish(&self, ok: bool) -> Result<()> {
        self.announce(&Command::Exit { ok })?;
        if !ok {
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        while self.store.add("exit-ack", 0)? < self.world.world_size as i64 - 1 {
            if t0.elapsed() > self.timeout() {
                bail!("not every rank confirmed the end of the run within {}s", self.timeout().as_secs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Follower: wait for the leader's next command, however long fetch and tokenize take
    /// (the store fails, and so does this, when the leader's TCPStore goes away).
    pub fn next_command(&self) -> Result<Command> {
        let key = format!("cmd/{}", self.cmd.fetch_add(1, Ordering::SeqCst));
        while !self.store.check(&key)? {
            std::thread::sleep(Duration::from_millis(50));
        }
        let bytes = self.store.get(&key, self.timeout())?;
        serde_json::from_slice(&bytes)
            .map_err(|e| anyhow!("unexpected command {:?} from rank 0: {e}", String::from_utf8_lossy(&bytes)))
    }

    /// Follower: confirm that the leader's `Exit` was read (see [`Dist::finish`]).
    pub fn ack_exit(&self) -> Result<()> {
        self.store.add("exit-ack", 1)?;
        Ok(())
    }

    /// Sum `v` across ranks (f64, on this rank's device).
    pub fn all_reduce_f64(&self, v: &mut [f64]) -> Result<()> {
        let mut t = [Tensor::from_slice(v).to_device(self.device)];
        self.group.all_reduce_sum(&mut t)?;
        let back: Vec<f64> = Vec::<f64>::try_from(t[0].to_device(Device::Cpu))?;
        v.copy_from_slice(&back);
        Ok(())
    }

    /// Rank 0's values of `params`, on every rank.
    pub fn broadcast_params(&self, params: &[Tensor]) -> Result<()> {
        let _g = tch::no_grad_guard();
        for p in params {
            let mut t = p.detach();
            self.group.broadcast(&mut t, 0)?;
        }
        Ok(())
    }

    /// Σ over ranks of `weight × grad` for every parameter, in place, through flat buckets
    /// of at most [`BUCKET_BYTES`] per gradient dtype. Returns the number of buckets.
    pub fn all_reduce_grads(&self, params: &[Tensor], weight: f64) -> Result<usize> {
        // A rank whose micro-batches trained no token ran no backward: give it zero gradients.
        let missing: Vec<Tensor> =
            params.iter().filter(|p| !p.grad().defined()).map(|p| (p * 0.0).sum(Kind::Float)).collect();
        if !missing.is_empty() {
            Tensor::stack(&missing, 0).sum(Kind::Float).backward();
        }
        let _g = tch::no_grad_guard();
        let grads: Vec<Tensor> = params.iter().map(Tensor::grad).collect();
        let plan = buckets(
            &grads
                .iter()
                .map(|g| (g.kind(), g.numel() as i64 * g.kind().elt_size_in_bytes() as i64))
                .collect::<Vec<_>>(),
            BUCKET_BYTES,
        );
        let mut flats: Vec<Tensor> = plan
            .iter()
            .map(|idx| {
                let parts: Vec<Tensor> = idx.iter().map(|&i| grads[i].reshape([-1])).collect();
                let flat = Tensor::cat(&parts, 0);
                if weight != 1.0 {
                    flat * weight
                } else {
                    flat
                }
            })
            .collect();
        self.group.all_reduce_sum(&mut flats)?;
        for (idx, flat) in plan.iter().zip(&flats) {
            let mut off = 0;
            for &i in idx {
                let n = grads[i].numel() as i64;
                let mut g = grads[i].shallow_clone();
                g.copy_(&flat.narrow(0, off, n).view_as(&grads[i]));
                off += n;
            }
        }
        Ok(plan.len())
    }
}

/// Buckets of tensor indices: same dtype, in order, at most `cap` bytes each (a tensor
/// larger than `cap` gets a bucket of its own).
pub fn buckets(items: &[(Kind, i64)], cap: i64) -> Vec<Vec<usize>> {
    let mut kinds: Vec<Kind> = vec![];
    for (k, _) in items {
        if !kinds.contains(k) {
            kinds.push(*k);
        }
    }
    let mut out = vec![];
    for k in kinds {
        let (mut cur, mut bytes) = (vec![], 0i64);
        for (i, (kind, b)) in items.iter().enumerate().filter(|(_, (kind, _))| *kind == k) {
            let _ = kind;
            if !cur.is_empty() && bytes + b > cap {
                out.push(std::mem::take(&mut cur));
                bytes = 0;
            }
            cur.push(i);
            bytes += b;
        }
        if !cur.is_empty() {
            out.push(cur);
        }
    }
    out
}
