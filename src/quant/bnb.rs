//! Reading and writing the tensors transformers saves for a bitsandbytes 4-bit Linear.
//!
//! Reference: docs/model-math.md §4.2 (`Linear4bit._save_to_state_dict` + `QuantState.as_dict(packed=True)`,
//! `QuantState.from_dict`). Keys under `P.weight`: the packed codes, `.absmax`,
//! `.quant_map`, `.nested_absmax`, `.nested_quant_map` (double quant only) and
//! `.quant_state.bitsandbytes__<nf4|fp4>`, the UTF-8 bytes of
//! `json.dumps({"quant_type", "blocksize", "dtype", "shape", ["nested_blocksize",
//! "nested_dtype", "nested_offset"]})` with Python's default separators.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tch::{Kind, Tensor};

use super::blockwise::num_blocks;
use super::tables::dynamic_map;
use super::{Absmax, QuantTensor, QuantType, NESTED_BLOCKSIZE};

/// The quant_state key suffix for a quant type.
fn state_key(prefix: &str, qt: QuantType) -> String {
    format!("{prefix}.weight.quant_state.bitsandbytes__{}", qt.name())
}

/// All the bytes of a tensor (any dtype), flattened row-major, on the tensor's device.
fn as_bytes(t: &Tensor) -> Tensor {
    let flat = t.reshape([-1]).contiguous();
    if flat.kind() == Kind::Uint8 {
        flat
    } else {
        flat.view_dtype(Kind::Uint8)
    }
}

/// Copies a u8 tensor to a Vec.
fn to_vec_u8(t: &Tensor) -> Result<Vec<u8>> {
    let t = as_bytes(t).to_device(tch::Device::Cpu);
    Vec::<u8>::try_from(&t).map_err(|e| anyhow!("{e}"))
}

/// An integer field that may be written as a number (integral float) or a string.
fn json_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A float field that may be written as a number or a string.
fn json_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Parses a torch dtype name as bitsandbytes writes it (`str(dtype).strip("torch.")`).
pub(crate) fn parse_dtype(name: &str) -> Option<Kind> {
    let name = name.trim();
    let name = name.strip_prefix("torch.").unwrap_or(name);
    match name {
        "float32" | "float" => Some(Kind::Float),
        "bfloat16" => Some(Kind::BFloat16),
        "float16" | "half" => Some(Kind::Half),
        "float64" | "double" => Some(Kind::Double),
        _ => None,
    }
}

/// The dtype name bitsandbytes writes for a kind.
pub(crate) fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Double => "float64",
        _ => "float32",
    }
}

/// Python's `repr(float)` (what `json.dumps` writes): shortest round-trip digits, fixed
/// notation for decimal exponents −4..=15, otherwise `d.ddde±XX`.
pub(crate) fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // The fewest significant digits that read back as x, correctly rounded (ties to even,
    // like Python). Rust's own shortest `{:e}` is not used: on an exact tie it rounds up
    // (10.4467315673828125 → "…813" where Python writes "…812").
    let sci = (1..=17)
        .map(|p| format!("{:.*e}", p - 1, x.abs()))
        .find(|s| s.parse::<f64>() == Ok(x.abs()))
        .unwrap_or_else(|| format!("{:.16e}", x.abs()));
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if x < 0.0 { "-" } else { "" };
    let body = if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                format!("{digits}{}.0", "0".repeat(int_len - digits.len()))
            } else {
                format!("{}.{}", &digits[..int_len], &digits[int_len..])
            }
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        }
    } else {
        let frac = &digits[1..];
        let m = if frac.is_empty() { digits[..1].to_string() } else { format!("{}.{frac}", &digits[..1]) };
        format!("{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    };
    format!("{sign}{body}")
}

/// The packed quant_state JSON, exactly as bitsandbytes writes it.
pub(crate) fn quant_state_json(q: &QuantTensor) -> String {
    let shape: Vec<String> = q.shape.iter().map(|d| d.to_string()).collect();
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
        q.quant_type.name(),
        q.blocksize,
        dtype_name(q.dtype),
        shape.join(", ")
    );
    if let Absmax::Nested { offset, blocksize, .. } = &q.absmax {
        s.push_str(&format!(
            ", \"nested_blocksize\": {blocksize}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            py_float_repr(f64::from(*offset))
        ));
    }
    s.push('}');
    s
}

