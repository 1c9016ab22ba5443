//! The recipe structs: one serde struct per TOML section, with every default.
//! These are the one source of configuration; `recipe::load` validates them once
//! and the stages only read them. Field names are the TOML keys users write.

use serde::{Deserialize, Serialize};

/// A whole recipe, as written in a `.toml` file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    pub run: RunSection,
    pub model: ModelSection,
    pub quantization: QuantizationSection,
    pub lora: LoraSection,
    pub prompt: PromptSection,
    pub dataset: DatasetSection,
    pub train: TrainSection,
    pub eval: EvalSection,
    pub export: ExportSection,
}

/// `[run]`: naming, seeding and where runs go.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// Run name; the run dir is `<output_dir>/<name>`.
    pub name: String,
    /// Seed for shuffling, splitting, LoRA init and dropout.
    pub seed: u64,
    /// Folder that holds run dirs (relative to the recipe's folder).
    pub output_dir: String,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection { name: String::new(), seed: 42, output_dir: "runs".into() }
    }
}

/// Compute / storage dtype.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// bf16 where the device supports it, else fp32 (CPU).
    #[default]
    Auto,
    Bf16,
    Fp16,
    Fp32,
}

/// `[model]`: which base model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// `hf:ORG/NAME`, a local HF folder, or a `.gguf` file.
    pub source: String,
    /// Hub revision (branch, tag or commit) for `hf:` sources.
    pub revision: String,
    pub dtype: Dtype,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection { source: String::new(), revision: "main".into(), dtype: Dtype::Auto }
    }
}

/// Base-weight quantization method.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum QuantMethod {
    None,
    #[default]
    Nf4,
    Fp4,
}

/// `[quantization]`: how the frozen base is stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QuantizationSection {
    pub method: QuantMethod,
    /// Quantize the absmax values too (8-bit, blocks of 256).
    pub double_quant: bool,
    /// Elements per absmax block.
    pub block_size: u64,
}

impl Default for QuantizationSection {
    fn default() -> Self {
        QuantizationSection { method: QuantMethod::Nf4, double_quant: true, block_size: 64 }
    }
}

/// `lora.target_modules`: a list of names, `"all-linear"`, or a regex over module paths.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::List(
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        )
    }
}

/// `[lora]`: the adapters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    pub r: u64,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: TargetModules,
    /// Scale by alpha/√r instead of alpha/r.
    pub use_rslora: bool,
    /// Only "none" is supported (as in the Unsloth guide).
    pub bias: LoraBias,
}

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            target_modules: TargetModules::default(),
            use_rslora: false,
            bias: LoraBias::None,
        }
    }
}

/// `[prompt]`: how a dataset row becomes text.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PromptSection {
    /// "alpaca", "chatml", "chat" (the tokenizer's Jinja template) or an inline
    /// format string with `{field}` slots; the response starts at `{<output_field>}`.
    pub template: crate::recipe::PromptTemplate,
    pub instruction_field: String,
    pub input_field: String,
    pub output_field: String,
    pub messages_field: String,
    /// Optional system prompt for "chatml" and "chat".
    pub system: String,
    /// Mask prompt tokens out of the loss (labels -100).
    pub train_on_responses_only: bool,
    /// Append EOS to every response, trained. Chat templates ("chat", "chatml") end responses
    /// with their own end-of-turn token instead, which is trained either way.
    pub add_eos: bool,
}

impl Default for PromptSection {
    fn default() -> Self {
        PromptSection {
            template: crate::recipe::PromptTemplate::Alpaca,
            instruction_field: "instruction".into(),
            input_field: "input".into(),
            output_field: "output".into(),
            messages_field: "messages".into(),
            system: String::new(),
            train_on_responses_only: true,
            add_eos: true,
        }
    }
}

/// What to do with a malformed dataset row.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnBadRow {
    #[default]
    Error,
    Skip,
}

/// `[dataset]`: where rows come from and how they are split.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatasetSection {
    /// A local .jsonl/.json/.csv/.parquet/.arrow file or folder, or `hf:ORG/NAME`.
    pub source: String,
    /// Split, with an optional slice as in HF datasets (`train[:10%]`, `train[100:200]`): the
    /// hub split to fetch (`hf:` sources); the slice applies to local files too.
    pub split: crate::recipe::SplitSpec,
    /// Hub revision (for `hf:` sources).
    pub revision: String,
    /// Hub dataset config name, if the repo has several.
    pub config: String,
    /// A separate eval set (same kinds of source as `source`).
    pub eval_source: String,
    /// The split (and slice) of `eval_source`; default: `split`'s name, unsliced.
    pub eval_split: Option<crate::recipe::SplitSpec>,
    /// Or: hold out this fraction of `source` for eval.
    pub eval_ratio: Option<f64>,
    /// Use at most this many training rows (after shuffling).
    pub max_samples: Option<u64>,
    pub shuffle: bool,
    pub on_bad_row: OnBadRow,
    /// Rows per Arrow shard written by the tokenize stage.
    pub shard_rows: u64,
    /// How rows are read: "auto", "alpaca", "text", "messages" (OpenAI) or "sharegpt".
    pub format: crate::recipe::DataFormat,
    /// Plain-text rows: the field trained whole (TRL's `dataset_text_field`); implies format "text".
    pub text_field: Option<String>,
    /// A mixture: several sources instead of `source`, each with its own format, split and weight.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<crate::recipe::SourceEntry>,
}

