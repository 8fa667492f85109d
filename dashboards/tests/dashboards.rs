//! Every Grafana dashboard in `dashboards/` has the fields Grafana's JSON model requires, and
//! every PromQL expression in it names only metrics from `eqim_common::metrics::METRICS`.

use std::collections::BTreeSet;
use std::path::PathBuf;

use eqim_common::metrics::{self as names, resolve_series, METRICS};
use eqim_dashboards::{dashboard_files, load_dashboard, metrics_markdown_table, Dashboard};

fn dashboards() -> Vec<Dashboard> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let files = dashboard_files(&dir).expect("dashboards/ is readable");
    assert!(
        files.len() >= 2,
        "expected the overview and per-worker dashboards in {dir:?}"
    );
    files
        .iter()
        .map(|f| load_dashboard(f).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

#[test]
fn every_dashboard_is_valid_and_names_only_known_metrics() {
    let boards = dashboards();
    let uids: BTreeSet<_> = boards.iter().map(|d| d.uid.as_str()).collect();
    assert_eq!(uids.len(), boards.len(), "dashboard uids must be unique");
    assert!(uids.contains("eqim-job-overview") && uids.contains("eqim-worker"));
    for board in &boards {
        assert!(!board.queries.is_empty(), "{} has no queries", board.title);
    }
}

#[test]
fn the_overview_covers_what_the_issue_asks_for() {
    let boards = dashboards();
    let overview = boards
        .iter()
        .find(|d| d.uid == "eqim-job-overview")
        .expect("overview dashboard");
    let used = overview.series_names();
    for needed in [
        names::TRAIN_LOSS.to_string(),
        names::IMAGES_TOTAL.to_string(),
        format!("{}_sum", names::STEP_PHASE_DURATION_SECONDS),
        names::MEMBERSHIP_SIZE.to_string(),
        names::MEMBERSHIP_GENERATION.to_string(),
        names::RECOVERIES_TOTAL.to_string(),
        names::CHECKPOINTS_TOTAL.to_string(),
        names::LAST_GOOD_CHECKPOINT_TIMESTAMP_SECONDS.to_string(),
        names::COMMITTED_STEP_SECONDS_TOTAL.to_string(),
    ] {
        assert!(used.contains(&needed), "overview lacks {needed}");
    }
}

#[test]
fn every_exported_metric_appears_on_some_dashboard() {
    let used: BTreeSet<&str> = dashboards()
        .iter()
        .flat_map(|d| d.series_names())
        .filter_map(|s| resolve_series(&s).map(|m| m.name))
        .collect();
    let unused: Vec<&str> = METRICS
        .iter()
        .map(|m| m.name)
        .filter(|n| !used.contains(n))
        .collect();
    assert!(unused.is_empty(), "metrics on no dashboard: {unused:?}");
}

#[test]
fn the_readme_shows_the_current_metric_table() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("dashboards/README.md");
    assert!(
        readme.contains(&metrics_markdown_table()),
        "dashboards/README.md's metric table is stale: regenerate it with \
         `cargo run -p eqim-dashboards --bin eqim-metrics-demo -- table`"
    );
}
