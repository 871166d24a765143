//! The one place libzmq sockets are made, and the doorbell that wakes a
//! socket thread from other threads.
//!
//! Every socket gets LINGER, high-water marks and (for ROUTERs) the options
//! this project relies on, so no call site can forget them. A socket is made
//! in the thread that owns it and never crosses threads afterwards.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::curve::ClientKeys;

/// High-water mark (messages) for every socket, both directions.
pub const HWM: i32 = 100_000;

/// `ZMQ_MAXMSGSIZE` of every socket, in bytes: one frame larger than the
/// largest body a decoder takes (`protocol::frames::MAX_BODY_BYTES`) and a little
/// room disconnects its sender before libzmq has read it whole.
pub const MAX_FRAME_BYTES: i64 = protocol::frames::MAX_BODY_BYTES as i64 + 4096;

/// Makes a ROUTER that reports unroutable identities (ROUTER_MANDATORY)
/// and lets a reconnecting peer reclaim its identity (ROUTER_HANDOVER).
/// Send on it with `DONTWAIT`: a full or vanished peer must never block
/// the I/O loop.
pub fn router(ctx: &zmq::Context) -> zmq::Result<zmq::Socket> {
    let s = ctx.socket(zmq::ROUTER)?;
    common(&s)?;
    s.set_router_mandatory(true)?;
    s.set_router_handover(true)?;
    Ok(s)
}

/// Makes a DEALER. `immediate` queues messages only to completed
/// connections, so a send while the peer is down fails at once (EAGAIN)
/// instead of being delivered minutes later. With `curve`, it connects
/// as a CURVE client with those keys.
pub fn dealer(
    ctx: &zmq::Context,
    immediate: bool,
    curve: Option<&ClientKeys>,
) -> zmq::Result<zmq::Socket> {
    let s = ctx.socket(zmq::DEALER)?;
    common(&s)?;
    s.set_immediate(immediate)?;
    if let Some(k) = curve {
        k.apply(&s)?;
    }
    Ok(s)
}

/// Makes a PUB for cluster events. PUB drops at the high-water mark
/// rather than block; subscribers count the gaps by sequence number.
pub fn publisher(ctx: &zmq::Context) -> zmq::Result<zmq::Socket> {
    let s = ctx.socket(zmq::PUB)?;
    common(&s)?;
    s.set_linger(100)?;
    Ok(s)
}

/// Makes a SUB subscribed to everything, a CURVE client with `curve`.
pub fn subscriber(ctx: &zmq::Context, curve: Option<&ClientKeys>) -> zmq::Result<zmq::Socket> {
    let s = ctx.socket(zmq::SUB)?;
    common(&s)?;
    s.set_subscribe(b"")?;
    if let Some(k) = curve {
        k.apply(&s)?;
    }
    Ok(s)
}

fn common(s: &zmq::Socket) -> zmq::Result<()> {
    // LINGER defaults to -1 (forever): context termination would hang on
    // unsent messages to a dead peer.
    s.set_linger(0)?;
    s.set_sndhwm(HWM)?;
    s.set_rcvhwm(HWM)?;
    s.set_tcp_keepalive(1)?;
    s.set_maxmsgsize(MAX_FRAME_BYTES)?;
    Ok(())
}

/// Wakes a thread blocked in `zmq::poll` when work waits in a crossbeam
/// channel. The sender pushes into the channel and then rings; the owner
/// polls [`Doorbell::fd`], calls [`Doorbell::clear`] and then drains the
/// channel, so no wakeup is lost. The `armed` flag keeps a busy sender
/// from making a syscall per message.
#[derive(Clone)]
pub struct Bell {
    stream: Arc<UnixStream>,
    rung: Arc<AtomicBool>,
}

/// The receiving half of a [`Bell`], owned by the socket thread.
pub struct Doorbell {
    stream: UnixStream,
    rung: Arc<AtomicBool>,
}

/// Makes a connected bell and doorbell.
pub fn doorbell() -> std::io::Result<(Bell, Doorbell)> {
    let (a, b) = UnixStream::pair()?;
    a.set_nonblocking(true)?;
    b.set_nonblocking(true)?;
    let rung = Arc::new(AtomicBool::new(false));
    Ok((
        Bell {
            stream: Arc::new(a),
            rung: rung.clone(),
        },
        Doorbell { stream: b, rung },
    ))
}

impl Bell {
    /// Signals the owner. Cheap when it was already signalled.
    pub fn ring(&self) {
        if !self.rung.swap(true, Ordering::AcqRel) {
            // WouldBlock means the buffer is full of earlier rings: the
            // owner will wake anyway.
            let _ = (&*self.stream).write(&[1]);
        }
    }
}

impl Doorbell {
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.stream.as_raw_fd()
    }

    /// Consumes pending rings; call before draining the channel.
    pub fn clear(&self) {
        let mut buf = [0u8; 64];
        while let Ok(n) = (&self.stream).read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        self.rung.store(false, Ordering::Release);
    }
}

/// Receives one multipart message without blocking; `None` when nothing
/// is waiting (or the socket failed, which the caller cannot fix here).
pub fn try_recv(s: &zmq::Socket) -> Option<Vec<Vec<u8>>> {
    // Like `recv_multipart`, reading "more" from each message rather than
    // with a `getsockopt` per frame. The frames of one message arrive
    // together, so only the first receive can find nothing.
    let mut parts = Vec::with_capacity(4);
    loop {
        let mut msg = zmq::Message::new();
        s.recv(&mut msg, zmq::DONTWAIT).ok()?;
        let more = msg.get_more();
        parts.push(msg.to_vec());
        if !more {
            return Some(parts);
        }
    }
}

/// Sends a multipart message without blocking.
pub fn send_parts(s: &zmq::Socket, parts: &[Vec<u8>]) -> zmq::Result<()> {
    let last = parts.len().saturating_sub(1);
    for (i, p) in parts.iter().enumerate() {
        let flags = if i < last {
            zmq::DONTWAIT | zmq::SNDMORE
        } else {
            zmq::DONTWAIT
        };
        s.send(&p[..], flags)?;
    }
    Ok(())
}

/// Sends a multipart message, waiting up to `wait` for room or for a
/// connection to take it (a DEALER whose every connection was refused,
/// by CURVE say, has none); `EAGAIN` when none came. A blocking send
/// would wait forever there.
pub fn send_parts_within(
    s: &zmq::Socket,
    parts: &[Vec<u8>],
    wait: std::time::Duration,
) -> zmq::Result<()> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match send_parts(s, parts) {
            Err(zmq::Error::EAGAIN) => {
                let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) else {
                    return Err(zmq::Error::EAGAIN);
                };
                s.poll(zmq::POLLOUT, left.as_millis().max(1) as i64)?;
            }
            other => return other,
        }
    }
}

/// Sends `frames` to the peer `identity` on a ROUTER.
pub fn send_routed(s: &zmq::Socket, identity: &[u8], frames: &[Vec<u8>]) -> zmq::Result<()> {
    s.send(identity, zmq::DONTWAIT | zmq::SNDMORE)?;
    send_parts(s, frames)
}