impl Default for DatasetSection {
    fn default() -> Self {
        DatasetSection {
            source: String::new(),
            split: crate::recipe::SplitSpec::default(),
            revision: "main".into(),
            config: String::new(),
            eval_source: String::new(),
            eval_split: None,
            eval_ratio: None,
            max_samples: None,
            shuffle: true,
            on_bad_row: OnBadRow::Error,
            shard_rows: 1000,
            format: crate::recipe::DataFormat::Auto,
            text_field: None,
            sources: vec![],
        }
    }
}

/// Learning-rate schedule after warmup (`train::schedule` has the formulas).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LrScheduler {
    #[default]
    Linear,
    Cosine,
    /// The warmup, then the base rate (transformers' `constant_with_warmup`, also read under that
    /// name; transformers' own `constant` has no warmup: `warmup_steps = 0` gives it).
    #[serde(alias = "constant_with_warmup")]
    Constant,
    /// Cosine from the base rate down to a floor, `train.min_lr` or `train.min_lr_rate`
    /// (transformers' `cosine_with_min_lr`).
    #[serde(rename = "cosine_with_min_lr")]
    CosineWithMinLr,
}

/// Optimizer for the adapter weights. Read from tuner's names or the names transformers and
/// Axolotl give the same update ([`OPTIMIZER_NAMES`]); written back as tuner's name.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(try_from = "String", into = "String")]
pub enum Optimizer {
    Adamw,
    #[default]
    Adamw8bit,
}

/// Every name `train.optimizer` accepts: (name, what runs, a note when it is not the same thing
/// as the tool that named it does). tuner's two names come first.
pub const OPTIMIZER_NAMES: [(&str, Optimizer, Option<&str>); 7] = [
    ("adamw", Optimizer::Adamw, None),
    ("adamw_8bit", Optimizer::Adamw8bit, None),
    // transformers' torch.optim.AdamW, loop or fused kernel: the same update, fp32 states.
    ("adamw_torch", Optimizer::Adamw, None),
    ("adamw_torch_fused", Optimizer::Adamw, None),
    // bitsandbytes' AdamW8bit: blockwise 8-bit states (256 per block, dynamic maps).
    ("adamw_bnb_8bit", Optimizer::Adamw8bit, None),
    (
        "paged_adamw_8bit",
        Optimizer::Adamw8bit,
        Some("runs as adamw_8bit, without paging: the states stay in device memory (LoRA states are small; bitsandbytes pages them to host memory only under memory pressure)"),
    ),
    (
        "paged_adamw_32bit",
        Optimizer::Adamw,
        Some("runs as adamw (fp32 states), without paging: the states stay in device memory (LoRA states are small; bitsandbytes pages them to host memory only under memory pressure)"),
    ),
];

impl Optimizer {
    /// tuner's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Optimizer::Adamw => "adamw",
            Optimizer::Adamw8bit => "adamw_8bit",
        }
    }

    /// The optimizer a name of [`OPTIMIZER_NAMES`] runs, and the note that goes with it.
    pub fn from_name(s: &str) -> Option<(Optimizer, Option<&'static str>)> {
        OPTIMIZER_NAMES.iter().find(|(n, _, _)| *n == s).map(|(_, o, note)| (*o, *note))
    }
}

impl TryFrom<String> for Optimizer {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match Optimizer::from_name(&s) {
            Some((o, _)) => Ok(o),
            None => {
                let names: Vec<String> = OPTIMIZER_NAMES.iter().map(|(n, _, _)| format!("{n:?}")).collect();
                // The ", expected …" form is what recipe validation turns into its message.
                Err(format!("unknown optimizer {s:?}, expected one of {}", names.join(", ")))
            }
        }
    }
}

impl From<Optimizer> for String {
    fn from(o: Optimizer) -> String {
        o.name().to_string()
    }
}

/// A feature that is on, off, or decided by tuner (`train.coalesce`, `train.offload_activations`;
/// each field's doc says what "auto" decides).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    #[default]
    Auto,
    On,
    Off,
}

