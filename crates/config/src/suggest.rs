//! "did you mean ...?" for near-miss keys and enum values.

/// Optimal string alignment distance (Levenshtein plus adjacent transpositions).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    rows[0] = (0..=b.len()).collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

/// The words of a key, lower-cased and without a plural `s`, sorted: so that
/// `auto_machine_stop` and `auto_stop_machines` compare equal.
fn word_bag(key: &str) -> Vec<String> {
    let mut words: Vec<String> = key
        .split(['_', '-', '.', ' '])
        .filter(|w| !w.is_empty())
        .map(|w| {
            let w = w.to_ascii_lowercase();
            match w.strip_suffix('s') {
                Some(stem) if stem.len() > 2 => stem.to_string(),
                _ => w,
            }
        })
        .collect();
    words.sort();
    words
}

/// The candidate closest to `input`, when it is close enough to be a likely typo.
pub fn closest<'a>(input: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    if input.chars().count() > 64 {
        return None;
    }
    let lowered = input.to_ascii_lowercase();
    let bag = word_bag(input);
    let mut best: Option<(usize, &str)> = None;
    for candidate in candidates {
        if candidate == input {
            continue;
        }
        let distance = if candidate.eq_ignore_ascii_case(input) || word_bag(candidate) == bag {
            0
        } else {
            edit_distance(&lowered, &candidate.to_ascii_lowercase())
        };
        let limit = (candidate.chars().count().max(input.chars().count()) / 3).max(1);
        if distance <= limit && best.is_none_or(|(d, _)| distance < d) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, c)| c)
}

pub fn did_you_mean<'a>(
    input: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    closest(input, candidates).map(|c| format!("did you mean `{c}`?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_near_misses() {
        let keys = [
            "internal_port",
            "auto_stop_machines",
            "min_machines_running",
            "processes",
        ];
        assert_eq!(closest("internal_prot", keys), Some("internal_port"));
        assert_eq!(closest("intenal_port", keys), Some("internal_port"));
        assert_eq!(
            closest("auto_machine_stop", keys),
            Some("auto_stop_machines")
        );
        assert_eq!(
            closest("min_machine_running", keys),
            Some("min_machines_running")
        );
        assert_eq!(closest("process", keys), Some("processes"));
        assert_eq!(closest("redis", keys), None);
        assert_eq!(
            closest("htp", ["http", "tls", "proxy_proto", "pg_tls"]),
            Some("http")
        );
        assert_eq!(
            closest("https", ["http", "tls", "proxy_proto", "pg_tls"]),
            Some("http")
        );
    }
}
