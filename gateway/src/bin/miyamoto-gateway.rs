use clap::Parser;

/// The command line, with the log format beside the gateway's arguments.
#[derive(Parser)]
#[command(name = "miyamoto-gateway", version)]
struct Args {
    #[command(flatten)]
    args: gateway::cli::GatewayArgs,
    /// Log lines as `text` or `json` (also MIYAMOTO_LOG_FORMAT).
    #[arg(long, env = "MIYAMOTO_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// The allocator of every Miyamoto process (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let Args { args, log_format } = Args::parse();
    client::logging::init_with(log_format == "json");
    client::logging::exit_on_panic();
    match gateway::cli::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("miyamoto-gateway: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