/// `train.device` and `--device`: "auto" (CUDA when libtorch sees a GPU, else the CPU), "cpu",
/// "cuda" (the first GPU) or "cuda:N". Written back as the same string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    #[default]
    Auto,
    Cpu,
    /// `cuda` (None) or `cuda:N`.
    Cuda(Option<usize>),
}

impl DeviceSpec {
    /// The libtorch device this names (for "auto": CUDA 0 when available, else the CPU).
    pub fn resolve(self) -> tch::Device {
        match self {
            DeviceSpec::Auto => tch::Device::cuda_if_available(),
            DeviceSpec::Cpu => tch::Device::Cpu,
            DeviceSpec::Cuda(n) => tch::Device::Cuda(n.unwrap_or(0)),
        }
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(None)),
            other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
                Some(n) => Ok(DeviceSpec::Cuda(Some(n))),
                // The ", expected …" form is what recipe validation turns into its message.
                None => Err(format!("invalid device {other:?}, expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"")),
            },
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(None) => f.write_str("cuda"),
            DeviceSpec::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

/// `lora.bias`: which biases train. Only "none" (as in the Unsloth guide and PEFT's default).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LoraBias {
    #[default]
    None,
}

/// `eval.metrics`: task metrics over the generations.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// The generation equals the expected response (trimmed).
    ExactMatch,
    /// The share of the expected JSON object's fields the generation gets right.
    JsonFields,
}

impl Metric {
    /// The name used in the recipe and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Metric::ExactMatch => "exact_match",
            Metric::JsonFields => "json_fields",
        }
    }
}

/// `export.merged_dtype`: how the merged model's floating-point tensors are stored.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum MergedDtype {
    #[default]
    Bf16,
    Fp16,
    Fp32,
}

impl MergedDtype {
    /// The recipe name (`bf16`, `fp16`, `fp32`).
    pub fn name(self) -> &'static str {
        match self {
            MergedDtype::Bf16 => "bf16",
            MergedDtype::Fp16 => "fp16",
            MergedDtype::Fp32 => "fp32",
        }
    }

    /// The libtorch kind stored.
    pub fn kind(self) -> tch::Kind {
        match self {
            MergedDtype::Bf16 => tch::Kind::BFloat16,
            MergedDtype::Fp16 => tch::Kind::Half,
            MergedDtype::Fp32 => tch::Kind::Float,
        }
    }
}

/// `export.gguf`: the tensor type of a GGUF file's 2-D weights.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum GgufType {
    /// IEEE half.
    #[serde(rename = "f16")]
    F16,
    /// Q8_0 blocks (32 int8 values and an f16 scale).
    #[serde(rename = "q8_0")]
    Q8_0,
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the output and some attn_v / ffn_down.
    #[serde(rename = "q4_k_m")]
    Q4KM,
}

