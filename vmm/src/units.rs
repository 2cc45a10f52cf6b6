//! Sizes and durations as people type them (`256M`, `4K`, `500ms`, `2m`),
//! shared by the command line, scenario files and `vmm bench`.
//!
//! Hand-written rather than `bytesize`/`humantime`: our sizes are binary
//! with one-letter suffixes (`256M` is 256 MiB; `bytesize` reads it as
//! 256 MB), and our durations accept a plain number of seconds and refuse
//! anything under a millisecond (a zero timer would disarm a timerfd),
//! neither of which `humantime` does.
//!
//! ```
//! use vmm::units::{parse_duration, parse_size};
//! assert_eq!(parse_size("256M"), Ok(256 << 20));
//! assert_eq!(parse_size("2G"), Ok(2 << 30));
//! assert!(parse_size("3x").unwrap_err().contains("256M"));
//! assert!(parse_size("16777216T").unwrap_err().contains("too large"));
//! assert_eq!(parse_duration("1500ms"), Ok(std::time::Duration::from_millis(1500)));
//! assert!(parse_duration("1000000000s").unwrap_err().contains("too large"));
//! ```

use std::time::Duration;

use guest_image::protocol::layout;

use crate::mm::addr::PAGE_SIZE;

/// The accepted size form, for error messages.
pub const SIZE_FORM: &str =
    "expected a size like 256M, 2G, 64K or 1048576 (bytes; suffixes K, M, G, T are powers of 1024)";

const DURATION_FORM: &str = "expected a duration like 30s, 500ms, 2m or 1h";

/// The longest duration accepted: 1,000,000 seconds (about 11.6 days).
pub const MAX_DURATION: Duration = Duration::from_secs(1_000_000);

/// Parses `256M`-style sizes. Zero is refused, and so is a size past
/// `u64::MAX` bytes (the message says "too large" and gives the maximum).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s:?}: unknown suffix {c:?}; {SIZE_FORM}")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{s:?} is not a size; {SIZE_FORM}"));
    }
    let too_large = || {
        format!(
            "{s:?} is too large: the maximum is {} bytes (16 EiB - 1); {SIZE_FORM}",
            u64::MAX
        )
    };
    let n: u64 = digits.parse().map_err(|_| too_large())?;
    if n == 0 {
        return Err(format!(
            "{s:?}: size must be greater than zero; {SIZE_FORM}"
        ));
    }
    n.checked_mul(1 << shift).ok_or_else(too_large)
}

/// Parses a guest RAM size: a non-zero multiple of 4 KiB that fits between
/// `RAM_BASE` (1 GiB) and the end of the 64 GiB identity window.
pub fn parse_mem(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    let max = layout::IDENTITY_END - layout::RAM_BASE;
    if n > max {
        return Err(format!(
            "{s:?} is too large: the guest RAM maximum is {} GiB",
            max >> 30
        ));
    }
    if n % PAGE_SIZE != 0 {
        return Err(format!("{s:?} is not a multiple of 4 KiB; {SIZE_FORM}"));
    }
    Ok(n)
}

/// Parses `10s`, `500ms`, `2m`, `1h` or a plain number of seconds, from
/// 1 ms to [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; {DURATION_FORM}"))?;
    let secs = match unit {
        "" | "s" => v,
        "ms" => v / 1e3,
        "us" | "µs" => v / 1e6,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; {DURATION_FORM}")),
    };
    if secs < 0.001 {
        return Err(format!("{s:?}: must be at least 1ms; {DURATION_FORM}"));
    }
    if secs > MAX_DURATION.as_secs_f64() {
        return Err(format!(
            "{s:?} is too large: the maximum is {}s; {DURATION_FORM}",
            MAX_DURATION.as_secs()
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `1.234 ms`-style formatting.
pub fn fmt_duration(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.1} µs")
    } else if us < 1e6 {
        format!("{:.1} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_size_rejects_zero_and_garbage_naming_the_form() {
        for bad in ["0", "3x", "", "M", "-1", "99999999999T", "1.5M", "+4K"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains("256M"), "{bad}: {e}");
        }
        assert_eq!(parse_size("64k"), Ok(64 << 10));
    }

    #[test]
    fn test_too_large_sizes_say_so_and_give_the_maximum() {
        for big in [
            "16777216T",
            "99999999999999999999999",
            "18446744073709551616",
        ] {
            let e = parse_size(big).unwrap_err();
            assert!(
                e.contains("too large") && e.contains("18446744073709551615"),
                "{e}"
            );
        }
        let e = parse_mem("18446744073709551615").unwrap_err();
        assert!(e.contains("too large") && e.contains("63 GiB"), "{e}");
    }

    #[test]
    fn test_parse_mem_requires_page_multiple_and_fits_window() {
        assert!(parse_mem("1000").unwrap_err().contains("4 KiB"));
        assert!(parse_mem("64G").unwrap_err().contains("maximum"));
        assert_eq!(parse_mem("2G"), Ok(2 << 30));
    }

    #[test]
    fn test_parse_duration_units() {
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        // Regression: would round to zero, which disarms the timerfd.
        assert!(parse_duration("0.0000000001").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn test_too_long_durations_say_too_large_not_too_small() {
        let e = parse_duration("1000000000s").unwrap_err();
        assert!(e.contains("too large") && e.contains("1000000s"), "{e}");
        assert_eq!(parse_duration("1000000s"), Ok(MAX_DURATION));
    }
}
