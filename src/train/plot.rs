//! A small line chart written straight to PNG (the `png` crate): axes, ticks
//! with numbers, a title, and the series. Enough for loss curves, with no font
//! files or system libraries (a 5×7 bitmap font covers the characters used).

use anyhow::{Context, Result};
use std::path::Path;

const W: usize = 640;
const H: usize = 400;
const LEFT: usize = 64;
const RIGHT: usize = 16;
const TOP: usize = 32;
const BOTTOM: usize = 40;

/// 5×7 glyphs, one row per byte (low 5 bits, MSB on the left).
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        'd' => [1, 1, 13, 19, 17, 19, 13],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        'a' => [0, 0, 14, 1, 15, 17, 15],
        'e' => [0, 0, 14, 17, 31, 16, 14],
        'i' => [4, 0, 12, 4, 4, 4, 14],
        'l' => [12, 4, 4, 4, 4, 4, 14],
        'n' => [0, 0, 22, 25, 17, 17, 17],
        'o' => [0, 0, 14, 17, 17, 17, 14],
        'p' => [0, 0, 30, 17, 30, 16, 16],
        'r' => [0, 0, 22, 25, 16, 16, 16],
        's' => [0, 0, 15, 16, 14, 1, 30],
        't' => [8, 8, 28, 8, 8, 9, 6],
        'v' => [0, 0, 17, 17, 17, 10, 4],
        _ => [0; 7],
    }
}

struct Canvas {
    px: Vec<u8>,
    h: usize,
}

impl Canvas {
    fn set(&mut self, x: usize, y: usize, rgb: [u8; 3]) {
        if x < W && y < self.h {
            self.px[(y * W + x) * 3..(y * W + x) * 3 + 3].copy_from_slice(&rgb);
        }
    }
    fn text(&mut self, x: usize, y: usize, s: &str) {
        for (i, c) in s.chars().enumerate() {
            for (row, bits) in glyph(c).iter().enumerate() {
                for col in 0..5 {
                    if bits & (16 >> col) != 0 {
                        self.set(x + i * 6 + col, y + row, [40, 40, 40]);
                    }
                }
            }
        }
    }
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), rgb: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()) as usize).max(1);
        for k in 0..=n {
            let t = k as f64 / n as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
                self.set(x as usize + dx, y as usize + dy, rgb);
            }
        }
    }
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 100.0 || v == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else if v.abs() < 0.01 {
        format!("{v:.2e}")
    } else {
        format!("{v:.3}")
    }
}

/// One series of a panel: its points, colour, and whether it is drawn as a line or as dots.
struct Series<'a> {
    points: &'a [(f64, f64)],
    rgb: [u8; 3],
    dots: bool,
}

/// Draw a chart panel titled `title` with its top edge at `top` and plot height `ph`.
fn panel(c: &mut Canvas, top: usize, ph: usize, title: &str, series: &[Series]) {
    let pw = (W - LEFT - RIGHT) as f64;
    let finite: Vec<(f64, f64)> =
        series.iter().flat_map(|s| s.points.iter().copied()).filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    let (x0, x1) = finite.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = finite.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if finite.is_empty() {
        (y0, y1) = (0.0, 1.0);
    }
    if y1 - y0 < 1e-9 {
        y1 = y0 + 1.0;
    }
    let pad = (y1 - y0) * 0.05;
    let (y0, y1) = ((y0 - pad).max(0.0f64.min(y0)), y1 + pad);
    let xspan = if x1 > x0 { x1 - x0 } else { 1.0 };
    let (topf, phf) = (top as f64, ph as f64);
    let map =
        |(x, y): (f64, f64)| (LEFT as f64 + (x - x0.min(x1)) / xspan * pw, topf + (1.0 - (y - y0) / (y1 - y0)) * phf);
    // Axes and grid.
    for k in 0..=4 {
        let y = topf + phf * k as f64 / 4.0;
        c.line((LEFT as f64, y), (LEFT as f64 + pw, y), [225, 225, 225]);
        c.text(4, y as usize - 3, &fmt_tick(y1 - (y1 - y0) * k as f64 / 4.0));
        let x = LEFT as f64 + pw * k as f64 / 4.0;
        if !finite.is_empty() {
            let v = x0 + xspan * k as f64 / 4.0;
            let label = if xspan >= 8.0 { format!("{}", v.round()) } else { fmt_tick(v) };
            c.text(x as usize - 6, top + ph + 8, &label);
        }
    }
    c.line((LEFT as f64, topf), (LEFT as f64, topf + phf), [80, 80, 80]);
    c.line((LEFT as f64, topf + phf), (LEFT as f64 + pw, topf + phf), [80, 80, 80]);
    c.text(LEFT, top - 22, title);
    c.text(W / 2 - 12, top + ph + 26, "step");
    for s in series {
        let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        if !s.dots {
            for w in pts.windows(2) {
                c.line(map(w[0]), map(w[1]), s.rgb);
            }
        }
        if s.dots || pts.len() == 1 {
            for p in &pts {
                let (x, y) = map(*p);
                for d in -2..=2 {
                    c.line((x - 2.0, y + d as f64), (x + 2.0, y + d as f64), s.rgb);
                }
            }
        }
    }
}

fn encode(c: &Canvas, path: &Path) -> Result<()> {
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, W as u32, c.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().context("png header")?;
        w.write_image_data(&c.px).context("png data")?;
    }
    crate::util::write_atomic(path, &buf)
}

/// The loss chart of `metrics.jsonl` rows: train loss as a line, `eval_loss` as orange dots
/// (the title says "train loss - eval dots" then), and the learning rate in a second panel
/// below. Written atomically, so it can be redrawn while training runs.
pub fn loss_png(path: &Path, rows: &[serde_json::Value]) -> Result<()> {
    let get = |k: &str| -> Vec<(f64, f64)> {
        rows.iter().filter_map(|v| Some((v["step"].as_f64()?, v[k].as_f64()?))).collect()
    };
    let (loss, eval, lr) = (get("loss"), get("eval_loss"), get("lr"));
    let lr_h = 160;
    let h = if lr.is_empty() { H } else { H + lr_h + TOP };
    let mut c = Canvas { px: vec![255; W * h * 3], h };
    let title = if eval.is_empty() { "train loss" } else { "train loss - eval dots" };
    let series = [
        Series { points: &loss, rgb: [31, 119, 180], dots: false },
        Series { points: &eval, rgb: [255, 127, 14], dots: true },
    ];
    panel(&mut c, TOP, H - TOP - BOTTOM, title, &series);
    if !lr.is_empty() {
        panel(&mut c, H + TOP, lr_h - BOTTOM, "lr", &[Series { points: &lr, rgb: [44, 160, 44], dots: false }]);
    }
    encode(&c, path)
}
