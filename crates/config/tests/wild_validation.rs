//! Validation of the real-world corpus (tests/data/flytoml/wild) against what flyctl says.
//!
//! Where `fly config validate` accepts a file, Aloft may warn about it (a guest size the
//! Machines API does not offer, two services on one port, a `[[vm]]` naming no group) but
//! must not fail it. Where flyctl fails it too, the error stays and is recorded here.

use std::path::PathBuf;

use aloft_config::{Diagnostic, DiagnosticCode, Severity, load};

fn wild_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/flytoml/wild")
}

fn diagnostics(name: &str) -> Vec<Diagnostic> {
    let path = wild_dir().join(name);
    load(&path)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .diagnostics(false)
}

fn errors(diagnostics: &[Diagnostic]) -> Vec<&Diagnostic> {
    diagnostics.iter().filter(|d| d.is_error()).collect()
}

/// Files flyctl also refuses, with the key its error names. flyctl decodes the patched
/// document as JSON, so `[deploy.strategy]` as a table fails with `json: cannot unmarshal
/// object into Go struct field Deploy.deploy.strategy of type string`, kept as the load
/// error that `fly config validate` reports.
const FLYCTL_REFUSES: &[(&str, &str, DiagnosticCode)] = &[(
    "183_Jake1848_flowlogic-route.toml",
    "deploy.strategy",
    DiagnosticCode::Type,
)];

#[test]
fn every_wild_file_flyctl_accepts_validates() {
    let mut names: Vec<String> = std::fs::read_dir(wild_dir())
        .expect("tests/data/flytoml/wild is missing")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    assert!(names.len() >= 120, "only {} wild files", names.len());
    let mut refused = Vec::new();
    for name in &names {
        let all = diagnostics(name);
        let errors = errors(&all);
        match FLYCTL_REFUSES.iter().find(|(file, ..)| file == name) {
            Some((_, path, code)) => {
                assert!(
                    !errors.is_empty() && errors.iter().all(|d| d.path == *path && d.code == *code),
                    "{name}: expected only the {code:?} error flyctl also reports at {path}, got {errors:#?}"
                );
                refused.push(name.as_str());
            }
            None => assert!(
                errors.is_empty(),
                "{name}: flyctl accepts this file but Aloft reports errors:\n{}",
                errors
                    .iter()
                    .map(|d| format!("  {d}\n"))
                    .collect::<String>()
            ),
        }
    }
    assert_eq!(refused.len(), FLYCTL_REFUSES.len(), "{refused:?}");
}

fn warning<'a>(all: &'a [Diagnostic], path: &str, needle: &str) -> &'a Diagnostic {
    let d = all
        .iter()
        .find(|d| d.path == path && d.message.contains(needle))
        .unwrap_or_else(|| panic!("no diagnostic at {path} containing {needle:?}: {all:#?}"));
    assert_eq!(d.severity, Severity::Warning, "{d}");
    d
}

#[test]
fn guest_size_the_machines_api_does_not_offer_warns() {
    let all = diagnostics("035_Aeonia-ai_gaia.toml");
    let d = warning(
        &all,
        "vm[0].memory",
        "2048 MB of memory does not fit 2 performance CPU(s)",
    );
    assert_eq!(d.line, Some(30));
    assert_eq!(
        d.expected.as_deref(),
        Some("between 4096 and 16384 MB for 2 performance CPU(s)")
    );
    assert_eq!(
        d.suggestion.as_deref(),
        Some("did you mean size `performance-1x`?")
    );
}

#[test]
fn a_port_exposed_twice_warns() {
    let all = diagnostics("113_fly-apps_fly-etcd.toml");
    warning(
        &all,
        "services[0].ports[1]",
        "port 443/tcp is already exposed by http_service",
    );
    let all = diagnostics("183_Jake1848_flowlogic-route.toml");
    assert!(
        all.iter()
            .filter(|d| d.message.contains("already exposed"))
            .all(|d| d.severity == Severity::Warning),
        "{all:#?}"
    );
}

#[test]
fn a_vm_section_for_an_undefined_group_warns_with_the_release_command_hint() {
    let all = diagnostics("187_Joseamica_avoqado-server.toml");
    let d = warning(
        &all,
        "vm[0].processes[0]",
        "VM section specifies 'release_command' as one of its processes",
    );
    assert!(d.message.contains("applies to no machine"), "{d}");
    assert_eq!(
        d.suggestion.as_deref(),
        Some("the release command machine takes its size from `deploy.release_command_vm`")
    );
}

#[test]
fn a_table_where_flyctl_wants_a_string_stays_an_error() {
    let all = diagnostics("183_Jake1848_flowlogic-route.toml");
    let errors = errors(&all);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let d = errors[0];
    assert_eq!(
        (d.path.as_str(), d.code),
        ("deploy.strategy", DiagnosticCode::Type)
    );
    assert_eq!((d.line, d.column), (Some(85), Some(11)));
    assert_eq!(
        (d.message.as_str(), d.expected.as_deref()),
        ("invalid type: a table", Some("a string"))
    );
}
