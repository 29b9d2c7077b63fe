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
//! - [`initiator`]: every device the host sees. Discovery, IDENTIFY, block I/O split into
//!   frames, RTT-based retransmission, congestion window per target MAC, multipath failover
//!   and dead-device detection, as the Linux `aoe` driver does; time is passed in.
//! - `sim` (this crate's tests, or the `sim` feature): the initiator engine against target
//!   engines over a seeded, simulated link in virtual time; the fuzz targets use it too.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod initiator;
pub mod ratelimit;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod target;
