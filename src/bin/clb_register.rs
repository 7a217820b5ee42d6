//! `clb_register PASSWORD NODE SERVICE`: the 2010 calling form.

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match clb::cli::legacy(true, &args).await {
        Ok(out) => println!("{out}"),
        Err(f) => {
            eprintln!("clb_register: {}", f.message);
            std::process::exit(f.code);
        }
    }
}
