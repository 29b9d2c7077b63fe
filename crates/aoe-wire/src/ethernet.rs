use core::fmt;
use core::str::FromStr;

/// A 48-bit Ethernet (MAC) address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// ff:ff:ff:ff:ff:ff, where AoE discovery queries go (Linux `aoecmd_cfg_pkts`).
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    /// 00:00:00:00:00:00.
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    /// Builds an address from the first six bytes of `b`.
    ///
    /// # Panics
    /// If `b` is shorter than six bytes; callers pass slices whose length they checked.
    pub fn from_bytes(b: &[u8]) -> MacAddr {
        let mut a = [0u8; 6];
        a.copy_from_slice(&b[..6]);
        MacAddr(a)
    }

    /// The six bytes.
    pub const fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// True for ff:ff:ff:ff:ff:ff.
    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    /// True for group (multicast or broadcast) addresses: the I/G bit of the first octet.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// A string that is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseMacError(pub String);

impl fmt::Display for ParseMacError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "'{}' is not a MAC address (expected 12 hex digits, optionally separated by ':' or '-')",
            self.0
        )
    }
}

impl std::error::Error for ParseMacError {}

impl FromStr for MacAddr {
    type Err = ParseMacError;

    /// Accepts `00:11:22:33:44:55`, `00-11-22-33-44-55` and vblade's `-m` form `001122334455`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseMacError(s.to_string());
        let hex: String = s.chars().filter(|c| *c != ':' && *c != '-').collect();
        if hex.len() != 12 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(err());
        }
        let sep_ok = s.len() == 12 || s.len() == 17;
        if !sep_ok {
            return Err(err());
        }
        let mut a = [0u8; 6];
        for (i, byte) in a.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| err())?;
        }
        Ok(MacAddr(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        let m: MacAddr = "00:1b:21:AA:bb:0c".parse().unwrap();
        assert_eq!(m.0, [0x00, 0x1b, 0x21, 0xaa, 0xbb, 0x0c]);
        assert_eq!(m.to_string(), "00:1b:21:aa:bb:0c");
        assert_eq!("001b21aabb0c".parse::<MacAddr>().unwrap(), m);
        assert_eq!("00-1b-21-aa-bb-0c".parse::<MacAddr>().unwrap(), m);
        assert!("00:1b:21:aa:bb".parse::<MacAddr>().is_err());
        assert!("00:1b:21:aa:bb:0g".parse::<MacAddr>().is_err());
        assert!("00:1b:21:aa:bb:0c:".parse::<MacAddr>().is_err());
        assert!(MacAddr::BROADCAST.is_broadcast());
        assert!(MacAddr([0x01, 0, 0x5e, 0, 0, 1]).is_multicast());
        assert!(!m.is_multicast());
    }
}