/// `[train]`: the training loop.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub max_seq_length: u64,
    pub micro_batch_size: u64,
    pub gradient_accumulation_steps: u64,
    /// Optimizer steps; takes precedence over `epochs`.
    pub max_steps: Option<u64>,
    pub epochs: Option<f64>,
    pub learning_rate: f64,
    pub warmup_steps: u64,
    /// Warm up over `ceil(total steps × warmup_ratio)` steps instead of `warmup_steps`
    /// (transformers' rule); set one of the two.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_ratio: Option<f64>,
    pub lr_scheduler: LrScheduler,
    /// `cosine_with_min_lr`'s floor as a learning rate (transformers' `min_lr`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_lr: Option<f64>,
    /// `cosine_with_min_lr`'s floor as a fraction of `learning_rate` (transformers' `min_lr_rate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_lr_rate: Option<f64>,
    pub optimizer: Optimizer,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub gradient_checkpointing: bool,
    pub logging_steps: u64,
    /// Compute the loss on the eval split every this many steps (0: never), into
    /// `metrics.jsonl`'s `eval_loss` and TensorBoard's `eval/loss`.
    #[serde(skip_serializing_if = "is_zero")]
    pub eval_steps: u64,
    /// Print device memory every this many steps (0: never).
    pub memory_log_steps: u64,
    pub save_steps: u64,
    pub keep_checkpoints: u64,
    pub packing: bool,
    /// Pad each batch to a multiple of this (dynamic padding otherwise).
    pub pad_to_multiple_of: u64,
    /// "auto", "cpu" or "cuda[:N]".
    pub device: DeviceSpec,
    /// On a CUDA device, the fast path: the kernels of `kernels/` (4-bit dequantize, RMSNorm,
    /// RoPE, gated activations) and the hand-written layer backward. `false` runs the
    /// reference (torch-op, autograd) path, as on a CPU.
    pub cuda_kernels: bool,
    /// Keep the checkpointed layer inputs in pinned host memory during a step (CUDA, with
    /// gradient checkpointing): "on", "off", or "auto" (on where the host has room:
    /// [`crate::plan::auto_offload`]).
    pub offload_activations: Switch,
    /// Run the rows of a step's micro-batches together as packed varlen passes (one document
    /// per row, no padding; the same loss and gradients): "auto" (on where attention takes the
    /// varlen path: CUDA, bf16/fp16, no attention softcap), "on" or "off". `tuner plan` shows
    /// the choice and the pass size.
    pub coalesce: Switch,
    /// Check each layer's output, the loss and each layer's gradients for NaN/inf at every
    /// step and name where the first one appeared (a device synchronisation per layer; off by
    /// default, when a non-finite loss or gradient re-runs that one step with the checks).
    pub detect_anomaly: bool,
    /// Worker processes, one per GPU of this host (data parallel over NCCL; with
    /// `device = "cpu"`, CPU processes over gloo). 1 trains in this process.
    /// `tuner run --gpus N` overrides it; torchrun/Slurm variables take precedence.
    pub gpus: u64,
    /// With several processes, divide `gradient_accumulation_steps` by their number, so the
    /// effective batch (micro_batch_size × gradient_accumulation_steps × processes) stays
    /// what one process uses. Otherwise the effective batch grows with the processes.
    pub keep_effective_batch: bool,
    /// With several processes: a collective (NCCL or gloo) that waits longer than this on
    /// the other ranks fails, and the run stops.
    pub collective_timeout_s: u64,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            max_seq_length: 2048,
            micro_batch_size: 2,
            gradient_accumulation_steps: 4,
            max_steps: None,
            epochs: None,
            learning_rate: 2e-4,
            warmup_steps: 5,
            warmup_ratio: None,
            lr_scheduler: LrScheduler::Linear,
            min_lr: None,
            min_lr_rate: None,
            optimizer: Optimizer::Adamw8bit,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            gradient_checkpointing: true,
            logging_steps: 1,
            eval_steps: 0,
            memory_log_steps: 10,
            save_steps: 50,
            keep_checkpoints: 2,
            packing: false,
            pad_to_multiple_of: 1,
            device: DeviceSpec::Auto,
            cuda_kernels: true,
            offload_activations: Switch::Auto,
            coalesce: Switch::Auto,
            detect_anomaly: false,
            gpus: 1,
            keep_effective_batch: false,
            collective_timeout_s: 600,
        }
    }
}

/// `[eval]`: the evaluate stage (built by a later issue; accepted now).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Task metrics: "exact_match", "json_fields".
    pub metrics: Vec<Metric>,
    /// Generate for at most this many eval prompts.
    pub max_samples: u64,
    /// The eval loss over at most this many eval rows, the first in split order (0: all).
    #[serde(skip_serializing_if = "is_zero")]
    pub max_loss_rows: u64,
    pub max_new_tokens: u64,
    /// 0 is greedy.
    pub temperature: f64,
    pub batch_size: u64,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            metrics: vec![],
            max_samples: 100,
            max_loss_rows: 0,
            max_new_tokens: 128,
            temperature: 0.0,
            batch_size: 8,
        }
    }
}

/// For `skip_serializing_if`: a key left at 0 stays out of the resolved recipe and fingerprints.
fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// `[export]`: the export stage (built by a later issue; accepted now).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExportSection {
    /// PEFT adapter folder.
    pub adapter: bool,
    /// Merged full model (HF safetensors).
    pub merged: bool,
    /// dtype of the merged model: "bf16" or "fp16".
    pub merged_dtype: MergedDtype,
    /// Merged and re-quantized to NF4 (bnb layout).
    pub nf4: bool,
    /// GGUF files to write: any of "f16", "q8_0", "q4_k_m".
    pub gguf: Vec<GgufType>,
    /// Write an Ollama Modelfile next to the GGUF.
    pub ollama: bool,
    /// Fail the stage if merged loss − adapter loss exceeds this.
    pub max_merge_loss_delta: f64,
}

impl ExportSection {
    /// Whether any format is built from the merged model (merged, nf4, GGUF): the merge and its
    /// quality gate run.
    pub fn needs_merge(&self) -> bool {
        self.merged || self.nf4 || !self.gguf.is_empty()
    }
}

impl Default for ExportSection {
    fn default() -> Self {
        ExportSection {
            adapter: true,
            merged: true,
            merged_dtype: MergedDtype::Bf16,
            nf4: false,
            gguf: vec![],
            ollama: false,
            max_merge_loss_delta: 0.01,
        }
    }
}
