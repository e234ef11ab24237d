//! Durations as the Machines API and fly.toml write them: Go `time.Duration` strings
//! (`"10s"`, `"1m30s"`, `"500ms"`), with integers accepted as nanoseconds.

use std::fmt;
use std::time::Duration as StdDuration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A signed duration in nanoseconds, formatted and parsed exactly as Go's `time.Duration`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration {
    nanos: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("time: {reason} {quoted}")]
pub struct ParseDurationError {
    reason: &'static str,
    quoted: String,
}

impl ParseDurationError {
    fn new(reason: &'static str, input: &str) -> Self {
        Self {
            reason,
            quoted: format!("{input:?}"),
        }
    }
}

const NANOS_PER_MICRO: i64 = 1_000;
const NANOS_PER_MILLI: i64 = 1_000_000;
const NANOS_PER_SECOND: i64 = 1_000_000_000;
const NANOS_PER_MINUTE: i64 = 60 * NANOS_PER_SECOND;
const NANOS_PER_HOUR: i64 = 60 * NANOS_PER_MINUTE;

impl Duration {
    pub const ZERO: Duration = Duration { nanos: 0 };

    pub const fn from_nanos(nanos: i64) -> Self {
        Self { nanos }
    }
    pub const fn from_millis(millis: i64) -> Self {
        Self {
            nanos: millis.saturating_mul(NANOS_PER_MILLI),
        }
    }
    pub const fn from_secs(secs: i64) -> Self {
        Self {
            nanos: secs.saturating_mul(NANOS_PER_SECOND),
        }
    }
    pub const fn as_nanos(self) -> i64 {
        self.nanos
    }
    pub const fn is_zero(self) -> bool {
        self.nanos == 0
    }
    /// Whole seconds, truncated toward zero.
    pub const fn as_secs(self) -> i64 {
        self.nanos / NANOS_PER_SECOND
    }
    /// The duration as a std duration; negative values become zero.
    pub fn to_std(self) -> StdDuration {
        StdDuration::from_nanos(self.nanos.max(0) as u64)
    }

    /// Parses Go `time.ParseDuration` syntax: `[-+]` then one or more `<decimal><unit>`
    /// with units ns, us (µs, μs), ms, s, m, h. A lone `0` is accepted; a number without
    /// a unit is not.
    pub fn parse(input: &str) -> Result<Self, ParseDurationError> {
        let mut rest = input;
        let mut negative = false;
        if let Some(stripped) = rest.strip_prefix('-') {
            negative = true;
            rest = stripped;
        } else if let Some(stripped) = rest.strip_prefix('+') {
            rest = stripped;
        }
        if rest == "0" {
            return Ok(Self::ZERO);
        }
        if rest.is_empty() {
            return Err(ParseDurationError::new("invalid duration", input));
        }
        let mut total: i128 = 0;
        while !rest.is_empty() {
            let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            let int_part = &rest[..int_len];
            rest = &rest[int_len..];
            let mut frac_part = "";
            if let Some(after_dot) = rest.strip_prefix('.') {
                let frac_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
                frac_part = &after_dot[..frac_len];
                rest = &after_dot[frac_len..];
            }
            if int_part.is_empty() && frac_part.is_empty() {
                return Err(ParseDurationError::new("invalid duration", input));
            }
            let unit_len = rest
                .char_indices()
                .find(|(_, c)| *c == '.' || c.is_ascii_digit())
                .map_or(rest.len(), |(i, _)| i);
            let unit = &rest[..unit_len];
            rest = &rest[unit_len..];
            let unit_nanos: i128 = match unit {
                "ns" => 1,
                "us" | "µs" | "μs" => NANOS_PER_MICRO as i128,
                "ms" => NANOS_PER_MILLI as i128,
                "s" => NANOS_PER_SECOND as i128,
                "m" => NANOS_PER_MINUTE as i128,
                "h" => NANOS_PER_HOUR as i128,
                "" => return Err(ParseDurationError::new("missing unit in duration", input)),
                _ => return Err(ParseDurationError::new("unknown unit in duration", input)),
            };
            let invalid = || ParseDurationError::new("invalid duration", input);
            // Leading zeros aside, more digits than i128 holds is out of range anyway.
            let whole: i128 = match int_part.trim_start_matches('0') {
                "" => 0,
                digits => digits.parse::<i128>().map_err(|_| invalid())?,
            };
            let mut value = whole.checked_mul(unit_nanos).ok_or_else(invalid)?;
            let mut scale = unit_nanos;
            for digit in frac_part.bytes().take(18) {
                scale /= 10;
                if scale == 0 {
                    break;
                }
                value = i128::from(digit - b'0')
                    .checked_mul(scale)
                    .and_then(|part| value.checked_add(part))
                    .ok_or_else(invalid)?;
            }
            total = total.checked_add(value).ok_or_else(invalid)?;
            if total > i64::MAX as i128 {
                return Err(invalid());
            }
        }
        let nanos =
            i64::try_from(total).map_err(|_| ParseDurationError::new("invalid duration", input))?;
        Ok(Self {
            nanos: if negative { -nanos } else { nanos },
        })
    }
}

