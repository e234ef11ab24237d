//! Every real-world file of shared/flytoml/wild loads.

use std::path::PathBuf;

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/flytoml")
}

fn wild_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(shared().join("wild"))
        .expect("wild corpus present")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_wild_file_loads() {
    let files = wild_files();
    assert!(files.len() >= 120, "corpus has {} files", files.len());
    for path in files {
        let loaded = aloft_config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if std::env::var("SHOW").is_ok() {
            for d in loaded.diagnostics(false) {
                println!("{:?} {d}", d.severity);
            }
        }
    }
}
