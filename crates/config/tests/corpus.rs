//! Every real-world file (tests/data/flytoml/wild) and flyctl fixture is a test case: it loads,
//! every problem it has is located, every process group converts or fails cleanly, and
//! writing it back (TOML in place, fresh TOML, JSON, YAML) reads back as the same config.

use std::path::{Path, PathBuf};

use aloft_config::{Format, MachineConfigOptions, load, parse_str, render, render_preserving};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/flytoml")
}

fn check_file(path: &Path) {
    let name = path.display();
    let loaded = load(path).unwrap_or_else(|e| panic!("{name}: {e}"));
    let config = &loaded.config;
    let diagnostics = loaded.diagnostics(true);
    for d in &diagnostics {
        assert!(
            d.line.is_some() && d.column.is_some(),
            "{name}: unlocated diagnostic {d}"
        );
        assert_eq!(d.file.as_deref(), Some(name.to_string().as_str()), "{d}");
    }
    if !config.load_errors().is_empty() {
        assert!(
            config
                .to_machine_config(
                    &config.default_process_group(),
                    &MachineConfigOptions::default()
                )
                .is_err()
        );
        return;
    }
    for group in config.process_groups() {
        if let Ok(machine) = config.to_machine_config(&group, &MachineConfigOptions::default()) {
            assert_eq!(machine.metadata["fly_process_group"], group);
            assert_eq!(machine.env["FLY_PROCESS_GROUP"], group);
        }
    }
    let _ = config.release_command_machine_config(&MachineConfigOptions::default());

    let original = std::fs::read_to_string(path).unwrap();
    let in_place = render_preserving(config, &original);
    let reread = parse_str(&in_place, Format::Toml, "saved.toml")
        .unwrap_or_else(|e| panic!("{name}: {e}\n{in_place}"));
    assert_eq!(
        &reread.config, config,
        "{name}: in-place save changed the config:\n{in_place}"
    );
    assert!(reread.config.load_errors().is_empty());
    assert_eq!(
        render_preserving(&reread.config, &in_place),
        in_place,
        "{name}: saving twice differs"
    );

    for format in [Format::Toml, Format::Json, Format::Yaml] {
        let text = render(config, format);
        let reread = parse_str(&text, format, "saved")
            .unwrap_or_else(|e| panic!("{name} as {format:?}: {e}\n{text}"));
        assert_eq!(
            &reread.config, config,
            "{name}: {format:?} round trip changed the config:\n{text}"
        );
    }
    let json = serde_json::to_value(config).unwrap();
    assert_eq!(
        &aloft_config::AppConfig::from_json_value(json).unwrap(),
        config,
        "{name}: JSON value round trip"
    );
}

include!(concat!(env!("OUT_DIR"), "/corpus_cases.rs"));

#[test]
fn corpus_is_present() {
    let count = |dir: &str| {
        std::fs::read_dir(corpus_dir().join(dir))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    assert!(count("wild") >= 120, "tests/data/flytoml/wild is missing");
    assert!(
        count("fixtures") >= 45,
        "tests/data/flytoml/fixtures is missing"
    );
}
