//! The pipeline's stages, one module each, behind [`crate::pipeline::Stage`].

pub mod evaluate;
pub mod export;
pub mod fetch;
pub mod tokenize;
pub mod train;
