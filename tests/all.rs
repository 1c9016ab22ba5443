//! The one integration test binary (every test binary links libtorch, so there is one).
mod common;
mod executor;
mod gguf;
mod hub;
mod model;
mod quant;
mod plan;
mod recipe;
mod score;
mod tokenize;
mod train;
