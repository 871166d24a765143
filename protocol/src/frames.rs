//! Multipart layout: `[""] ["MYM" version] [MessagePack body]`.
//!
//! A DEALER sends these three frames; the ROUTER it talks to sees the
//! sender's identity frame in front of them. The empty delimiter keeps the
//! layout REQ/REP compatible, as in the Majordomo protocol.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::fast::FastDecode;
use crate::Error;

/// The version byte this implementation speaks.
pub const PROTOCOL_VERSION: u8 = 1;

/// The three bytes every header frame starts with.
pub const SIGNATURE: &[u8; 3] = b"MYM";

/// Largest body accepted by [`decode`], in bytes. A task's own body is
/// limited to 1 MiB; the rest is room for its other fields.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// The header frame for [`PROTOCOL_VERSION`].
pub fn header() -> [u8; 4] {
    [SIGNATURE[0], SIGNATURE[1], SIGNATURE[2], PROTOCOL_VERSION]
}

/// Encodes a message as its three frames. Structs become MessagePack maps
/// keyed by field name, so clients in other languages read them by name.
pub fn encode<T: Serialize>(message: &T) -> Vec<Vec<u8>> {
    // Serializing our own message types into a Vec cannot fail: they hold
    // only strings, numbers, byte strings, sequences and maps.
    let mut body = Vec::with_capacity(256);
    if rmp_serde::encode::write_named(&mut body, message).is_err() {
        body.clear();
    }
    vec![Vec::new(), header().to_vec(), body]
}

/// Checks the layout and version of `frames` (without any identity frame)
/// and decodes the body.
pub fn decode<T: DeserializeOwned, F: AsRef<[u8]>>(frames: &[F]) -> Result<T, Error> {
    rmp_serde::from_slice(checked_body(frames)?).map_err(Error::body)
}

/// The body of `frames`, once layout, version and size are checked.
fn checked_body<F: AsRef<[u8]>>(frames: &[F]) -> Result<&[u8], Error> {
    let body = check_layout(frames)?;
    if body.len() > MAX_BODY_BYTES {
        return Err(Error::body(format!(
            "body of {} bytes exceeds the limit of {MAX_BODY_BYTES}",
            body.len()
        )));
    }
    Ok(body)
}

/// Like [`decode`], for the messages sent once per task: their usual form
/// skips serde's buffering ([`crate::fast`]); anything else decodes exactly
/// as [`decode`] does.
pub fn decode_hot<T: FastDecode, F: AsRef<[u8]>>(frames: &[F]) -> Result<T, Error> {
    let body = checked_body(frames)?;
    if let Some(m) = T::fast(body) {
        return Ok(m);
    }
    rmp_serde::from_slice(body).map_err(Error::body)
}

/// Reads just the `request_id` of a body that failed to decode as a whole,
/// so the error reply can still be matched by the client. `None` when the
/// body is not a map holding a `request_id` string.
pub fn peek_request_id<F: AsRef<[u8]>>(frames: &[F]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Id {
        request_id: String,
    }
    let body = frames.last()?.as_ref();
    if body.len() > MAX_BODY_BYTES {
        return None;
    }
    rmp_serde::from_slice::<Id>(body).ok().map(|i| i.request_id)
}

/// Validates delimiter, header and version; returns the body frame.
pub fn check_layout<F: AsRef<[u8]>>(frames: &[F]) -> Result<&[u8], Error> {
    if frames.len() != 3 {
        return Err(Error::frame_count(frames.len()));
    }
    if !frames[0].as_ref().is_empty() {
        return Err(Error::delimiter());
    }
    let header = frames[1].as_ref();
    if header.len() != 4 || &header[..3] != SIGNATURE {
        return Err(Error::header());
    }
    if header[3] != PROTOCOL_VERSION {
        return Err(Error::version(header[3]));
    }
    Ok(frames[2].as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClientCommand, ClientRequest};

    #[test]
    fn rejects_bad_layouts() {
        let ok = encode(&ClientRequest {
            request_id: "r".into(),
            command: ClientCommand::Ping,
        });
        assert!(decode::<ClientRequest, _>(&ok).is_ok());
        let e = decode::<ClientRequest, _>(&ok[1..]).unwrap_err();
        assert!(e.is_framing());
        let mut bad = ok.clone();
        bad[0] = b"x".to_vec();
        assert!(decode::<ClientRequest, _>(&bad).unwrap_err().is_framing());
        let mut bad = ok.clone();
        bad[1] = b"MYM\x07".to_vec();
        assert!(decode::<ClientRequest, _>(&bad)
            .unwrap_err()
            .is_unsupported_version());
        // A map with a request id but a bad command still yields the id.
        let mut bad = ok.clone();
        bad[2] = rmp_serde::to_vec_named(&std::collections::BTreeMap::from([
            ("request_id", "abc"),
            ("type", "nonsense"),
        ]))
        .unwrap();
        assert!(decode::<ClientRequest, _>(&bad).unwrap_err().is_body());
        assert_eq!(peek_request_id(&bad).as_deref(), Some("abc"));
        let mut bad = ok.clone();
        bad[2] = vec![0xc1];
        assert_eq!(peek_request_id(&bad), None);
        assert!(decode::<ClientRequest, _>(&bad).unwrap_err().is_body());
    }
}
