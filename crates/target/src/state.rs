//! Persistent per-export state: the config string, Mac Mask List and reserve list survive
//! restarts in a state directory, one small TOML file per export (`e<shelf>.<slot>.toml`),
//! replaced atomically (write, fsync, rename).

use std::io::Write;
use std::path::{Path, PathBuf};

use aoe_proto::target::PersistentState;
use aoe_wire::{MacAddr, TargetAddr};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, Default)]
struct Stored {
    /// The config string as hex: it may hold any bytes.
    config_hex: String,
    mask: Vec<String>,
    reserve: Vec<String>,
    /// The configured initial mask when `mask` was last seeded from it; a different
    /// configured list re-seeds the mask.
    mask_source: Vec<String>,
}

/// Where one export's state lives.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

fn macs(v: &[String]) -> Vec<MacAddr> {
    v.iter().filter_map(|s| s.parse().ok()).collect()
}

fn strs(v: &[MacAddr]) -> Vec<String> {
    v.iter().map(|m| m.to_string()).collect()
}

impl StateFile {
    /// The state file of `addr` in `dir`.
    pub fn new(dir: &Path, addr: TargetAddr) -> StateFile {
        StateFile {
            path: dir.join(format!("{addr}.toml")),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the state; a missing file gives the initial state (`configured_mask` as the
    /// mask). If the configured mask changed since the state was saved, it replaces the
    /// stored mask: the administrator's newer word wins.
    pub fn load(&self, configured_mask: &[MacAddr]) -> std::io::Result<PersistentState> {
        let stored: Stored = match std::fs::read_to_string(&self.path) {
            Ok(t) => toml::from_str(&t).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("state file {}: {}", self.path.display(), e.message()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(PersistentState {
                    mask: configured_mask.to_vec(),
                    ..Default::default()
                })
            }
            Err(e) => return Err(e),
        };
        let config = hex_decode(&stored.config_hex).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("state file {}: config_hex is not hex", self.path.display()),
            )
        })?;
        let mask = if macs(&stored.mask_source) == configured_mask {
            macs(&stored.mask)
        } else {
            configured_mask.to_vec()
        };
        Ok(PersistentState {
            config,
            mask,
            reserve: macs(&stored.reserve),
        })
    }

    /// Saves the state atomically.
    pub fn save(&self, s: &PersistentState, configured_mask: &[MacAddr]) -> std::io::Result<()> {
        let stored = Stored {
            config_hex: hex_encode(&s.config),
            mask: strs(&s.mask),
            reserve: strs(&s.reserve),
            mask_source: strs(configured_mask),
        };
        let text = toml::to_string(&stored).map_err(std::io::Error::other)?;
        if let Some(d) = self.path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let tmp = self.path.with_extension("toml.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)
    }
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_reseed() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path(), TargetAddr::new(3, 4));
        assert!(f.path().ends_with("e3.4.toml"));
        let a = MacAddr([2, 0, 0, 0, 0, 1]);
        let b = MacAddr([2, 0, 0, 0, 0, 2]);
        let fresh = f.load(&[a]).unwrap();
        assert_eq!(fresh.mask, vec![a]);
        let s = PersistentState {
            config: vec![0, 0xff, b'x'],
            mask: vec![a, b],
            reserve: vec![b],
        };
        f.save(&s, &[a]).unwrap();
        assert_eq!(f.load(&[a]).unwrap(), s);
        // The configured list changed: it replaces the stored mask, the rest stays.
        let re = f.load(&[]).unwrap();
        assert!(re.mask.is_empty());
        assert_eq!(re.config, s.config);
        std::fs::write(
            f.path(),
            "config_hex = \"zz\"\nmask=[]\nreserve=[]\nmask_source=[]\n",
        )
        .unwrap();
        assert!(f.load(&[]).is_err());
    }
}
