//! The one duration grammar of Weft's settings, in `WEFT_*` variables and the mesh
//! file alike: a whole number and a unit, `100ms`, `10s`, `5m`, `1h`. A unit is
//! required, so `100` is never misread; values that overflow are refused.

use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration like 300ms, 10s, 5m or 1h")]
pub struct InvalidDuration(pub String);

pub fn parse(s: &str) -> Result<Duration, InvalidDuration> {
    let bad = || InvalidDuration(s.to_string());
    let t = s.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = |mul: u64| n.checked_mul(mul).map(Duration::from_secs).ok_or_else(bad);
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        _ => Err(bad()),
    }
}

/// A duration setting of a file (the mesh file), parsed as the file is read so the rest
/// of the program holds a value, never a string to parse again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Setting(pub Duration);

impl<'de> serde::Deserialize<'de> for Setting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map(Setting).map_err(serde::de::Error::custom)
    }
}

impl Setting {
    pub fn millis(self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_refusals() {
        assert_eq!(parse("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse(" 2s "), Ok(Duration::from_secs(2)));
        assert_eq!(parse("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "100", "ms", "1.5s", "-1s", "1d", "18446744073709551615h", "99999999999999999999ms"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(parse("soon").unwrap_err().to_string().contains("300ms"));
    }
}
