//! Constant code tables of the bitsandbytes 4-bit and 8-bit formats, and the small
//! derived tables the quantizers search (midpoints, the 8-bit lookup table).
//!
//! Reference: docs/model-math.md §4.3 (NF4 and FP4 tables, dynamic map) and
//! `shared/reference/bnb_dynamic_map_f32.txt` (the 256 f32 bit patterns of
//! `create_dynamic_map(signed=True)`, read off bitsandbytes 0.50.2).
//! bitsandbytes builds its tables from Python floats converted to f32, so the
//! constants here are written as f64 literals cast to f32 (the same rounding).

/// NF4 code table (`get_4bit_type("nf4")`), index = 4-bit code; sorted ascending.
pub const NF4_TABLE: [f32; 16] = [
    -1.0,
    -0.6961928009986877_f64 as f32,
    -0.5250730514526367_f64 as f32,
    -0.39491748809814453_f64 as f32,
    -0.28444138169288635_f64 as f32,
    -0.18477343022823334_f64 as f32,
    -0.09105003625154495_f64 as f32,
    0.0,
    0.07958029955625534_f64 as f32,
    0.16093020141124725_f64 as f32,
    0.24611230194568634_f64 as f32,
    0.33791524171829224_f64 as f32,
    0.44070982933044434_f64 as f32,
    0.5626170039176941_f64 as f32,
    0.7229568362236023_f64 as f32,
    1.0,
];

/// FP4 code table (`get_4bit_type("fp4")`): the raw e2m1 values divided by 12 in f32.
/// Bit 3 is the sign; index 8 is +0.0 like index 0, because bitsandbytes writes it as the
/// Python integer `-0`, which is plain 0.
#[allow(clippy::eq_op)] // `12.0 / 12.0` keeps the "raw value / 12" pattern of every entry
pub const FP4_TABLE: [f32; 16] = [
    0.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    12.0 / 12.0,
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    0.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -12.0 / 12.0,
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// FP4 codes in ascending value order, exactly as `torch.argsort` orders FP4_TABLE on the
/// CPU in bitsandbytes 0.50.2 (`_get_4bit_quantize_bounds`). The two zero codes tie and
/// sort as 0 then 8, so scaled values in (−δ, 0] get code 0 and values in (0, δ] code 8.
pub const FP4_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

/// NF4 codes in ascending value order (the table is already sorted).
pub const NF4_ORDER: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

/// f32 bit patterns of the signed 8-bit dynamic map, index 0..255 (from bnb_dynamic_map_f32.txt).
const DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000, 0xbf616666,
    0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333, 0xbf44999a, 0xbf410000,
    0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666, 0xbf27cccd, 0xbf243334, 0xbf20999a,
    0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a, 0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333,
    0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a, 0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a,
    0xbeb86666, 0xbeb13333, 0xbeaa0000, 0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999,
    0xbe6f3333, 0xbe60cccd, 0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000,
    0xbddb3334, 0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d, 0xbd5b851f,
    0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148, 0xbcfeb852, 0xbce7ae15,
    0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148, 0xbc1f3b64, 0xbc160418, 0xbc0ccccd,
    0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4, 0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a,
    0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d, 0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01,
    0xb9c7e283, 0xb98ce705, 0xb923d70b, 0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94,
    0xb513a3b7, 0x00000000, 0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b,
    0x3923d70b, 0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4, 0x3bcfdf3b,
    0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148, 0x3c68f5c3, 0x3c8b851f,
    0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148, 0x3d166667, 0x3d21eb85, 0x3d2d70a3,
    0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d, 0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d,
    0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a, 0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667,
    0x3dc428f7, 0x3dc9eb85, 0x3ddb3334, 0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000,
    0x3e526666, 0x3e60cccd, 0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc,
    0x3eaa0000, 0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a, 0x3f123334,
    0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666, 0x3f2f0000, 0x3f32999a,
    0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333, 0x3f4bcccd, 0x3f4f6666, 0x3f530000,
    0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000, 0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666,
    0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// The signed 8-bit dynamic map bitsandbytes uses to double-quantize absmax
/// (`create_dynamic_map(signed=True, 7, 8)`): index 0 = −0.99296875, 127 = 0, 255 = 1.
pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_MAP_BITS.map(f32::from_bits)
}

/// The 256-entry dynamic map of the 8-bit optimizers' states: signed for AdamW's first moment,
/// unsigned for the second.
/// Built like bitsandbytes' `create_dynamic_map(signed, 7, 8)`: for each decade
/// 10^(i-6), i < 7, the midpoints of a linspace(0.1, 1) grid of 2^i (signed, both
/// signs) or 2^(i+1) (unsigned) steps, plus 0 and 1: 256 values either way.
pub fn state_map(signed: bool) -> Vec<f32> {
    let non_sign_bits = 7;
    let max_exp = 7;
    let mut data: Vec<f32> = vec![];
    for i in 0..max_exp {
        let items = if signed {
            (1usize << (i + non_sign_bits - max_exp)) + 1
        } else {
            (1usize << (i + non_sign_bits - max_exp + 1)) + 1
        };
        let bounds: Vec<f32> = (0..items).map(|k| 0.1 + 0.9 * k as f32 / (items - 1) as f32).collect();
        let scale = 10f32.powi(i - (max_exp - 1));
        for w in bounds.windows(2) {
            let m = (w[0] + w[1]) / 2.0;
            data.push(scale * m);
            if signed {
                data.push(-scale * m);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    while data.len() < 256 {
        data.push(0.0);
    }
    data.sort_by(|a, b| a.total_cmp(b));
    data
}

/// Decision boundaries between consecutive sorted table values, `(a + b) / 2` in f32,
/// as bitsandbytes' reference quantizer computes them (`_get_4bit_quantize_bounds`).
pub fn sorted_midpoints(table: &[f32; 16], order: &[u8; 16]) -> [f32; 15] {
    let mut out = [0.0f32; 15];
    for (i, m) in out.iter_mut().enumerate() {
        *m = (table[order[i] as usize] + table[order[i + 1] as usize]) / 2.0;
    }
    out
}

/// Number of entries in the 8-bit quantizer's lookup table.
pub const LUT_SIZE: usize = 65536;

/// The lookup table bitsandbytes 0.50.2's CPU `quantize_blockwise` uses instead of a
/// search: entry `i` stands for the normalized value `−1 + 2i/65535` (f32) and holds the
/// index of the first code whose upper midpoint `0.5·(c[k] + c[k+1])` is not below it.
/// `code` must be sorted ascending.
pub fn blockwise_lut(code: &[f32; 256]) -> Vec<u8> {
    let mut mids = [0.0f32; 255];
    for (k, m) in mids.iter_mut().enumerate() {
        *m = 0.5f32 * (code[k] + code[k + 1]);
    }
    let mut lut = Vec::with_capacity(LUT_SIZE);
    let mut k = 0usize;
    for i in 0..LUT_SIZE {
        let val = -1.0f32 + (2.0f32 * i as f32) / (LUT_SIZE as f32 - 1.0);
        while k < mids.len() && mids[k] < val {
            k += 1;
        }
        lut.push(k as u8);
    }
    lut
}
