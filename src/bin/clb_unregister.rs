//! `clb_unregister PASSWORD NODE SERVICE`: the 2010 calling form.

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match clb::cli::legacy(false, &args).await {
        Ok(out) => println!("{out}"),
        Err(f) => {
            eprintln!("clb_unregister: {}", f.message);
            std::process::exit(f.code);
        }
    }
}
