//! MAC addresses as the boot contract, the config and the registry spell them.

use std::fmt;
use std::str::FromStr;

/// An Ethernet hardware address. Parses `aa:bb:cc:dd:ee:ff` and `AA-BB-CC-DD-EE-FF`; prints the
/// canonical lower-case colon form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (write aa:bb:cc:dd:ee:ff)")]
pub struct MacParseError(pub String);

impl MacAddr {
    pub fn octets(self) -> [u8; 6] {
        self.0
    }

    /// Addresses no real NIC holds: all zero, broadcast, or multicast (group bit set).
    pub fn is_unicast_hardware(self) -> bool {
        self.0 != [0; 6] && self.0[0] & 1 == 0
    }

    /// The form used in URLs and file names (`52-54-00-12-34-56`).
    pub fn dashed(self) -> String {
        self.to_string().replace(':', "-")
    }
}

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(text.to_string());
        let separator = if text.contains('-') { '-' } else { ':' };
        let mut mac = [0u8; 6];
        let mut parts = text.split(separator);
        for byte in &mut mac {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        match parts.next() {
            None => Ok(Self(mac)),
            Some(_) => Err(err()),
        }
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_spellings_and_prints_one() {
        let mac: MacAddr = "52-54-00-AA-bb-0C".parse().unwrap();
        assert_eq!(mac.to_string(), "52:54:00:aa:bb:0c");
        assert_eq!(mac.dashed(), "52-54-00-aa-bb-0c");
        assert_eq!("52:54:00:aa:bb:0c".parse::<MacAddr>(), Ok(mac));
        for bad in [
            "",
            "52:54:00:aa:bb",
            "52:54:00:aa:bb:0c:00",
            "52:54:00:aa:bb:c",
            "52:54:00:aa:bb:0g",
            "52:54-00:aa:bb:0c",
            "+2:54:00:aa:bb:0c",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?}");
        }
        assert!(mac.is_unicast_hardware());
        assert!(!MacAddr([0; 6]).is_unicast_hardware());
        assert!(!MacAddr([0xff; 6]).is_unicast_hardware());
        assert!(!MacAddr([1, 0, 0x5e, 0, 0, 1]).is_unicast_hardware());
    }

    #[test]
    fn serde_is_the_colon_string() {
        let mac = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
        let json = serde_json::to_string(&mac).unwrap();
        assert_eq!(json, "\"52:54:00:00:00:01\"");
        assert_eq!(
            serde_json::from_str::<MacAddr>("\"52-54-00-00-00-01\"").unwrap(),
            mac
        );
        assert!(serde_json::from_str::<MacAddr>("\"nope\"").is_err());
    }
}
