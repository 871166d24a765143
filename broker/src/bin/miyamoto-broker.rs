use clap::Parser;

/// The allocator of every Miyamoto process (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    client::logging::init();
    client::logging::exit_on_panic();
    let args = broker::cli::BrokerArgs::parse();
    match broker::cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("miyamoto-broker: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
