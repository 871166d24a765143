//! The log format of every Miyamoto process: human-readable lines on
//! stderr, filtered by `RUST_LOG` (default `info`).

/// Installs the process's log subscriber; a second call does nothing.
/// Lines are text, or JSON objects with `MIYAMOTO_LOG_FORMAT=json`.
pub fn init() {
    let json = std::env::var("MIYAMOTO_LOG_FORMAT").is_ok_and(|f| f == "json");
    init_with(json);
}

/// Installs the log subscriber: human-readable lines, or one JSON object
/// a line (`--log-format json`: the time, level, target, the fields, and
/// the spans it happened in, such as a delivery's task and queue).
pub fn init_with(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        let _ = builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init();
    } else {
        // Colours on a terminal only: a log file gets plain `key=value`.
        let _ = builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init();
    }
}

/// The exit status of a process whose thread panicked (`EX_SOFTWARE`).
pub const PANIC_EXIT_CODE: i32 = 70;

/// Crash-only: once installed, a panic on any thread is printed as usual,
/// logged, and ends the whole process with [`PANIC_EXIT_CODE`], so that
/// peers and supervisors see a dead node rather than one whose scheduler
/// (or link, or election) is gone while its other threads answer. Every
/// Miyamoto binary calls it first thing; libraries never do.
pub fn exit_on_panic() {
    let print = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        print(info);
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        tracing::error!(
            thread,
            code = PANIC_EXIT_CODE,
            "a thread panicked; the process exits so that its peers and supervisor see it down"
        );
        std::process::exit(PANIC_EXIT_CODE);
    }));
}

/// The environment variable of the test-only fault hook: `THREAD:SECS`
/// makes the thread named THREAD (`scheduler`, `io`, `election`,
/// `broker-link`, `http`) panic at its first pass through
/// [`test_fault_point`] SECS seconds or more after the process started.
/// It exists to test [`exit_on_panic`] on real processes.
pub const TEST_PANIC_VAR: &str = "MIYAMOTO_TEST_PANIC";

/// Panics here when [`TEST_PANIC_VAR`] names `thread` and its time has
/// come; otherwise (always, in production) one atomic load.
pub fn test_fault_point(thread: &str) {
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};
    static FAULT: OnceLock<Option<(String, Instant)>> = OnceLock::new();
    let fault = FAULT.get_or_init(|| {
        let v = std::env::var(TEST_PANIC_VAR).ok()?;
        let (name, secs) = v.split_once(':')?;
        let secs = secs
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0)?;
        Some((
            name.to_string(),
            Instant::now() + Duration::from_secs_f64(secs.min(3600.0)),
        ))
    });
    if let Some((name, at)) = fault {
        if name == thread && Instant::now() >= *at {
            panic!("test-only panic in thread {thread} ({TEST_PANIC_VAR})");
        }
    }
}
