//! The one integration test binary (every test binary links libtorch, so there is one).
mod common;
mod evaluate;
mod executor;
mod export;
mod gemma;
mod gguf;
mod hub;
mod model;
mod quant;
mod plan;
mod recipe;
mod score;
mod serve;
mod tokenize;
mod verify;
mod train;
mod generate;
