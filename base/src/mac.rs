//! Ethernet MAC addresses. Traces, JSON reports and command lines write them as `aa:bb:cc:dd:ee:ff` (lower case,
//! colon-separated); [`MacAddr`] displays, parses and serialises as exactly that string.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// `ff:ff:ff:ff:ff:ff`.
    pub const BROADCAST: Self = Self([0xff; 6]);
    /// `00:00:00:00:00:00` (an unknown target, as in an ARP request).
    pub const ZERO: Self = Self([0; 6]);

    pub const fn new(octets: [u8; 6]) -> Self {
        Self(octets)
    }

    pub const fn octets(self) -> [u8; 6] {
        self.0
    }

    pub fn is_broadcast(self) -> bool {
        self == Self::BROADCAST
    }

    /// The group bit (the lowest bit of the first octet) is set: multicast, broadcast included.
    pub const fn is_multicast(self) -> bool {
        self.0[0] & 1 != 0
    }

    /// The text form, `aa:bb:cc:dd:ee:ff`, as bytes on the stack (the form the hot paths write out).
    pub fn text(self) -> [u8; 17] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [b':'; 17];
        for (i, b) in self.0.iter().enumerate() {
            out[3 * i] = HEX[usize::from(b >> 4)];
            out[3 * i + 1] = HEX[usize::from(b & 0xf)];
        }
        out
    }
}

impl From<[u8; 6]> for MacAddr {
    fn from(octets: [u8; 6]) -> Self {
        Self(octets)
    }
}

impl From<MacAddr> for [u8; 6] {
    fn from(mac: MacAddr) -> Self {
        mac.0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.text();
        f.pad(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

/// A string that is not a MAC address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{input}` is not a MAC address: write six hex octets separated by `:` or `-`, like 02:00:00:00:00:01"
)]
pub struct MacParseError {
    input: String,
}

impl FromStr for MacAddr {
    type Err = MacParseError;

    /// Six hex octets of one or two digits, in either case, separated all by `:` or all by `-`.
    fn from_str(s: &str) -> Result<Self, MacParseError> {
        let bad = || MacParseError { input: s.to_owned() };
        let sep = if s.contains('-') { '-' } else { ':' };
        let mut out = [0u8; 6];
        let mut parts = s.split(sep);
        for b in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.is_empty() || p.len() > 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = self.text();
        serializer.serialize_str(std::str::from_utf8(&text).map_err(serde::ser::Error::custom)?)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = MacAddr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a MAC address like 02:00:00:00:00:01")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MacAddr, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_lower_case_with_colons() {
        let mac = MacAddr([0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        assert_eq!(format!("{mac:<18}|"), "52:54:00:ab:cd:0f |");
        assert_eq!(MacAddr::BROADCAST.to_string(), "ff:ff:ff:ff:ff:ff");
    }

    #[test]
    fn parses_either_case_and_separator() {
        let want = MacAddr([0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
        for s in [
            "52:54:00:ab:cd:ef",
            "52:54:00:AB:CD:EF",
            "52-54-00-Ab-cD-eF",
            "52:54:0:ab:cd:ef",
        ] {
            assert_eq!(s.parse::<MacAddr>(), Ok(want), "{s}");
        }
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:00",
            "52:54:00:ab:cd:",
            "52:54:000:ab:cd:ef",
            "52:54:00:ab:cd:eg",
            "52:54:00-ab:cd:ef",
            "+2:54:00:ab:cd:ef",
            " 52:54:00:ab:cd:ef",
        ] {
            let err = bad.parse::<MacAddr>().expect_err(bad);
            assert!(err.to_string().contains("is not a MAC address"), "{err}");
        }
    }

    #[test]
    fn round_trips_through_text_and_json() {
        for octets in [
            [0; 6],
            [0xff; 6],
            [2, 0, 0, 0, 0, 1],
            [0xde, 0xad, 0xbe, 0xef, 0x01, 0x23],
        ] {
            let mac = MacAddr::from(octets);
            assert_eq!(mac.to_string().parse::<MacAddr>(), Ok(mac));
            let json = serde_json::to_string(&mac).unwrap();
            assert_eq!(json, format!("\"{mac}\""));
            assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), mac);
            assert_eq!(<[u8; 6]>::from(mac), octets);
            assert_eq!(mac.octets(), octets);
        }
        assert!(serde_json::from_str::<MacAddr>("\"nonsense\"").is_err());
        assert!(serde_json::from_str::<MacAddr>("[1,2,3,4,5,6]").is_err());
    }

    #[test]
    fn group_bits() {
        assert!(MacAddr::BROADCAST.is_broadcast());
        assert!(MacAddr::BROADCAST.is_multicast());
        let mcast = MacAddr([0x01, 0x00, 0x5e, 0, 0, 1]);
        assert!(mcast.is_multicast() && !mcast.is_broadcast());
        let unicast = MacAddr([0x02, 0, 0, 0, 0, 1]);
        assert!(!unicast.is_multicast() && !unicast.is_broadcast());
    }
}
