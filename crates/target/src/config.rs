//! Target configuration: vblade-style arguments or a TOML file with any number of exports.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aoe_wire::{MacAddr, TargetAddr};
use serde::Deserialize;

/// Buffer count advertised when none is given. Larger than vblade's 16 because requests are
/// served asynchronously and the socket buffer is sized to hold this many frames per export.
pub const DEFAULT_BUFFER_COUNT: u16 = 128;

/// I/O worker threads when none is given.
pub const DEFAULT_WORKERS: usize = 4;

/// One export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// The file or block device.
    pub path: PathBuf,
    /// Shelf (major).
    pub shelf: u16,
    /// Slot (minor).
    pub slot: u8,
    /// Interfaces it is served on.
    pub interfaces: Vec<String>,
    /// Refuse writes (vblade `-r`).
    pub read_only: bool,
    /// O_DIRECT (vblade `-d`).
    pub direct_io: bool,
    /// O_SYNC (vblade `-s`).
    pub sync: bool,
    /// Offset in sectors (vblade `-o`).
    pub offset: u64,
    /// Length in sectors (vblade `-l`); `None`: to the end.
    pub length: Option<u64>,
    /// Advertised buffer count (vblade `-b`), and enforced: disk requests beyond it per
    /// interface are dropped (see `aoe_proto::target::DropReason::OverBufferCount`).
    pub buffer_count: u16,
    /// Initial Mac Mask List (vblade `-m`); empty: everyone.
    pub allowed_macs: Vec<MacAddr>,
    /// Send the unsolicited Query Config response at start.
    pub announce: bool,
}

impl ExportSpec {
    /// The export's address.
    pub fn addr(&self) -> TargetAddr {
        TargetAddr::new(self.shelf, self.slot)
    }
}

/// Everything `aoe serve` runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServeConfig {
    /// The exports.
    pub exports: Vec<ExportSpec>,
    /// Where config strings, mask and reserve lists persist; `None`: in memory only.
    pub state_dir: Option<PathBuf>,
    /// I/O worker threads.
    pub workers: usize,
    /// Start (or reload) even when the duplicate probe finds another target answering for
    /// one of our addresses: the conflict is only logged.
    pub allow_duplicate: bool,
    /// How long the duplicate probe waits for answers ([`crate::probe`]); zero: no probe.
    pub probe: Duration,
}

/// A configuration that cannot run, with a message naming the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    state_dir: Option<PathBuf>,
    workers: Option<usize>,
    #[serde(default)]
    allow_duplicate: bool,
    probe_ms: Option<u64>,
    #[serde(default, rename = "export")]
    exports: Vec<FileExport>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileExport {
    path: PathBuf,
    shelf: u16,
    slot: u8,
    interfaces: Vec<String>,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    direct_io: bool,
    #[serde(default)]
    sync: bool,
    #[serde(default)]
    offset: u64,
    length: Option<u64>,
    buffer_count: Option<u16>,
    #[serde(default)]
    allowed_macs: Vec<String>,
    #[serde(default = "yes")]
    announce: bool,
}

fn yes() -> bool {
    true
}

