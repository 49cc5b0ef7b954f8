//! The `migmon` command line.

fn main() {
    eprintln!("migmon: not built yet");
    std::process::exit(2);
}
