//! The alert rules and the dashboard in deploy/ (issue #15): the rules pass
//! `promtool check rules`, their unit tests pass `promtool test rules` and
//! would fail if a rule lost its teeth, and every metric the rules and the
//! dashboard name is one a running clbd really exports.

#[path = "cluster/harness.rs"]
mod harness;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use harness::ClusterExt;
use lab::Cluster;

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(rel)
}

fn promtool() -> PathBuf {
    ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("promtool is missing: apt-get install prometheus (scripts/test.sh does)")
}

fn promtool_in(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Metric names (clb_*) a text mentions; histogram series map to their base.
fn clb_metrics(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("clb_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(base.to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests_bite() {
    let dir = deploy("prometheus");
    let (ok, out) = promtool_in(&dir, &["check", "rules", "clb.rules.yml"]);
    assert!(ok, "promtool check rules: {out}");
    let (ok, out) = promtool_in(&dir, &["test", "rules", "clb.rules.test.yml"]);
    assert!(ok, "promtool test rules: {out}");

    // The same tests against rules with one threshold loosened must fail:
    // they check what the rules decide, not only that they load.
    let copy = tempfile::tempdir().expect("tempdir");
    let rules = std::fs::read_to_string(dir.join("clb.rules.yml")).expect("rules");
    let loosened = rules.replace(
        "expr: sum(clb_vip_held{job=\"clb\"}) > 1",
        "expr: sum(clb_vip_held{job=\"clb\"}) > 2",
    );
    assert_ne!(loosened, rules, "the split-brain rule changed its form");
    std::fs::write(copy.path().join("clb.rules.yml"), loosened).expect("write");
    std::fs::copy(
        dir.join("clb.rules.test.yml"),
        copy.path().join("clb.rules.test.yml"),
    )
    .expect("copy tests");
    let (ok, out) = promtool_in(copy.path(), &["test", "rules", "clb.rules.test.yml"]);
    assert!(
        !ok,
        "the unit tests passed a rule that ignores two holders: {out}"
    );
    assert!(out.contains("ClbVipHeldTwice"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_and_dashboard_use_is_exported() {
    // A balancer with a VIP (no-op hook) exports the VIP series too.
    let c = Cluster::start_with(1, &["--vip", "127.0.0.78", "--vip-hook", "true"]).await;
    c.leader(std::time::Duration::from_secs(30)).await;
    let exported = reqwest::get(format!("http://{}/metrics", c.node(1).addr))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    let exported = clb_metrics(&exported);
    for file in ["prometheus/clb.rules.yml", "grafana/clb.json"] {
        let text = std::fs::read_to_string(deploy(file)).expect(file);
        let used = clb_metrics(&text);
        assert!(!used.is_empty(), "{file} names no clb metric");
        let missing: Vec<&String> = used.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics clbd does not export: {missing:?}"
        );
    }
    // The dashboard is JSON Grafana can import.
    #[derive(serde::Deserialize)]
    struct Dashboard {
        panels: Vec<serde::de::IgnoredAny>,
    }
    let dash: Dashboard =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/clb.json")).unwrap())
            .expect("dashboard JSON with panels");
    assert!(!dash.panels.is_empty());
}
