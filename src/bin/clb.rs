//! `clb`: the command-line client.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = clb::cli::Cli::parse();
    // Only `clb agent` logs; everything else prints its result.
    clb::init_tracing(None);
    match clb::cli::run(cli).await {
        Ok(out) => println!("{out}"),
        Err(f) => {
            eprintln!("clb: {}", f.message);
            std::process::exit(f.code);
        }
    }
}