pub(crate) fn to_bnb(q: &QuantTensor, prefix: &str) -> Vec<(String, Tensor)> {
    let cpu = |t: &Tensor| t.to_device(tch::Device::Cpu).contiguous();
    let w = format!("{prefix}.weight");
    let mut out = vec![(w.clone(), cpu(&q.codes).view([-1, 1]))];
    match &q.absmax {
        Absmax::Plain(a) => {
            out.push((format!("{w}.absmax"), cpu(a)));
            out.push((format!("{w}.quant_map"), cpu(&q.quant_map)));
        }
        Absmax::Nested { codes, code, absmax, .. } => {
            out.push((format!("{w}.absmax"), cpu(codes)));
            out.push((format!("{w}.quant_map"), cpu(&q.quant_map)));
            out.push((format!("{w}.nested_absmax"), cpu(absmax)));
            out.push((format!("{w}.nested_quant_map"), cpu(code)));
        }
    }
    let json = quant_state_json(q);
    out.push((state_key(prefix, q.quant_type), Tensor::from_slice(json.as_bytes())));
    out
}

pub(crate) fn from_bnb(prefix: &str, get: &dyn Fn(&str) -> Option<Tensor>) -> Result<Option<QuantTensor>> {
    let mut found: Vec<(QuantType, Tensor)> = [QuantType::Nf4, QuantType::Fp4]
        .into_iter()
        .filter_map(|qt| get(&state_key(prefix, qt)).map(|t| (qt, t)))
        .collect();
    if found.len() > 1 {
        bail!("`{prefix}.weight` has both an nf4 and an fp4 quant_state");
    }
    let Some((key_type, state)) = found.pop() else {
        return Ok(None);
    };
    let context = || format!("reading bnb 4-bit layer `{prefix}`");
    let st = parse_layer(prefix, key_type, &state).with_context(context)?;
    finish(prefix, st, get).with_context(context).map(Some)
}

/// Parsed quant_state JSON.
struct State {
    quant_type: QuantType,
    blocksize: i64,
    dtype: Kind,
    shape: Vec<i64>,
    nested_blocksize: Option<i64>,
    nested_offset: Option<f64>,
}

fn parse_layer(prefix: &str, key_type: QuantType, state: &Tensor) -> Result<State> {
    let bytes = to_vec_u8(state)?;
    let json: Value = serde_json::from_slice(&bytes).context("quant_state is not valid JSON")?;
    let field = |k: &str| json.get(k).filter(|v| !v.is_null());
    let quant_type = match field("quant_type").and_then(Value::as_str) {
        Some(name) => QuantType::from_name(name).ok_or_else(|| anyhow!("unknown quant_type `{name}`"))?,
        None => key_type,
    };
    let blocksize = match field("blocksize") {
        Some(v) => json_i64(v).ok_or_else(|| anyhow!("bad blocksize `{v}`"))?,
        None => {
            log::warn!("`{prefix}`: quant_state has no blocksize, assuming 64");
            64
        }
    };
    if blocksize <= 0 {
        bail!("bad blocksize {blocksize}");
    }
    let dtype = match field("dtype").and_then(Value::as_str) {
        Some(name) => parse_dtype(name).ok_or_else(|| anyhow!("unsupported dtype `{name}`"))?,
        None => {
            log::warn!("`{prefix}`: quant_state has no dtype, assuming float32");
            Kind::Float
        }
    };
    let shape = field("shape")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(json_i64).collect::<Option<Vec<i64>>>())
        .ok_or_else(|| anyhow!("quant_state has no shape"))?
        .ok_or_else(|| anyhow!("bad shape in quant_state"))?;
    if shape.iter().any(|d| *d < 0) || shape.iter().product::<i64>() == 0 {
        bail!("bad shape {shape:?} in quant_state");
    }
    let nested_blocksize = field("nested_blocksize")
        .map(|v| json_i64(v).ok_or_else(|| anyhow!("bad nested_blocksize `{v}`")))
        .transpose()?;
    let nested_offset =
        field("nested_offset").map(|v| json_f64(v).ok_or_else(|| anyhow!("bad nested_offset `{v}`"))).transpose()?;
    if let Some(d) = field("nested_dtype").and_then(Value::as_str) {
        if parse_dtype(d) != Some(Kind::Float) {
            log::warn!("`{prefix}`: nested_dtype `{d}`; reading nested absmax as float32");
        }
    }
    Ok(State { quant_type, blocksize, dtype, shape, nested_blocksize, nested_offset })
}

