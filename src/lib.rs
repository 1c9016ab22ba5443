//! tuner: fine-tune open LLMs (LoRA and QLoRA) from declarative TOML recipes.
//!
//! The pipeline is fetch → tokenize → train → evaluate → export; each stage is a
//! module under `stages/` behind the small [`pipeline::Stage`] trait. The recipe
//! structs in [`recipe`] are the one source of configuration.

pub mod cli;
pub mod data;
pub mod device_mem;
pub mod dist;
pub mod error;
pub mod evaluate;
pub mod export;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod import;
pub mod kernels;
pub mod model;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod quant;
pub mod recipe;
pub mod score;
pub mod serve;
pub mod stages;
pub mod train;
pub mod util;
pub mod verify;
