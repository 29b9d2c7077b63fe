//! Sans-I/O AoE protocol engines.
//!
//! Layer: above `aoe-wire`, below the daemons. The engines are deterministic state machines:
//! they are fed frames (and, for the initiator, time) and answer with frames to send or I/O to
//! perform. They never open a socket, touch a disk, read a clock or spawn a thread, so every
//! behaviour can be tested with byte vectors in simulated time (the quinn-proto design).
//!
//! - [`target`]: one exported device (shelf.slot). It answers Query Config, Mac Mask List,
//!   Reserve/Release and ATA commands; disk work leaves it as an [`target::IoRequest`] with a
//!   token, and comes back through [`target::Engine::complete`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod target;
