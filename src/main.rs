//! The `tuner` binary: everything happens in [`tuner::cli`].
fn main() {
    tuner::dist::exit(tuner::cli::main());
}
