//! The pipeline's stages, one module each, behind [`crate::pipeline::Stage`], and the one
//! list of them ([`all`]) that `tuner run`, `tuner status` and the multi-process follower walk.
//! Each stage does four things: its fingerprint inputs, resolving its inputs from the run dir
//! (the records of the stages before it), calling the library with typed inputs, and
//! recording its artifacts. Only this module and `pipeline` know the run folder's layout.

pub mod evaluate;
pub mod export;
pub mod fetch;
pub mod tokenize;
pub mod train;

use crate::dist::Command;
use crate::pipeline::{RunContext, Stage};
use anyhow::{anyhow, bail, Result};

/// The stages in order.
pub fn all() -> Vec<Box<dyn Stage>> {
    vec![
        Box::new(fetch::Fetch),
        Box::new(tokenize::Tokenize),
        Box::new(train::Train),
        Box::new(evaluate::Evaluate),
        Box::new(export::Export),
    ]
}

/// A rank other than 0: run the stages rank 0 announces (those whose `distributed()` is
/// true) until it says the run is over. Writes nothing; rank 0 writes every file.
pub fn follow(ctx: &RunContext) -> Result<()> {
    let d = ctx.dist.as_ref().ok_or_else(|| anyhow!("not a multi-process run"))?;
    let stages = all();
    loop {
        match d.next_command()? {
            Command::Stage { name, fingerprint } => {
                let stage = stages
                    .iter()
                    .find(|s| s.name() == name && s.distributed())
                    .ok_or_else(|| anyhow!("rank 0 asked to join stage {name:?}, which is not a distributed stage"))?;
                stage.run(ctx, &ctx.stage_dir(&name), &fingerprint)?;
            }
            Command::Exit { ok } => {
                d.ack_exit()?;
                if !ok {
                    bail!("rank 0 failed (see its messages); rank {} stops too", d.world.rank);
                }
                return Ok(());
            }
        }
    }
}