/// Checks a 1-D length, naming the tensor.
fn expect_len(name: &str, t: &Tensor, want: i64) -> Result<()> {
    let got = t.numel() as i64;
    if got != want {
        bail!("`{name}` has {got} elements, expected {want} (shape {:?})", t.size());
    }
    Ok(())
}

fn finish(prefix: &str, st: State, get: &dyn Fn(&str) -> Option<Tensor>) -> Result<QuantTensor> {
    let w = format!("{prefix}.weight");
    let need = |name: String| get(&name).ok_or_else(|| anyhow!("missing tensor `{name}`"));
    let weight = need(w.clone())?;
    let device = weight.device();
    let n: i64 = st.shape.iter().product();
    let nbytes = (n + 1) / 2;
    let codes = as_bytes(&weight);
    if (codes.numel() as i64) < nbytes {
        bail!("`{w}` holds {} bytes, expected {nbytes} for shape {:?}", codes.numel(), st.shape);
    }
    let codes = codes.narrow(0, 0, nbytes).contiguous();
    let nblocks = num_blocks(n, st.blocksize);

    let quant_map = match get(&format!("{w}.quant_map")) {
        Some(t) => {
            let t = t.to_device(device).to_kind(Kind::Float).reshape([-1]).contiguous();
            expect_len(&format!("{w}.quant_map"), &t, 16)?;
            t
        }
        None => {
            log::warn!("`{w}.quant_map` missing, using the {} table", st.quant_type.name());
            Tensor::from_slice(&st.quant_type.table()).to_device(device)
        }
    };

    let raw_absmax = need(format!("{w}.absmax"))?.to_device(device).reshape([-1]);
    expect_len(&format!("{w}.absmax"), &raw_absmax, nblocks)?;
    let absmax = match get(&format!("{w}.nested_absmax")) {
        None => {
            if !raw_absmax.is_floating_point() {
                bail!("`{w}.absmax` is {:?} but there is no nested_absmax", raw_absmax.kind());
            }
            Absmax::Plain(raw_absmax.to_kind(Kind::Float).contiguous())
        }
        Some(nested) => {
            if raw_absmax.is_floating_point() {
                bail!("`{w}.absmax` is {:?}, expected U8 codes with nested_absmax", raw_absmax.kind());
            }
            let nbs = st.nested_blocksize.unwrap_or(NESTED_BLOCKSIZE);
            if nbs <= 0 {
                bail!("bad nested_blocksize {nbs}");
            }
            let offset =
                st.nested_offset.ok_or_else(|| anyhow!("quant_state has nested_absmax but no nested_offset"))?;
            let nested = nested.to_device(device).to_kind(Kind::Float).reshape([-1]).contiguous();
            expect_len(&format!("{w}.nested_absmax"), &nested, num_blocks(nblocks, nbs))?;
            let code = match get(&format!("{w}.nested_quant_map")) {
                Some(t) => {
                    let t = t.to_device(device).to_kind(Kind::Float).reshape([-1]).contiguous();
                    expect_len(&format!("{w}.nested_quant_map"), &t, 256)?;
                    t
                }
                None => {
                    log::warn!("`{w}.nested_quant_map` missing, using the dynamic map");
                    Tensor::from_slice(&dynamic_map()).to_device(device)
                }
            };
            Absmax::Nested {
                codes: raw_absmax.to_kind(Kind::Uint8).contiguous(),
                code,
                absmax: nested,
                offset: offset as f32,
                blocksize: nbs,
            }
        }
    };
    Ok(QuantTensor {
        quant_type: st.quant_type,
        shape: st.shape,
        blocksize: st.blocksize,
        dtype: st.dtype,
        codes,
        absmax,
        quant_map,
    })
}
