//! The pipeline's stages, one module each, behind [`crate::pipeline::Stage`].

pub mod fetch;
pub mod evaluate;
pub mod export;
pub mod train;
pub mod tokenize;
