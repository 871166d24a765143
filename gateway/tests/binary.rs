//! `miyamoto-gateway` and `miyamoto-broker` as separate processes: an
//! enqueue over HTTP reaches a real HTTP receiver.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_base() -> u16 {
    for _ in 0..100 {
        let p = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if p < 65000 && (1..4).all(|i| TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
            return p;
        }
    }
    panic!("no free port pair");
}

fn spawn(path: PathBuf, args: &[&str]) -> Kill {
    assert!(
        path.exists(),
        "{} is missing: run `cargo test --workspace` so every binary is built",
        path.display()
    );
    Kill(
        Command::new(path)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// POSTs a form to the gateway; returns the status line and body.
fn post(addr: &str, body: &str) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "POST /queue HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    Ok((
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    ))
}

#[test]
fn separate_broker_and_gateway_processes_deliver_a_webhook() {
    let gateway_bin = PathBuf::from(env!("CARGO_BIN_EXE_miyamoto-gateway"));
    let broker_bin = gateway_bin.with_file_name("miyamoto-broker");
    let base = free_base();
    let http = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _b = spawn(broker_bin, &["--port", &base.to_string()]);
    let listen = format!("127.0.0.1:{http}");
    let _g = spawn(
        gateway_bin,
        &[
            "--listen",
            &listen,
            "--broker",
            &format!("tcp://127.0.0.1:{base}"),
        ],
    );
    let receiver = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = format!("http://{}/hook", receiver.local_addr().unwrap());

    let deadline = Instant::now() + Duration::from_secs(20);
    let body = format!("task.url={target}&hello=world");
    loop {
        match post(&listen, &body) {
            Ok((status, resp)) if status.contains(" 200 ") => {
                assert!(resp.contains("\"scheduled\""), "{resp}");
                break;
            }
            // Not listening yet, or 503 until the broker link is up.
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            other => panic!("gateway never accepted the task: {other:?}"),
        }
    }
    // accept() has no timeout of its own: poll it against a deadline.
    receiver.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let conn = loop {
        match receiver.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("no webhook arrived: {e}"),
        }
    };
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
    assert_eq!(request_line.trim_end(), "POST /hook HTTP/1.1");
    let mut length = 0;
    let mut agent = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end().to_ascii_lowercase();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("content-length: ") {
            length = v.parse().unwrap();
        }
        if let Some(v) = line.strip_prefix("user-agent: ") {
            agent = v.to_string();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    assert_eq!(body, b"hello=world");
    assert!(agent.starts_with("miyamoto/"));
    (&conn)
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
}

/// The gateway is built from `protocol` and `client` only: no broker
/// code, so no Raft and no task store, links into it.
#[test]
fn gateway_depends_on_no_broker_code() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-p",
            "miyamoto-gateway",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(names.contains(&"miyamoto-client"), "{tree}");
    assert!(names.contains(&"miyamoto-protocol"), "{tree}");
    for banned in ["miyamoto-broker", "raft", "protobuf"] {
        assert!(
            !names.contains(&banned),
            "miyamoto-gateway depends on {banned}:\n{tree}"
        );
    }
    // And the binary itself holds none of the broker's code: no symbol of
    // the crate (mangled, length-prefixed) and no source path of it
    // (panic locations). The bare name would match the metric
    // `miyamoto_broker_up`, which the gateway writes.
    let bytes = std::fs::read(env!("CARGO_BIN_EXE_miyamoto-gateway")).unwrap();
    for needle in [&b"raft_log"[..], b"15miyamoto_broker", b"broker/src/"] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "miyamoto-gateway contains {:?}",
            String::from_utf8_lossy(needle)
        );
    }
}
