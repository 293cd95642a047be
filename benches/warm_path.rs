//! `cargo bench` entry of the warm-path benchmarks (BENCHMARKS.md): runs the workspace member
//! `nuvy-oauth2-bench` (benches/warm-path) in a cargo invocation of its own, passing on the
//! arguments (a filter, `--save-baseline`, ...).
//!
//! Why not a bench target of this package: its dev-dependencies enable tokio's `test-util` (the
//! tests pause time), and cargo unifies features across everything one `cargo bench` builds,
//! even across workspace members. Under `test-util`, every `tokio::time::Instant::now()` goes
//! through the runtime's clock and its lock: not what a user's release build runs. Built alone,
//! the member gets tokio with its own features only.

use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "bench",
            "--package",
            "nuvy-oauth2-bench",
            "--bench",
            "warm_path",
            "--",
        ])
        .args(std::env::args_os().skip(1))
        .status();
    match status {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("warm_path benchmarks failed: {status}");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("could not run cargo for the warm_path benchmarks: {error}");
            ExitCode::FAILURE
        }
    }
}
