//! The value types of scenario fields: numbers written as integers or
//! strings ([`Num`]) and durations kept as written ([`DurationText`]).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

/// A number written as a TOML integer or a string: `4096`, `"0x1_0000_0000"`,
/// `"2M"`, `"1G"`. It is written back as a hex string, which reads as the
/// same number.
///
/// ```
/// use vmm::scenario::num::{parse_num, Num};
/// assert_eq!(parse_num("0x1_0000"), Ok(0x10000));
/// assert_eq!(parse_num("2M"), Ok(2 << 20));
/// assert_eq!(Num(4096).to_string(), "0x1000");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Num(pub u64);

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl Serialize for Num {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Num;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number: 4096, \"0x1000\" or \"2M\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Num, E> {
                u64::try_from(v)
                    .map(Num)
                    .map_err(|_| E::custom("must not be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Num, E> {
                Ok(Num(v))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Num, E> {
                parse_num(s).map(Num).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `0x…` (underscores allowed), or a decimal with an optional K/M/G/T suffix.
pub fn parse_num(s: &str) -> Result<u64, String> {
    let t = s.trim().replace('_', "");
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|_| format!("{s:?} is not a hex number"));
    }
    if t == "0" {
        return Ok(0);
    }
    crate::units::parse_size(&t)
}

/// A duration as written (`"10ms"`), checked by [`crate::units::parse_duration`]
/// when read; written back unchanged.
///
/// ```
/// use vmm::scenario::num::DurationText;
/// let d: DurationText = "20ms".parse().unwrap();
/// assert_eq!(d.duration(), std::time::Duration::from_millis(20));
/// assert!("soon".parse::<DurationText>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationText {
    text: String,
    duration: Duration,
}

impl DurationText {
    /// The duration.
    pub fn duration(&self) -> Duration {
        self.duration
    }
}

impl fmt::Display for DurationText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for DurationText {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(Self {
            duration: crate::units::parse_duration(s)?,
            text: s.to_string(),
        })
    }
}

impl Serialize for DurationText {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}