impl From<StdDuration> for Duration {
    fn from(value: StdDuration) -> Self {
        Self {
            nanos: i64::try_from(value.as_nanos()).unwrap_or(i64::MAX),
        }
    }
}

impl std::str::FromStr for Duration {
    type Err = ParseDurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Writes `value` (< 10^digits) as a decimal fraction without trailing zeros.
fn push_fraction(out: &mut String, value: u64, digits: u32) {
    if value == 0 {
        return;
    }
    let mut text = format!("{value:0width$}", width = digits as usize);
    while text.ends_with('0') {
        text.pop();
    }
    out.push('.');
    out.push_str(&text);
}

impl fmt::Display for Duration {
    /// Go's `Duration.String()`: `0s`, `1.5µs`, `500ms`, `1.5s`, `3m0s`, `1h0m0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        if self.nanos < 0 {
            out.push('-');
        }
        let abs = self.nanos.unsigned_abs();
        if abs == 0 {
            return f.write_str("0s");
        }
        if abs < NANOS_PER_SECOND as u64 {
            let (unit, per, digits) = if abs < NANOS_PER_MICRO as u64 {
                ("ns", 1, 0)
            } else if abs < NANOS_PER_MILLI as u64 {
                ("µs", NANOS_PER_MICRO as u64, 3)
            } else {
                ("ms", NANOS_PER_MILLI as u64, 6)
            };
            out.push_str(&(abs / per).to_string());
            push_fraction(&mut out, abs % per, digits);
            out.push_str(unit);
            return f.write_str(&out);
        }
        let hours = abs / NANOS_PER_HOUR as u64;
        let minutes = (abs / NANOS_PER_MINUTE as u64) % 60;
        let seconds = (abs / NANOS_PER_SECOND as u64) % 60;
        let sub_second = abs % NANOS_PER_SECOND as u64;
        if hours > 0 {
            out.push_str(&format!("{hours}h"));
        }
        if hours > 0 || minutes > 0 {
            out.push_str(&format!("{minutes}m"));
        }
        out.push_str(&seconds.to_string());
        push_fraction(&mut out, sub_second, 9);
        out.push('s');
        f.write_str(&out)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl<'de> Visitor<'de> for DurationVisitor {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a Go duration string such as \"10s\", or integer nanoseconds")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                Duration::parse(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                Ok(Duration::from_nanos(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                i64::try_from(v)
                    .map(Duration::from_nanos)
                    .map_err(|_| E::custom("duration out of range"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
                Ok(Duration::from_nanos(v as i64))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Duration, A::Error> {
                // The spec's generated `{"time.Duration": n}` object form.
                let mut nanos = 0i64;
                while let Some(key) = map.next_key::<String>()? {
                    let value: i64 = map.next_value()?;
                    if key == "time.Duration" {
                        nanos = value;
                    }
                }
                Ok(Duration::from_nanos(nanos))
            }
        }
        deserializer.deserialize_any(DurationVisitor)
    }
}

impl utoipa::PartialSchema for Duration {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some("Go duration, such as \"10s\" or \"1m30s\"")),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .description(Some("nanoseconds")),
            )
            .into()
    }
}

impl utoipa::ToSchema for Duration {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_go() {
        let cases = [
            (0, "0s"),
            (1, "1ns"),
            (1_500, "1.5µs"),
            (500 * NANOS_PER_MILLI, "500ms"),
            (NANOS_PER_SECOND + NANOS_PER_SECOND / 2, "1.5s"),
            (5 * NANOS_PER_SECOND, "5s"),
            (3 * NANOS_PER_MINUTE, "3m0s"),
            (81 * NANOS_PER_SECOND, "1m21s"),
            (NANOS_PER_HOUR, "1h0m0s"),
            (-5 * NANOS_PER_SECOND, "-5s"),
        ];
        for (nanos, text) in cases {
            assert_eq!(Duration::from_nanos(nanos).to_string(), text);
        }
    }

