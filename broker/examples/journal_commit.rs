//! How fast the journal commits on this machine's disk: records of a
//! typical task's size, committed in groups of 1, 16 and 128, with
//! `fdatasync` (`--fsync always`) and without (`--fsync never`). Release
//! build:
//!
//! ```sh
//! cargo run --release -p miyamoto-broker --example journal_commit -- [DIR] [SECONDS]
//! ```
//!
//! It prints one line per case: commits and records a second, and the
//! median and p99 time of one commit. `STORAGE.md` records the figures.

use std::time::{Duration, Instant};

use broker::journal::{DirDisk, Fsync, Journal, Options};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("miyamoto-journal-commit"));
    let seconds: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    // About what an enqueue of a small webhook task writes.
    let record = vec![0x5au8; 300];
    println!(
        "directory {}, {seconds} s per case, records of {} bytes",
        dir.display(),
        record.len()
    );
    for fsync in [Fsync::Always, Fsync::Never] {
        for group in [1usize, 16, 128] {
            let _ = std::fs::remove_dir_all(&dir);
            let disk = match DirDisk::open(&dir) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("{e}");
                    std::process::exit(1);
                }
            };
            let options = Options {
                fsync,
                ..Options::default()
            };
            let (mut journal, _) = match Journal::open(disk, options) {
                Ok(j) => j,
                Err(e) => {
                    eprintln!("{e}");
                    std::process::exit(1);
                }
            };
            let until = Instant::now() + Duration::from_secs_f64(seconds);
            let mut times = Vec::new();
            while Instant::now() < until {
                for _ in 0..group {
                    journal.append(&record);
                }
                let t = Instant::now();
                if let Err(e) = journal.commit() {
                    eprintln!("commit: {e}");
                    std::process::exit(1);
                }
                times.push(t.elapsed());
            }
            times.sort_unstable();
            let commits = times.len() as f64 / seconds;
            let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
            println!(
                "fsync {fsync:?}, {group:>3} records a commit: {commits:>9.0} commits/s, {:>10.0} records/s, commit p50 {:?}, p99 {:?}",
                commits * group as f64,
                at(0.5),
                at(0.99)
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
