//! The `phi4` binary: its commands live in `cli/`, a file each.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
