//! Ethernet addresses: parsed from `aa:bb:cc:dd:ee:ff` or `aa-bb-cc-dd-ee-ff` (any case), shown and
//! stored in lower-case colon form, (de)serialized as that string.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

/// The text was not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid MAC address {0:?}: expected six hex pairs like aa:bb:cc:dd:ee:ff or aa-bb-cc-dd-ee-ff"
)]
pub struct MacParseError(pub String);

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(s.to_owned());
        let sep = match s.as_bytes().get(2) {
            Some(b':') => ':',
            Some(b'-') => '-',
            _ => return Err(err()),
        };
        let mut bytes = [0u8; 6];
        let mut parts = s.split(sep);
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        match parts.next() {
            None => Ok(Self(bytes)),
            Some(_) => Err(err()),
        }
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_separators_any_case_and_shows_lower_colon() {
        let want = MacAddr([0xaa, 0xbb, 0xcc, 0x0d, 0xee, 0xff]);
        for text in [
            "aa:bb:cc:0d:ee:ff",
            "AA-BB-CC-0D-EE-FF",
            "Aa:bB:cc:0D:ee:Ff",
        ] {
            assert_eq!(text.parse::<MacAddr>().unwrap(), want, "{text}");
        }
        assert_eq!(want.to_string(), "aa:bb:cc:0d:ee:ff");
    }

    #[test]
    fn refuses_what_is_not_a_mac() {
        for text in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:ff:00",
            "aa:bb-cc:dd:ee:ff",
            "aa:bb:cc:dd:ee:f",
            "aa:bb:cc:dd:ee:fff",
            "aa:bb:cc:dd:ee:gg",
            "aabbccddeeff",
            "a:bb:cc:dd:ee:ff0",
            "+a:bb:cc:dd:ee:ff",
        ] {
            assert!(text.parse::<MacAddr>().is_err(), "{text}");
        }
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
