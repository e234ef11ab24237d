//! `aloft server` serves Prometheus metrics at `--metrics-listen` (127.0.0.1:9091 by
//! default): the proxy's per-app request counters and the agent's per-machine metrics.

mod common;

use common::Platform;

/// The value of the first sample of `name` whose labels include every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (label_set, value) = rest.strip_prefix('{')?.split_once("} ")?;
        labels
            .iter()
            .all(|l| label_set.split(',').any(|have| have == *l))
            .then(|| value.trim().parse().ok())?
    })
}

fn scrape(platform: &Platform) -> String {
    let scraped = platform.curl(&["-f", "http://127.0.0.1:9091/metrics"]);
    assert!(
        scraped.ok(),
        "scraping /metrics: {scraped}\n{}",
        platform.server_log()
    );
    scraped.stdout
}

#[test]
fn metrics_count_a_proxied_request_and_show_the_machine() {
    require_platform!();
    let platform = Platform::start();
    assert!(platform.aloft(&["apps", "create", "hello"]).ok());
    let dir = platform.hello_app_dir("hello");
    let deploy = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(deploy.ok(), "{deploy}\n{}", platform.server_log());

    let ok = ["app=\"hello\"", "status=\"200\""];
    let before = sample(&scrape(&platform), "aloft_app_http_responses_total", &ok).unwrap_or(0.0);
    let response = platform.curl(&[
        "-f",
        "-H",
        "Host: hello.localhost",
        "http://127.0.0.1:8080/",
    ]);
    assert!(response.ok(), "{response}\n{}", platform.server_log());
    let after = scrape(&platform);
    assert_eq!(
        sample(&after, "aloft_app_http_responses_total", &ok),
        Some(before + 1.0),
        "one proxied 200 for hello is counted:\n{after}"
    );
    assert!(
        sample(&after, "aloft_edge_tcp_connects_total", &[]).is_some()
            || after.contains("aloft_edge_tcp_connects_total"),
        "the edge's connection counter:\n{after}"
    );

    // The agent's side: the app's machine, running, with its memory use.
    let machine = ["app=\"hello\""];
    assert_eq!(
        sample(&after, "aloft_machine_up", &machine),
        Some(1.0),
        "the machine is up:\n{after}"
    );
    let memory = sample(&after, "aloft_machine_memory_bytes", &machine)
        .unwrap_or_else(|| panic!("no memory sample for hello's machine:\n{after}"));
    assert!(memory > 0.0, "{after}");

    let elsewhere = platform.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://127.0.0.1:9091/",
    ]);
    assert_eq!(elsewhere.stdout, "404", "{elsewhere}");
}
