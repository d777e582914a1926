//! The `vpstag` command line and daemon, built on the `vpstag` library.
#![forbid(unsafe_code)]

mod cli;
mod daemon;
mod logger;

fn main() {
    std::process::exit(cli::main());
}