impl ServeConfig {
    /// Parses a TOML configuration (see the README for the format). Relative paths are taken
    /// from the directory of `origin`.
    pub fn from_toml(text: &str, origin: &Path) -> Result<ServeConfig, ConfigError> {
        let f: FileConfig = toml::from_str(text)
            .map_err(|e| ConfigError(format!("{}: {}", origin.display(), e.message())))?;
        let base = origin.parent().unwrap_or(Path::new("."));
        let mut exports = Vec::new();
        for (i, e) in f.exports.into_iter().enumerate() {
            let allowed_macs = e
                .allowed_macs
                .iter()
                .map(|m| {
                    m.parse::<MacAddr>().map_err(|err| {
                        ConfigError(format!("{}: export #{}: {err}", origin.display(), i + 1))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            exports.push(ExportSpec {
                path: base.join(&e.path),
                shelf: e.shelf,
                slot: e.slot,
                interfaces: e.interfaces,
                read_only: e.read_only,
                direct_io: e.direct_io,
                sync: e.sync,
                offset: e.offset,
                length: e.length,
                buffer_count: e.buffer_count.unwrap_or(DEFAULT_BUFFER_COUNT),
                allowed_macs,
                announce: e.announce,
            });
        }
        let cfg = ServeConfig {
            exports,
            state_dir: f.state_dir.map(|d| base.join(d)),
            workers: f.workers.unwrap_or(DEFAULT_WORKERS),
            allow_duplicate: f.allow_duplicate,
            probe: f
                .probe_ms
                .map_or(crate::probe::DEFAULT_PROBE, Duration::from_millis),
        };
        cfg.check_static()
            .map_err(|e| ConfigError(format!("{}: {e}", origin.display())))?;
        Ok(cfg)
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<ServeConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config {}: {e}", path.display())))?;
        Self::from_toml(&text, path)
    }

    /// Checks what can be checked without touching files or interfaces: at least one export,
    /// real (non-wildcard) addresses, interfaces named, a non-zero buffer count, and no
    /// shelf.slot exported twice on one interface.
    pub fn check_static(&self) -> Result<(), ConfigError> {
        if self.exports.is_empty() {
            return Err(ConfigError("no exports configured".into()));
        }
        if self.workers == 0 {
            return Err(ConfigError("workers must be at least 1".into()));
        }
        let mut seen = HashSet::new();
        for e in &self.exports {
            let a = e.addr();
            if e.shelf == TargetAddr::BROADCAST_SHELF {
                return Err(ConfigError(format!(
                    "shelf {} is the broadcast shelf and cannot be exported (use 0-65534)",
                    e.shelf
                )));
            }
            if e.slot == TargetAddr::BROADCAST_SLOT {
                return Err(ConfigError(format!(
                    "slot {} is the broadcast slot and cannot be exported (use 0-254)",
                    e.slot
                )));
            }
            if e.interfaces.is_empty() {
                return Err(ConfigError(format!("{a}: no interfaces given")));
            }
            if e.buffer_count == 0 {
                return Err(ConfigError(format!("{a}: buffer count must be at least 1")));
            }
            for i in &e.interfaces {
                if !seen.insert((a, i.clone())) {
                    return Err(ConfigError(format!(
                        "{a} is exported twice on interface {i}"
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_file() {
        let t = r#"
            state_dir = "state"
            workers = 2
            allow_duplicate = true
            probe_ms = 250
            [[export]]
            path = "disk.img"
            shelf = 1
            slot = 2
            interfaces = ["veth0", "veth1"]
            read_only = true
            offset = 8
            length = 100
            buffer_count = 32
            allowed_macs = ["00:11:22:33:44:55"]
            announce = false
            [[export]]
            path = "/abs/other.img"
            shelf = 1
            slot = 3
            interfaces = ["veth0"]
        "#;
        let c = ServeConfig::from_toml(t, Path::new("/etc/aoe/serve.toml")).unwrap();
        assert_eq!(c.state_dir, Some(PathBuf::from("/etc/aoe/state")));
        assert_eq!(c.workers, 2);
        assert!(c.allow_duplicate);
        assert_eq!(c.probe, Duration::from_millis(250));
        let e = &c.exports[0];
        assert_eq!(e.path, PathBuf::from("/etc/aoe/disk.img"));
        assert_eq!((e.shelf, e.slot, e.offset, e.length), (1, 2, 8, Some(100)));
        assert!(e.read_only && !e.announce);
        assert_eq!(e.allowed_macs.len(), 1);
        assert_eq!(c.exports[1].path, PathBuf::from("/abs/other.img"));
        assert_eq!(c.exports[1].buffer_count, DEFAULT_BUFFER_COUNT);
        assert!(c.exports[1].announce);
    }

    #[test]
    fn refuses_bad_configs() {
        let base = |extra: &str| {
            format!("[[export]]\npath = \"a\"\nshelf = 1\nslot = 1\ninterfaces = [\"x\"]\n{extra}")
        };
        let err = |t: &str| {
            ServeConfig::from_toml(t, Path::new("/c.toml"))
                .unwrap_err()
                .to_string()
        };
        assert!(err("").contains("no exports"));
        assert!(err(&base("bogus = 1")).contains("bogus"));
        assert!(err(&base("allowed_macs = [\"zz\"]")).contains("not a MAC"));
        assert!(err(&base("buffer_count = 0")).contains("buffer count"));
        let dup = format!("{}\n{}", base(""), base(""));
        assert!(
            err(&dup).contains("exported twice on interface x"),
            "{}",
            err(&dup)
        );
        assert!(err(&base("").replace("shelf = 1", "shelf = 65535")).contains("broadcast shelf"));
        assert!(err(&base("").replace("slot = 1", "slot = 255")).contains("broadcast slot"));
        assert!(
            err(&base("").replace("interfaces = [\"x\"]", "interfaces = []"))
                .contains("no interfaces")
        );
    }
}
