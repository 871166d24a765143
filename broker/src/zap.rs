//! CURVE on the broker's ports (`PROTOCOL.md` §17.2): the keys of
//! `--curve-dir`, and the ZAP handler (ZeroMQ RFC 27) that admits a
//! client's key on the port it connects to, or refuses it and logs the
//! peer's address.
//!
//! Every port is a CURVE server with the cluster's key pair
//! (`server.key_secret`, the same file on every node, so a client needs
//! one server key whichever node it reaches). Each port admits its own
//! keys: the producer port `producers/*.key`, the worker port
//! `workers/*.key`, the peer and events ports `peers/*.key`. A node
//! connects to its peers with `peer.key_secret`, whose public half must be
//! in the other nodes' `peers/`.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use client::curve::{self, ClientKeys, Key, KeyPair};

/// ZAP domains, one per kind of port.
pub const PRODUCERS: &str = "producers";
pub const WORKERS: &str = "workers";
pub const PEERS: &str = "peers";

/// The endpoint libzmq sends ZAP requests to (RFC 27).
const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";

/// A broker's CURVE settings.
#[derive(Clone, Debug)]
pub struct BrokerCurve {
    /// The key pair every port serves with.
    pub server: KeyPair,
    /// How this node connects to its peers' peer and events ports.
    pub peer: ClientKeys,
    pub admitted: Admitted,
}

/// The public keys each kind of port admits.
#[derive(Clone, Debug, Default)]
pub struct Admitted {
    pub producers: HashSet<Key>,
    pub workers: HashSet<Key>,
    pub peers: HashSet<Key>,
}

impl Admitted {
    fn admits(&self, domain: &[u8], key: &[u8]) -> bool {
        let set = match domain {
            d if d == PRODUCERS.as_bytes() => &self.producers,
            d if d == WORKERS.as_bytes() => &self.workers,
            d if d == PEERS.as_bytes() => &self.peers,
            _ => return false,
        };
        <&Key>::try_from(key).is_ok_and(|k| set.contains(k))
    }
}

impl BrokerCurve {
    /// Reads `--curve-dir`: `server.key_secret`, `peer.key_secret`, and
    /// the directories `producers/`, `workers/` and `peers/` of admitted
    /// public keys (each may be missing or empty: nothing is admitted
    /// there).
    pub fn read_dir(dir: &Path) -> Result<BrokerCurve, String> {
        curve::available()?;
        let server = KeyPair::read(&dir.join("server.key_secret"))?;
        let peer = ClientKeys {
            server: server.public,
            mine: KeyPair::read(&dir.join("peer.key_secret"))?,
        };
        let admitted_in = |name: &str| {
            let d = dir.join(name);
            if d.exists() {
                curve::read_admitted(&d)
            } else {
                Ok(HashSet::new())
            }
        };
        let admitted = Admitted {
            producers: admitted_in(PRODUCERS)?,
            workers: admitted_in(WORKERS)?,
            peers: admitted_in(PEERS)?,
        };
        if !admitted.peers.contains(&peer.mine.public) {
            tracing::warn!(
                "{}: peer.key is not in peers/: other nodes with this directory will refuse this one",
                dir.display()
            );
        }
        Ok(BrokerCurve {
            server,
            peer,
            admitted,
        })
    }
}

/// Refusals logged per second at most; the rest are counted and the count
/// logged with the next one allowed (a client retrying in a loop must not
/// fill the disk with logs).
const REFUSALS_LOGGED_PER_SECOND: u32 = 10;

/// Binds the ZAP endpoint in `ctx` (before any CURVE server socket binds,
/// so no connection is ever admitted unchecked) and answers its requests
/// on a thread until `stop`.
pub fn spawn(
    ctx: &zmq::Context,
    admitted: Admitted,
    stop: Arc<AtomicBool>,
) -> Result<thread::JoinHandle<()>, String> {
    let socket = ctx
        .socket(zmq::REP)
        .map_err(|e| format!("cannot make the ZAP socket: {e}"))?;
    let _ = socket.set_linger(0);
    socket
        .bind(ZAP_ENDPOINT)
        .map_err(|e| format!("cannot bind the ZAP handler ({ZAP_ENDPOINT}): {e}"))?;
    thread::Builder::new()
        .name("zap".into())
        .spawn(move || run(socket, &admitted, &stop))
        .map_err(|e| format!("cannot start the ZAP thread: {e}"))
}

