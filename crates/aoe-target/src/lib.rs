//! The AoE target daemon: exports files and block devices as shelf.slot.
//!
//! Layer: the I/O driver around [`aoe_proto::target::Engine`]. It owns the sockets
//! (`aoe-sys`), the backing stores and their worker pool (`aoe-store`), configuration,
//! persistent state, signals and logs. The protocol decisions are the engine's.
//!
//! ```text
//!   AF_PACKET socket --recvmmsg--> Daemon::dispatch --frame--> Engine::handle_frame
//!        ^                                                      |        |
//!        |                                        Reply(n) <----+        +----> Io(token, op)
//!        |                                           |                           |
//!        +--------sendmmsg------- send queue <-------+                   Pool (worker threads)
//!                                     ^                                          |
//!                                     +---- Engine::complete(token) <--- eventfd wake-up
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backing;
pub mod config;
pub mod control;
mod daemon;
pub mod probe;
pub mod state;

pub use backing::CEPH_CONNECT_TIMEOUT;
pub use config::{CephOptions, ExportSpec, IoMode, Overrides, ServeConfig};
pub use daemon::{validate, Control, Daemon, WorkLost};
