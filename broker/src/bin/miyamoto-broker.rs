use clap::Parser;

/// The command line, with the log format beside the broker's arguments.
#[derive(Parser)]
#[command(name = "miyamoto-broker", version)]
struct Args {
    #[command(flatten)]
    args: broker::cli::BrokerArgs,
    /// Log lines as `text` or `json` (also MIYAMOTO_LOG_FORMAT).
    #[arg(long, env = "MIYAMOTO_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// The allocator of every Miyamoto process (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let Args { args, log_format } = Args::parse();
    client::logging::init_with(log_format == "json");
    client::logging::exit_on_panic();
    match broker::cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("miyamoto-broker: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
