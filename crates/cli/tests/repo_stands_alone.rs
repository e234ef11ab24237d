//! The repository stands alone: no test, build script or script reads a file outside
//! it, so a plain `git clone` and README's test command pass.

use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        // Test data is the files copied in; this file names the patterns it looks for.
        if name == "target" || name == ".git" || name == "data" || name == "repo_stands_alone.rs" {
            continue;
        }
        if path.is_dir() {
            source_files(&path, out);
        } else if path
            .extension()
            .is_some_and(|e| e == "rs" || e == "sh" || e == "py" || e == "toml")
            || path.file_name().is_some_and(|n| n == "run")
        {
            out.push(path);
        }
    }
}

#[test]
fn tests_and_scripts_read_nothing_outside_the_repo() {
    let root = repo_root();
    let mut files = Vec::new();
    for dir in ["crates", "scripts", ".ci", "examples", "bench"] {
        source_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 50, "found only {} files", files.len());
    // Paths that leave the repo: up from a crate past the repo root, the sibling
    // `shared` folder, or the machine this was written on.
    let outside = ["../../../", "../shared/", "/work/"];
    let mut found = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for (number, line) in text.lines().enumerate() {
            if outside.iter().any(|p| line.contains(p)) {
                found.push(format!(
                    "{}:{}: {}",
                    file.display(),
                    number + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(
        found.is_empty(),
        "these lines refer to files outside the repo; copy what they need into it:\n{}",
        found.join("\n")
    );
}
