use clap::Parser;

/// The allocator of every Miyamoto process (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    client::logging::init();
    client::logging::exit_on_panic();
    let args = gateway::cli::GatewayArgs::parse();
    match gateway::cli::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("miyamoto-gateway: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
