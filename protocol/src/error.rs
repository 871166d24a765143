//! The protocol's error type: why a multipart message could not be decoded.

use std::fmt;

/// A message that could not be decoded. Messages are for people; use the
/// `is_*` predicates to decide what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// Fewer or more frames than the layout has.
    FrameCount(usize),
    /// The first frame was not the empty delimiter.
    Delimiter,
    /// The header frame is not `"MYM"` followed by a version byte.
    Header,
    /// The header names a version this implementation does not speak.
    Version(u8),
    /// The body is not a valid MessagePack message of the expected type.
    Body(String),
}

impl Error {
    pub(crate) fn frame_count(n: usize) -> Self {
        Error {
            kind: Kind::FrameCount(n),
        }
    }
    pub(crate) fn delimiter() -> Self {
        Error {
            kind: Kind::Delimiter,
        }
    }
    pub(crate) fn header() -> Self {
        Error { kind: Kind::Header }
    }
    pub(crate) fn version(v: u8) -> Self {
        Error {
            kind: Kind::Version(v),
        }
    }
    pub(crate) fn body(e: impl fmt::Display) -> Self {
        Error {
            kind: Kind::Body(e.to_string()),
        }
    }

    /// The header carried a version byte other than [`crate::PROTOCOL_VERSION`].
    pub fn is_unsupported_version(&self) -> bool {
        matches!(self.kind, Kind::Version(_))
    }

    /// The frames did not follow the layout (count, delimiter or header).
    pub fn is_framing(&self) -> bool {
        matches!(
            self.kind,
            Kind::FrameCount(_) | Kind::Delimiter | Kind::Header
        )
    }

    /// The frames were well laid out but the body was not a valid message.
    pub fn is_body(&self) -> bool {
        matches!(self.kind, Kind::Body(_))
    }

    /// The error code a reply carries for this error (see `PROTOCOL.md`).
    pub fn code(&self) -> crate::ErrorCode {
        match self.kind {
            Kind::Version(_) => crate::ErrorCode::UnsupportedVersion,
            _ => crate::ErrorCode::Malformed,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::FrameCount(n) => write!(
                f,
                "expected 3 frames (empty delimiter, header, body), got {n}"
            ),
            Kind::Delimiter => write!(f, "the first frame must be empty (the delimiter)"),
            Kind::Header => write!(
                f,
                "the header frame must be \"MYM\" followed by a version byte"
            ),
            Kind::Version(v) => write!(
                f,
                "protocol version {v} is not supported (this node speaks {})",
                crate::PROTOCOL_VERSION
            ),
            Kind::Body(e) => write!(f, "malformed message body: {e}"),
        }
    }
}

impl std::error::Error for Error {}