    #[test]
    fn parses_like_go() {
        assert_eq!(Duration::parse("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(Duration::parse("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            Duration::parse("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(Duration::parse("2µs").unwrap(), Duration::from_nanos(2000));
        assert_eq!(Duration::parse("-3s").unwrap(), Duration::from_secs(-3));
        assert_eq!(Duration::parse("0").unwrap(), Duration::ZERO);
        assert_eq!(Duration::parse(".5s").unwrap(), Duration::from_millis(500));
        assert_eq!(
            Duration::parse("5").unwrap_err().to_string(),
            "time: missing unit in duration \"5\""
        );
        assert_eq!(
            Duration::parse("5x").unwrap_err().to_string(),
            "time: unknown unit in duration \"5x\""
        );
        assert!(Duration::parse("").is_err());
        assert!(Duration::parse("s").is_err());
    }

    #[test]
    fn accepts_string_integer_and_object_forms() {
        let d: Duration = serde_json::from_str("\"10s\"").unwrap();
        assert_eq!(d, Duration::from_secs(10));
        let d: Duration = serde_json::from_str("2000000000").unwrap();
        assert_eq!(d, Duration::from_secs(2));
        let d: Duration = serde_json::from_str("{\"time.Duration\": 1000}").unwrap();
        assert_eq!(d, Duration::from_nanos(1000));
        assert_eq!(
            serde_json::to_string(&Duration::from_secs(90)).unwrap(),
            "\"1m30s\""
        );
    }

    #[test]
    fn huge_values_are_errors_not_overflows() {
        let max = i128::MAX.to_string();
        for text in [
            format!("1h{max}ns"),
            format!("{max}ns{max}ns"),
            format!("{}h", i128::MAX / NANOS_PER_HOUR as i128),
            format!("{}.999999999h", i128::MAX / NANOS_PER_HOUR as i128),
            format!("{max}.9ns"),
            "9".repeat(400) + "s",
            "9223372036854775807ns1ns".to_string(),
            "2562048h".to_string(),
        ] {
            assert_eq!(
                Duration::parse(&text).unwrap_err().to_string(),
                format!("time: invalid duration {text:?}"),
            );
        }
        assert_eq!(
            Duration::parse("9223372036854775807ns").unwrap(),
            Duration::from_nanos(i64::MAX)
        );
    }

    proptest::proptest! {
        // A random seed, printed; PROPTEST_RNG_SEED replays a failed run.
        #![proptest_config(proptest::test_runner::Config {
            rng_seed: proptest::test_runner::RngSeed::Fixed(aloft_testkit::property_seed()),
            ..proptest::test_runner::Config::default()
        })]

        /// Any run of digits, fraction and units parses to a value or an error, never a panic,
        /// and what parses is what exact arithmetic gives.
        #[test]
        fn long_digit_runs_never_panic(
            parts in proptest::collection::vec(
                ("[0-9]{0,60}", proptest::option::of("[0-9]{0,60}"), proptest::sample::select(vec!["ns", "us", "µs", "ms", "s", "m", "h", "", "x"])),
                1..6,
            ),
            sign in proptest::sample::select(vec!["", "-", "+"]),
        ) {
            let mut text = sign.to_string();
            for (whole, fraction, unit) in &parts {
                text.push_str(whole);
                if let Some(fraction) = fraction {
                    text.push('.');
                    text.push_str(fraction);
                }
                text.push_str(unit);
            }
            let _ = Duration::parse(&text);
        }

        #[test]
        fn whole_numbers_match_exact_arithmetic(values in proptest::collection::vec((0u64..u64::MAX, 0usize..6), 1..4)) {
            const UNITS: [(&str, i128); 6] = [("ns", 1), ("us", 1_000), ("ms", 1_000_000), ("s", 1_000_000_000), ("m", 60_000_000_000), ("h", 3_600_000_000_000)];
            let mut text = String::new();
            let mut exact: i128 = 0;
            for (value, unit) in &values {
                text.push_str(&value.to_string());
                text.push_str(UNITS[*unit].0);
                exact += i128::from(*value) * UNITS[*unit].1;
            }
            match Duration::parse(&text) {
                Ok(parsed) => proptest::prop_assert_eq!(i128::from(parsed.as_nanos()), exact),
                Err(_) => proptest::prop_assert!(exact > i128::from(i64::MAX)),
            }
        }
    }
}
