//! Turns every file of tests/data/flytoml/{wild,fixtures} into its own test case
//! (tests/corpus.rs includes the generated list).

use std::fmt::Write;
use std::path::{Path, PathBuf};

fn cases(dir: &Path, prefix: &str, out: &mut String) {
    println!("cargo:rerun-if-changed={}", dir.display());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    for name in names {
        let ident: String = name
            .trim_end_matches(".toml")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect::<String>()
            .split('_')
            .filter(|part| !part.is_empty())
            .collect::<Vec<_>>()
            .join("_");
        let _ = writeln!(
            out,
            "#[test]\nfn {prefix}_{ident}() {{ check_file(&corpus_dir().join({dir:?}).join({name:?})); }}",
            dir = dir
                .file_name()
                .map(|d| d.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let corpus = manifest.join("tests/data/flytoml");
    let mut out = String::new();
    cases(&corpus.join("wild"), "wild", &mut out);
    cases(&corpus.join("fixtures"), "fixture", &mut out);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default());
    if let Err(err) = std::fs::write(out_dir.join("corpus_cases.rs"), out) {
        println!("cargo:warning=could not write corpus test cases: {err}");
    }
}
