//! Miyamoto's wire protocol, with no I/O.
//!
//! Layout:
//! * [`frames`] — the multipart layout shared by every dialogue: an empty
//!   delimiter frame, a 4-byte header (`"MYM"` + version byte) and one
//!   MessagePack body. [`frames::encode`] and [`frames::decode`] turn typed
//!   messages into frames and back.
//! * [`messages`] — the typed commands of the two dialogues: clients
//!   (producers and gateways) talking to a broker's request port, and pulling
//!   workers talking to its worker port.
//! * [`peer`] — node-to-node messages and cluster events.
//! * [`limits`] — the limits and name rules more than one crate applies.
//! * [`Error`] — the one error type for bytes that are not a valid message.
//!
//! `PROTOCOL.md` beside this crate is the specification a client in another
//! language is written from; this crate is its reference implementation.
//! Nothing here panics on bytes from the wire.

mod error;
pub mod fast;
pub mod frames;
pub mod limits;
pub mod messages;
pub mod peer;
pub mod targets;

pub use error::Error;
pub use fast::FastDecode;
pub use frames::{decode, decode_hot, encode, PROTOCOL_VERSION};
pub use limits::{
    batch_has_room, is_valid_pool_name, is_valid_queue_name, is_valid_task_name, MAX_BATCHED,
    MAX_BATCHED_BYTES, MAX_TASK_BODY_BYTES,
};
pub use messages::*;
pub use peer::*;
