//! Progress reporting off a terminal (src/progress.rs): plain lines with done/total, percent,
//! elapsed time and ETA; silence for work that ends before the first line is due; unknown totals;
//! the rate counted from a resumed position.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tuner::progress::{bytes, duration, Progress, Unit};

/// A writer whose bytes the test reads back.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink {
    fn lines(&self) -> Vec<String> {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap().lines().map(str::to_string).collect()
    }
}

#[test]
fn plain_lines_give_done_total_percent_and_an_eta() {
    let sink = Sink::default();
    let p = Progress::plain_to(10, "load", Unit::Items("tensors"), Duration::ZERO, Box::new(sink.clone()));
    assert!(!p.is_bar());
    std::thread::sleep(Duration::from_millis(20));
    p.inc(4);
    p.set_message("q_proj");
    p.inc(1);
    let lines = sink.lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("load: 4/10 tensors (40%), 0s elapsed, ETA 0s"), "{lines:?}");
    assert!(lines[1].starts_with("load: 5/10 tensors (50%), "), "{lines:?}");
    assert!(lines[1].ends_with(" — q_proj"), "{lines:?}");
    // 5 of 10 took ≥ 20 ms: the same again is left.
    let eta = p.eta().unwrap();
    assert!(eta >= Duration::from_millis(15) && eta < Duration::from_secs(5), "{eta:?}");
    p.inc(5);
    p.finish();
    let lines = sink.lines();
    assert_eq!(lines.len(), 3, "finish() adds nothing: {lines:?}");
    assert!(lines[2].starts_with("load: 10/10 tensors (100%)"), "{lines:?}");
}

#[test]
fn work_that_ends_before_the_first_line_is_due_prints_nothing() {
    let sink = Sink::default();
    let p = Progress::plain_to(3, "tokenize", Unit::Items("shards"), Duration::from_secs(3600), Box::new(sink.clone()));
    p.inc(1);
    p.inc(2);
    p.finish();
    assert!(sink.lines().is_empty(), "{:?}", sink.lines());
    assert_eq!(p.eta(), Some(Duration::ZERO));
    // A hidden report has nothing to say at all.
    let h = Progress::hidden();
    h.inc(1);
    h.finish();
    assert_eq!(h.eta(), None);
}

#[test]
fn bytes_with_an_unknown_total_and_a_resumed_start() {
    let sink = Sink::default();
    let p = Progress::plain_to(0, "download model.safetensors", Unit::Bytes, Duration::ZERO, Box::new(sink.clone()));
    p.set_position(2_500_000);
    assert_eq!(sink.lines(), ["download model.safetensors: 2.5 MB, 0s elapsed"]);
    // A download resumed at 40 MB of 100: the rate counts from 40, so after 10 MB more the ETA
    // is 5× the time taken, not 1.5×.
    let sink = Sink::default();
    let p = Progress::plain_to(100_000_000, "download", Unit::Bytes, Duration::from_secs(3600), Box::new(sink.clone()));
    p.set_position(40_000_000);
    std::thread::sleep(Duration::from_millis(50));
    p.set_position(50_000_000);
    let eta = p.eta().unwrap().as_secs_f64();
    assert!((0.25..2.0).contains(&eta), "{eta}");
    p.set_position(100_000_000);
    p.finish();
    assert!(sink.lines().is_empty(), "{:?}", sink.lines());
}

#[test]
fn sizes_and_durations_read_as_people_write_them() {
    assert_eq!(bytes(512), "512 B");
    assert_eq!(bytes(1_500), "1.5 kB");
    assert_eq!(bytes(12_340_000), "12.3 MB");
    assert_eq!(bytes(4_560_000_000), "4.56 GB");
    assert_eq!(duration(Duration::from_secs(7)), "7s");
    assert_eq!(duration(Duration::from_secs(125)), "2m05s");
    assert_eq!(duration(Duration::from_secs(3720)), "1h02m");
}

#[test]
fn a_run_positioned_at_zero_counts_its_first_step() {
    // The train stage sets position 0 (or a resumed step) before the first step.
    let sink = Sink::default();
    let p = Progress::plain_to(40, "train", Unit::Items("steps"), Duration::ZERO, Box::new(sink.clone()));
    p.set_position(0);
    std::thread::sleep(Duration::from_millis(10));
    p.set_position(1);
    assert!(p.eta().is_some_and(|e| e >= Duration::from_millis(300)), "39 steps left at ≥ 10 ms each: {:?}", p.eta());
    assert!(sink.lines().last().unwrap().starts_with("train: 1/40 steps (2%), 0s elapsed, ETA "), "{:?}", sink.lines());
}
