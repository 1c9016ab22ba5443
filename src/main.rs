//! The `tuner` binary: everything happens in [`tuner::cli`].
fn main() {
    std::process::exit(tuner::cli::main());
}
