//! Human sizes (spec/flytoml.md §3.3) and the VM size presets (§2.11).

/// A named machine size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestPreset {
    pub name: &'static str,
    pub cpu_kind: &'static str,
    pub cpus: u32,
    pub memory_mb: u32,
    pub gpus: u32,
    pub gpu_kind: Option<&'static str>,
}

const fn shared(name: &'static str, cpus: u32) -> GuestPreset {
    GuestPreset {
        name,
        cpu_kind: "shared",
        cpus,
        memory_mb: 256 * cpus,
        gpus: 0,
        gpu_kind: None,
    }
}

const fn performance(name: &'static str, cpus: u32) -> GuestPreset {
    GuestPreset {
        name,
        cpu_kind: "performance",
        cpus,
        memory_mb: 2048 * cpus,
        gpus: 0,
        gpu_kind: None,
    }
}

const fn gpu(name: &'static str, kind: &'static str) -> GuestPreset {
    GuestPreset {
        name,
        cpu_kind: "performance",
        cpus: 8,
        memory_mb: 32768,
        gpus: 1,
        gpu_kind: Some(kind),
    }
}

pub const VM_SIZES: &[GuestPreset] = &[
    shared("shared-cpu-1x", 1),
    shared("shared-cpu-2x", 2),
    shared("shared-cpu-4x", 4),
    shared("shared-cpu-6x", 6),
    shared("shared-cpu-8x", 8),
    performance("performance-1x", 1),
    performance("performance-2x", 2),
    performance("performance-4x", 4),
    performance("performance-6x", 6),
    performance("performance-8x", 8),
    performance("performance-10x", 10),
    performance("performance-12x", 12),
    performance("performance-14x", 14),
    performance("performance-16x", 16),
    gpu("a100-40gb", "a100-pcie-40gb"),
    gpu("a100-80gb", "a100-sxm4-80gb"),
    gpu("l40s", "l40s"),
    gpu("a10", "a10"),
];

pub const GPU_KINDS: &[&str] = &["a100-pcie-40gb", "a100-sxm4-80gb", "l40s", "a10"];
pub const CPU_KINDS: &[&str] = &["shared", "performance"];

pub fn preset(name: &str) -> Option<&'static GuestPreset> {
    VM_SIZES.iter().find(|p| p.name == name)
}

/// Valid cpu counts and memory per cpu (MB) for a cpu kind, as the platform enforces.
pub fn cpu_limits(cpu_kind: &str) -> Option<(&'static [u32], u32, u32)> {
    match cpu_kind {
        "shared" => Some((&[1, 2, 4, 6, 8], 256, 2048)),
        "performance" => Some((&[1, 2, 4, 6, 8, 10, 12, 14, 16], 2048, 8192)),
        _ => None,
    }
}

/// Splits `"1.5 GiB"` into (1.5, 'g'); `None` when it does not look like a size.
fn split_size(text: &str) -> Option<(f64, Option<char>)> {
    let text = text.trim();
    let number_len = text
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b'.')
        .count();
    let (number, rest) = text.split_at(number_len);
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let rest = rest.strip_prefix(' ').unwrap_or(rest).to_ascii_lowercase();
    let mut chars = rest.chars();
    let unit = match chars.next() {
        None => return Some((value, None)),
        Some(c @ ('k' | 'm' | 'g' | 't' | 'p')) => Some(c),
        Some('b') if chars.as_str().is_empty() => return Some((value, None)),
        Some(_) => return None,
    };
    match chars.as_str() {
        "" | "b" | "i" | "ib" => Some((value, unit)),
        _ => None,
    }
}

fn power(unit: Option<char>) -> i32 {
    match unit {
        None => 0,
        Some('k') => 1,
        Some('m') => 2,
        Some('g') => 3,
        Some('t') => 4,
        _ => 5,
    }
}

/// `[[vm]] memory`: digits = MB; otherwise a size with binary multiples, in MB.
pub fn parse_memory_mb(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
        return trimmed
            .parse::<u64>()
            .map_err(|e| format!("invalid memory size '{text}': {e}"));
    }
    let (value, unit) = split_size(trimmed).ok_or_else(|| format!("invalid size: '{text}'"))?;
    let bytes = value * 1024f64.powi(power(unit));
    Ok((bytes / (1024.0 * 1024.0)) as u64)
}

/// Volume sizes (`initial_size`, `auto_extend_*`): digits = GB; otherwise a decimal size
/// (`"10GB"`, `"15Mb"`) in whole GB (so `"15Mb"` is 0).
pub fn parse_volume_size_gb(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
        return trimmed
            .parse::<u64>()
            .map_err(|e| format!("invalid size: '{text}': {e}"));
    }
    let (value, unit) = split_size(trimmed).ok_or_else(|| format!("invalid size: '{text}'"))?;
    let bytes = value * 1000f64.powi(power(unit));
    Ok((bytes / 1e9) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_are_binary_megabytes() {
        assert_eq!(parse_memory_mb("512"), Ok(512));
        assert_eq!(parse_memory_mb("1gb"), Ok(1024));
        assert_eq!(parse_memory_mb("2GB"), Ok(2048));
        assert_eq!(parse_memory_mb("8g"), Ok(8192));
        assert_eq!(parse_memory_mb("4G"), Ok(4096));
        assert_eq!(parse_memory_mb("512mb"), Ok(512));
        assert_eq!(parse_memory_mb("1.5GiB"), Ok(1536));
        assert_eq!(parse_memory_mb("64gb"), Ok(65536));
        assert!(parse_memory_mb("lots").is_err());
        assert!(parse_memory_mb("").is_err());
    }

    #[test]
    fn volume_sizes_are_decimal_gigabytes() {
        assert_eq!(parse_volume_size_gb("200"), Ok(200));
        assert_eq!(parse_volume_size_gb("30gb"), Ok(30));
        assert_eq!(parse_volume_size_gb("10GB"), Ok(10));
        assert_eq!(parse_volume_size_gb("15Mb"), Ok(0));
        assert_eq!(
            parse_volume_size_gb("unparseable").unwrap_err(),
            "invalid size: 'unparseable'"
        );
    }

    #[test]
    fn presets_match_fly_sizes() {
        let p = preset("performance-2x").unwrap();
        assert_eq!((p.cpu_kind, p.cpus, p.memory_mb), ("performance", 2, 4096));
        let p = preset("shared-cpu-4x").unwrap();
        assert_eq!((p.cpu_kind, p.cpus, p.memory_mb), ("shared", 4, 1024));
        assert_eq!(
            preset("a100-40gb").unwrap().gpu_kind,
            Some("a100-pcie-40gb")
        );
    }
}
