//! GGUF, llama.cpp's model file format, both ways.
//!
//! - [`types`]: metadata values, ggml tensor types, tensor infos;
//! - [`read`]: the memory-mapped reader ([`GgufFile`]); [`dequant`]: ggml blocks to f32;
//! - [`write`]: the file types tuner writes ([`GgufType`]), encoders and the v3 writer;
//! - [`kquants`]: llama.cpp's reference K-quant (Q4_K, Q6_K) and Q5_0 quantizers and its
//!   Q4_K_M type choice;
//! - [`arch`]: the architectures ([`GgufArch`]) and llama.cpp's Q/K row permutation;
//! - [`names`]: the one two-way HF ↔ GGUF tensor name table;
//! - [`hparams`]: a model's hyper-parameters as `{arch}.*` key/values;
//! - [`tokenizer`]: `tokenizer.json` ↔ `tokenizer.ggml.*` (byte-level BPE, `gpt2`);
//!   [`spm_vocab`]: SentencePiece vocabularies (`llama`) both ways, [`spm`]: the
//!   `tokenizer.model` reader;
//! - [`export`]: an HF folder → one GGUF file; [`import`]: a GGUF file → an HF folder.
//!
//! Which model family has which architecture is said in the family registry
//! (`model/family.rs`). References: the GGUF specification (ggml `docs/gguf.md`), llama.cpp's
//! `convert_hf_to_gguf.py` and gguf-py (`constants.py`, `tensor_mapping.py`).

pub mod arch;
pub mod dequant;
pub mod export;
pub mod hf_config;
pub mod hparams;
pub mod import;
pub mod kquants;
pub mod names;
pub mod read;
pub mod spm;
pub mod spm_vocab;
pub mod tokenizer;
pub mod types;
pub mod write;

pub use arch::GgufArch;
pub use dequant::{dequantize, supported_list, SUPPORTED_TYPES};
pub use read::GgufFile;
pub use types::{
    GgmlType, GgufArray, GgufMetadata, GgufValue, GgufValueType, TensorInfo, DEFAULT_ALIGNMENT, GGUF_MAGIC,
};
pub use write::GgufType;
