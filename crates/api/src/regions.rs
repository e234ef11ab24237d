//! The region table (spec/platform.md §2): codes, cities and airport coordinates, used to
//! place machines in the nearest region that has a host and to rank backends by closeness.

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Region {
    pub code: &'static str,
    pub name: &'static str,
    pub latitude: f64,
    pub longitude: f64,
    pub gateway: bool,
    /// Removed from Fly's deployable list, still seen in real fly.toml files.
    pub deprecated: bool,
}

const fn region(
    code: &'static str,
    name: &'static str,
    latitude: f64,
    longitude: f64,
    gateway: bool,
) -> Region {
    Region {
        code,
        name,
        latitude,
        longitude,
        gateway,
        deprecated: false,
    }
}

const fn old(
    code: &'static str,
    name: &'static str,
    latitude: f64,
    longitude: f64,
    gateway: bool,
) -> Region {
    Region {
        code,
        name,
        latitude,
        longitude,
        gateway,
        deprecated: true,
    }
}

pub const REGIONS: &[Region] = &[
    region("ams", "Amsterdam, Netherlands", 52.31, 4.76, true),
    region("arn", "Stockholm, Sweden", 59.65, 17.93, true),
    region("bom", "Mumbai, India", 19.09, 72.87, true),
    region("cdg", "Paris, France", 49.01, 2.55, true),
    region("dfw", "Dallas, Texas (US)", 32.90, -97.04, true),
    region("ewr", "Secaucus, NJ (US)", 40.69, -74.17, true),
    region("fra", "Frankfurt, Germany", 50.03, 8.57, true),
    region("gru", "São Paulo, Brazil", -23.43, -46.47, false),
    region("iad", "Ashburn, Virginia (US)", 38.95, -77.46, true),
    region("jnb", "Johannesburg, South Africa", -26.14, 28.25, false),
    region("lax", "Los Angeles, California (US)", 33.94, -118.41, true),
    region("lhr", "London, United Kingdom", 51.47, -0.45, true),
    region("nrt", "Tokyo, Japan", 35.77, 140.39, true),
    region("ord", "Chicago, Illinois (US)", 41.98, -87.90, true),
    region("sin", "Singapore", 1.36, 103.99, true),
    region("sjc", "San Jose, California (US)", 37.36, -121.93, true),
    region("syd", "Sydney, Australia", -33.94, 151.18, true),
    region("yyz", "Toronto, Canada", 43.68, -79.63, true),
    old("atl", "Atlanta, Georgia (US)", 33.64, -84.43, false),
    old("bog", "Bogotá, Colombia", 4.70, -74.15, false),
    old("bos", "Boston, Massachusetts (US)", 42.36, -71.01, false),
    old("den", "Denver, Colorado (US)", 39.86, -104.67, false),
    old("eze", "Ezeiza, Argentina", -34.82, -58.54, false),
    old("gdl", "Guadalajara, Mexico", 20.52, -103.31, true),
    old("gig", "Rio de Janeiro, Brazil", -22.81, -43.25, false),
    old("hkg", "Hong Kong", 22.31, 113.92, true),
    old("mad", "Madrid, Spain", 40.47, -3.57, false),
    old("mia", "Miami, Florida (US)", 25.79, -80.29, false),
    old("otp", "Bucharest, Romania", 44.57, 26.10, false),
    old("phx", "Phoenix, Arizona (US)", 33.43, -112.01, false),
    old("qro", "Querétaro, Mexico", 20.62, -100.19, true),
    old("scl", "Santiago, Chile", -33.39, -70.79, true),
    old("sea", "Seattle, Washington (US)", 47.45, -122.31, true),
    old("waw", "Warsaw, Poland", 52.17, 20.97, false),
    old("yul", "Montreal, Canada", 45.47, -73.74, false),
    old("maa", "Chennai, India", 12.99, 80.17, false),
    old("dxb", "Dubai, UAE", 25.25, 55.36, false),
    old("ist", "Istanbul, Turkey", 41.26, 28.74, false),
    old("mel", "Melbourne, Australia", -37.67, 144.84, false),
];

/// Region groups usable in placement and routing (spec/platform.md §2.4).
pub const REGION_GROUPS: &[(&str, &[&str])] = &[
    (
        "eu",
        &["ams", "arn", "cdg", "fra", "lhr", "mad", "otp", "waw"],
    ),
    (
        "na",
        &[
            "dfw", "ewr", "iad", "lax", "ord", "sjc", "yyz", "atl", "bos", "den", "mia", "phx",
            "sea", "yul", "gdl", "qro",
        ],
    ),
    (
        "us",
        &[
            "dfw", "ewr", "iad", "lax", "ord", "sjc", "atl", "bos", "den", "mia", "phx", "sea",
        ],
    ),
    (
        "usa",
        &[
            "dfw", "ewr", "iad", "lax", "ord", "sjc", "atl", "bos", "den", "mia", "phx", "sea",
        ],
    ),
    ("sa", &["gru", "bog", "eze", "gig", "scl"]),
    ("apac", &["bom", "nrt", "sin", "syd", "hkg", "maa"]),
];

pub fn find(code: &str) -> Option<&'static Region> {
    REGIONS.iter().find(|r| r.code == code)
}

/// Great-circle distance in kilometres between two regions of the table, or `None`
/// when either has no known coordinates (an operator's own region name such as `local`).
pub fn distance_km(a: &str, b: &str) -> Option<f64> {
    if a == b {
        return Some(0.0);
    }
    let (a, b) = (find(a)?, find(b)?);
    Some(haversine_km(
        a.latitude,
        a.longitude,
        b.latitude,
        b.longitude,
    ))
}

fn haversine_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    const EARTH_RADIUS_KM: f64 = 6371.0;
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lon2 - lon1).to_radians();
    let h = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().asin()
}

/// Of `candidates` (regions that have hosts), the one closest to `wanted`: `wanted`
/// itself when present, else the nearest by coordinates, else (no coordinates known)
/// the first candidate. `None` only when there are no candidates.
pub fn nearest<'a>(wanted: &str, candidates: &'a [String]) -> Option<&'a str> {
    if let Some(exact) = candidates.iter().find(|c| c.as_str() == wanted) {
        return Some(exact);
    }
    candidates
        .iter()
        .min_by(|x, y| {
            let dx = distance_km(wanted, x).unwrap_or(f64::INFINITY);
            let dy = distance_km(wanted, y).unwrap_or(f64::INFINITY);
            dx.total_cmp(&dy)
        })
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_prefers_exact_then_closest_then_any() {
        let hosts = vec!["fra".to_string(), "iad".to_string(), "local".to_string()];
        assert_eq!(nearest("iad", &hosts), Some("iad"));
        assert_eq!(nearest("ams", &hosts), Some("fra"));
        assert_eq!(nearest("ewr", &hosts), Some("iad"));
        let only_local = vec!["local".to_string()];
        assert_eq!(nearest("syd", &only_local), Some("local"));
        assert_eq!(nearest("syd", &[]), None);
    }

    #[test]
    fn distances_are_plausible() {
        let d = distance_km("lhr", "cdg").unwrap();
        assert!((300.0..400.0).contains(&d), "{d}");
        assert!(distance_km("lhr", "local").is_none());
    }
}
