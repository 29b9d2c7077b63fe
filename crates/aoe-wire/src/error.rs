use core::fmt;

/// Why bytes could not be parsed as, or emitted into, an AoE frame.
///
/// Parse errors are the sender's fault (a malformed or truncated frame); emit errors are the
/// caller's (a buffer too small, a value the field cannot hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The buffer ends before the fields its layout (or its own length fields) require.
    Truncated {
        /// Bytes the layout needs.
        needed: usize,
        /// Bytes there are.
        got: usize,
    },
    /// The Ethernet frame does not carry EtherType 0x88A2.
    NotAoe {
        /// The EtherType found.
        ethertype: u16,
    },
    /// A config string longer than AoEr11's 1024-byte limit.
    ConfigTooLong {
        /// The length given.
        len: usize,
    },
    /// More list entries (MAC mask directives, reserve MACs) than the one-byte count can hold.
    TooManyEntries {
        /// The number of entries given.
        count: usize,
    },
    /// An emit buffer too small for the frame.
    BufferTooSmall {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes the buffer has.
        got: usize,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T> = core::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::Truncated { needed, got } => {
                write!(f, "truncated AoE frame: {got} bytes, layout needs {needed}")
            }
            Error::NotAoe { ethertype } => {
                write!(
                    f,
                    "not an AoE frame: EtherType {ethertype:#06x}, expected 0x88a2"
                )
            }
            Error::ConfigTooLong { len } => {
                write!(
                    f,
                    "config string of {len} bytes exceeds the AoEr11 limit of 1024"
                )
            }
            Error::TooManyEntries { count } => {
                write!(
                    f,
                    "{count} list entries exceed the 255 a one-byte count can hold"
                )
            }
            Error::BufferTooSmall { needed, got } => {
                write!(
                    f,
                    "emit buffer of {got} bytes is too small, frame needs {needed}"
                )
            }
        }
    }
}

impl std::error::Error for Error {}

/// Checks that `buf` holds at least `needed` bytes.
pub(crate) fn check_len(buf: &[u8], needed: usize) -> Result<()> {
    if buf.len() < needed {
        Err(Error::Truncated {
            needed,
            got: buf.len(),
        })
    } else {
        Ok(())
    }
}

/// Checks that an emit buffer holds at least `needed` bytes.
pub(crate) fn check_room(buf: &[u8], needed: usize) -> Result<()> {
    if buf.len() < needed {
        Err(Error::BufferTooSmall {
            needed,
            got: buf.len(),
        })
    } else {
        Ok(())
    }
}