fn run(socket: zmq::Socket, admitted: &Admitted, stop: &AtomicBool) {
    let mut window = Instant::now();
    let mut logged = 0u32;
    let mut suppressed = 0u64;
    while !stop.load(Ordering::Acquire) {
        match socket.poll(zmq::POLLIN, 200) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(zmq::Error::ETERM) => return,
            Err(_) => continue,
        }
        let Ok(request) = socket.recv_multipart(zmq::DONTWAIT) else {
            continue;
        };
        let reply = answer(&request, admitted);
        if let Some(refusal) = &reply.refusal {
            if window.elapsed() >= Duration::from_secs(1) {
                window = Instant::now();
                logged = 0;
            }
            if logged < REFUSALS_LOGGED_PER_SECOND {
                logged += 1;
                tracing::warn!(
                    port = %refusal.domain,
                    peer = %refusal.address,
                    key = %refusal.key,
                    suppressed_before = suppressed,
                    "refused a ZeroMQ client: {}",
                    refusal.reason
                );
                suppressed = 0;
            } else {
                suppressed += 1;
            }
        }
        // A REP must answer before it can receive again; a failed send
        // leaves libzmq's ZAP client to time the handshake out.
        let _ = socket.send_multipart(reply.frames, 0);
    }
}

struct Refusal {
    domain: String,
    address: String,
    key: String,
    reason: &'static str,
}

struct Reply {
    frames: Vec<Vec<u8>>,
    refusal: Option<Refusal>,
}

/// Answers one ZAP request (RFC 27): version, request id, domain,
/// address, identity, mechanism, credentials.
fn answer(request: &[Vec<u8>], admitted: &Admitted) -> Reply {
    let frame = |i: usize| request.get(i).map(Vec::as_slice).unwrap_or_default();
    let text = |i: usize| String::from_utf8_lossy(frame(i)).into_owned();
    let (version, request_id) = (frame(0).to_vec(), frame(1).to_vec());
    let (domain, mechanism, key) = (frame(2), frame(5), frame(6));
    let reason = if request.len() < 6 || version != b"1.0" {
        Some("malformed ZAP request")
    } else if mechanism != b"CURVE" {
        Some("not CURVE")
    } else if !admitted.admits(domain, key) {
        Some("key not admitted on this port")
    } else {
        None
    };
    let key_text = <&Key>::try_from(key)
        .map(curve::z85_encode)
        .unwrap_or_else(|_| "-".into());
    let (code, status, user): (&[u8], &[u8], Vec<u8>) = match reason {
        None => (b"200", b"OK", key_text.as_bytes().to_vec()),
        Some(_) => (b"400", b"key not admitted", Vec::new()),
    };
    Reply {
        frames: vec![
            b"1.0".to_vec(),
            request_id,
            code.to_vec(),
            status.to_vec(),
            user,
            Vec::new(),
        ],
        refusal: reason.map(|reason| Refusal {
            domain: text(2),
            address: text(3),
            key: key_text,
            reason,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(domain: &str, mechanism: &str, key: &[u8]) -> Vec<Vec<u8>> {
        vec![
            b"1.0".to_vec(),
            b"7".to_vec(),
            domain.as_bytes().to_vec(),
            b"10.0.0.9".to_vec(),
            Vec::new(),
            mechanism.as_bytes().to_vec(),
            key.to_vec(),
        ]
    }

    #[test]
    fn each_port_admits_its_own_keys_only() {
        let mut admitted = Admitted::default();
        admitted.producers.insert([1; 32]);
        admitted.peers.insert([2; 32]);
        let ok = answer(&request(PRODUCERS, "CURVE", &[1; 32]), &admitted);
        assert_eq!(ok.frames[2], b"200");
        assert_eq!(ok.frames[1], b"7", "request id echoed");
        assert!(ok.refusal.is_none());
        for (domain, key) in [
            (WORKERS, [1u8; 32]),
            (PRODUCERS, [2; 32]),
            ("other", [2; 32]),
        ] {
            let r = answer(&request(domain, "CURVE", &key), &admitted);
            assert_eq!(r.frames[2], b"400", "{domain}");
            assert_eq!(r.refusal.unwrap().address, "10.0.0.9");
        }
        assert_eq!(
            answer(&request(PEERS, "CURVE", &[2; 32]), &admitted).frames[2],
            b"200"
        );
        assert_eq!(
            answer(&request(PEERS, "PLAIN", &[2; 32]), &admitted).frames[2],
            b"400"
        );
        assert_eq!(
            answer(&request(PEERS, "CURVE", &[2; 31]), &admitted).frames[2],
            b"400"
        );
        assert_eq!(answer(&[b"1.0".to_vec()], &admitted).frames[2], b"400");
    }
}
