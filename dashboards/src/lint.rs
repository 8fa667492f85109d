//! Checks the Grafana dashboards in `dashboards/`: the fields Grafana's JSON model requires, and
//! that every PromQL expression names only metrics from `eqim_common::metrics::METRICS`. The
//! `eqim-metrics-demo check` command and `scripts/check-prometheus` use the same extraction to
//! ask a real Prometheus for every series a panel needs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use eqim_common::metrics::{resolve_series, METRICS};
use serde_json::Value;

/// A problem in one dashboard file.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error("cannot read dashboard {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("dashboard {path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("dashboard {path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

/// One PromQL expression found in a dashboard, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DashboardQuery {
    /// `panel "<title>"` or `variable "<name>"`.
    pub location: String,
    pub expr: String,
    /// True for a templating variable's query (evaluated by Grafana, not by Prometheus as is).
    pub is_variable: bool,
}

/// A parsed dashboard with its queries.
#[derive(Debug, Clone)]
pub struct Dashboard {
    pub path: PathBuf,
    pub title: String,
    pub uid: String,
    pub queries: Vec<DashboardQuery>,
}

impl Dashboard {
    /// Every series name its queries use, sorted and deduplicated.
    pub fn series_names(&self) -> BTreeSet<String> {
        self.queries
            .iter()
            .flat_map(|q| promql_series_names(&variable_query_expr(&q.expr)))
            .collect()
    }
}

/// Panel types our dashboards may use (all built into Grafana 9+).
const PANEL_TYPES: &[&str] = &[
    "timeseries",
    "stat",
    "gauge",
    "bargauge",
    "table",
    "row",
    "text",
    "state-timeline",
];
/// Grafana's grid is 24 columns wide.
const GRID_COLUMNS: i64 = 24;

/// The `*.json` files of a dashboards folder, sorted.
pub fn dashboard_files(dir: &Path) -> Result<Vec<PathBuf>, DashboardError> {
    let read_err = |source| DashboardError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        if path.extension().is_some_and(|e| e == "json") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads and checks one dashboard: required fields, panel layout, templating, and that each
/// expression names only known eqim metrics.
pub fn load_dashboard(path: &Path) -> Result<Dashboard, DashboardError> {
    let text = std::fs::read_to_string(path).map_err(|source| DashboardError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let json: Value = serde_json::from_str(&text).map_err(|source| DashboardError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |problem: String| DashboardError::Invalid {
        path: path.to_path_buf(),
        problem,
    };
    let dashboard = check_dashboard(path, &json).map_err(invalid)?;
    for query in &dashboard.queries {
        let expr = variable_query_expr(&query.expr);
        for series in promql_series_names(&expr) {
            if resolve_series(&series).is_none() {
                return Err(invalid(format!(
                    "{} uses `{series}`, which is not in eqim_common::metrics::METRICS \
                     (a histogram is only queried as _bucket/_sum/_count); expression: {}",
                    query.location, query.expr
                )));
            }
        }
    }
    Ok(dashboard)
}

fn str_field<'a>(v: &'a Value, key: &str, what: &str) -> Result<&'a str, String> {
    v.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| format!("{what} needs a non-empty string `{key}`"))
}

fn int_field(v: &Value, key: &str, what: &str) -> Result<i64, String> {
    v.get(key)
        .and_then(Value::as_i64)
        .ok_or_else(|| format!("{what} needs an integer `{key}`"))
}

fn check_dashboard(path: &Path, json: &Value) -> Result<Dashboard, String> {
    let (title, uid) = check_header(json)?;
    let mut queries = Vec::new();
    let variables = check_templating(json, &mut queries)?;
    let panels = json
        .get("panels")
        .and_then(Value::as_array)
        .filter(|p| !p.is_empty())
        .ok_or("the dashboard needs a non-empty `panels` array")?;
    let mut all_panels = Vec::new();
    for panel in panels {
        all_panels.push(panel);
        if let Some(nested) = panel.get("panels").and_then(Value::as_array) {
            all_panels.extend(nested);
        }
    }
    let mut seen = SeenPanels {
        ids: BTreeSet::new(),
        boxes: Vec::new(),
        queries,
    };
    for panel in all_panels {
        check_panel(panel, &variables, &mut seen)?;
    }
    Ok(Dashboard {
        path: path.to_path_buf(),
        title,
        uid,
        queries: seen.queries,
    })
}

/// The dashboard-level fields: title, uid, schema version, id, tooltip and links.
fn check_header(json: &Value) -> Result<(String, String), String> {
    let title = str_field(json, "title", "the dashboard")?.to_string();
    let uid = str_field(json, "uid", "the dashboard")?.to_string();
    if uid.len() > 40
        || !uid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "uid `{uid}` must be at most 40 characters of [A-Za-z0-9_-]"
        ));
    }
    let schema = int_field(json, "schemaVersion", "the dashboard")?;
    if schema < 36 {
        return Err(format!(
            "schemaVersion {schema} predates datasource objects (need >= 36)"
        ));
    }
    if json.get("id").is_some_and(|id| !id.is_null()) {
        return Err("`id` must be null so that import creates a new dashboard".into());
    }
    if let Some(sync) = json.get("graphTooltip") {
        if !matches!(sync.as_i64(), Some(0..=2)) {
            return Err(format!("graphTooltip must be 0, 1 or 2, not {sync}"));
        }
    }
    for link in json
        .get("links")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let kind = link.get("type").and_then(Value::as_str);
        if !matches!(kind, Some("link" | "dashboards")) || link.get("title").is_none() {
            return Err(format!(
                "dashboard link {link} needs a title and type \"link\" or \"dashboards\""
            ));
        }
    }
    Ok((title, uid))
}

/// What the panels checked so far used: ids, grid boxes (title and [h, w, x, y]) and queries.
struct SeenPanels {
    ids: BTreeSet<i64>,
    boxes: Vec<(String, [i64; 4])>,
    queries: Vec<DashboardQuery>,
}

/// One panel: title, unique id, known type, a grid box that fits and overlaps no other, and
/// (unless a row or text) a datasource and targets whose expressions use only known variables.
fn check_panel(
    panel: &Value,
    variables: &BTreeSet<String>,
    seen: &mut SeenPanels,
) -> Result<(), String> {
    let title = str_field(panel, "title", "every panel")?;
    let what = format!("panel \"{title}\"");
    let id = int_field(panel, "id", &what)?;
    if !seen.ids.insert(id) {
        return Err(format!("{what} reuses panel id {id}"));
    }
    let kind = str_field(panel, "type", &what)?;
    if !PANEL_TYPES.contains(&kind) {
        return Err(format!("{what} has unknown type `{kind}`"));
    }
    let grid = panel
        .get("gridPos")
        .ok_or(format!("{what} needs `gridPos`"))?;
    let [h, w, x, y] = ["h", "w", "x", "y"].map(|k| int_field(grid, k, &what));
    let (h, w, x, y) = (h?, w?, x?, y?);
    if h < 1 || w < 1 || x < 0 || y < 0 || x + w > GRID_COLUMNS {
        return Err(format!(
            "{what} gridPos {{h:{h},w:{w},x:{x},y:{y}}} is outside the 24-column grid"
        ));
    }
    if let Some((other, _)) = seen
        .boxes
        .iter()
        .find(|(_, [oh, ow, ox, oy])| x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h)
    {
        return Err(format!("{what} overlaps panel \"{other}\""));
    }
    seen.boxes.push((title.to_string(), [h, w, x, y]));
    if kind == "row" || kind == "text" {
        return Ok(());
    }
    check_datasource(panel.get("datasource"), &what)?;
    let targets = panel
        .get("targets")
        .and_then(Value::as_array)
        .filter(|t| !t.is_empty())
        .ok_or(format!("{what} needs a non-empty `targets` array"))?;
    let mut ref_ids = BTreeSet::new();
    for target in targets {
        let ref_id = str_field(target, "refId", &what)?;
        if !ref_ids.insert(ref_id) {
            return Err(format!("{what} reuses refId {ref_id}"));
        }
        let expr = str_field(target, "expr", &what)?;
        check_variables_used(expr, variables, &what)?;
        seen.queries.push(DashboardQuery {
            location: what.clone(),
            expr: expr.to_string(),
            is_variable: false,
        });
    }
    Ok(())
}

/// Panels and query variables read from the `datasource` variable, so import asks for nothing.
fn check_datasource(ds: Option<&Value>, what: &str) -> Result<(), String> {
    let ds = ds.ok_or(format!("{what} needs a `datasource`"))?;
    let kind = ds.get("type").and_then(Value::as_str);
    let uid = ds.get("uid").and_then(Value::as_str);
    if kind != Some("prometheus") || uid != Some("${datasource}") {
        return Err(format!(
            "{what}'s datasource must be {{\"type\": \"prometheus\", \"uid\": \"${{datasource}}\"}}"
        ));
    }
    Ok(())
}

/// Checks `templating.list` (a `datasource` variable plus query variables) and collects the
/// variables' queries; returns the variable names.
fn check_templating(
    json: &Value,
    queries: &mut Vec<DashboardQuery>,
) -> Result<BTreeSet<String>, String> {
    let list = json
        .get("templating")
        .and_then(|t| t.get("list"))
        .and_then(Value::as_array)
        .ok_or("the dashboard needs `templating.list`")?;
    let mut names = BTreeSet::new();
    for var in list {
        let name = str_field(var, "name", "every template variable")?;
        let what = format!("variable \"{name}\"");
        let kind = str_field(var, "type", &what)?;
        if let Some(hide) = var.get("hide") {
            if !matches!(hide.as_i64(), Some(0..=2)) {
                return Err(format!("{what}: hide must be 0, 1 or 2, not {hide}"));
            }
        }
        match kind {
            "datasource" => {
                if var.get("query").and_then(Value::as_str) != Some("prometheus") {
                    return Err(format!("{what} must have query \"prometheus\""));
                }
            }
            "query" => {
                check_datasource(var.get("datasource"), &what)?;
                let query = var
                    .get("query")
                    .and_then(|q| q.get("query").or(Some(q)))
                    .and_then(Value::as_str)
                    .ok_or(format!("{what} needs a query string"))?;
                queries.push(DashboardQuery {
                    location: what.clone(),
                    expr: query.to_string(),
                    is_variable: true,
                });
            }
            "interval" | "custom" | "constant" => {}
            other => return Err(format!("{what} has unsupported type `{other}`")),
        }
        names.insert(name.to_string());
    }
    for required in ["datasource", "job"] {
        if !names.contains(required) {
            return Err(format!("templating needs a `{required}` variable"));
        }
    }
    Ok(names)
}

/// Fails on `$name` / `${name}` that is neither a dashboard variable nor a Grafana built-in.
fn check_variables_used(expr: &str, vars: &BTreeSet<String>, what: &str) -> Result<(), String> {
    for name in grafana_variables(expr) {
        if !name.starts_with("__") && !vars.contains(&name) {
            return Err(format!(
                "{what} uses ${name}, which is not a dashboard variable"
            ));
        }
    }
    Ok(())
}

fn grafana_variables(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        rest = &rest[i + 1..];
        let braced = rest.starts_with('{');
        let body = if braced { &rest[1..] } else { rest };
        let len = body
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(body.len());
        if len > 0 {
            out.push(body[..len].to_string());
        }
    }
    out
}

/// Replaces Grafana's variables so that Prometheus can evaluate an expression: built-in intervals
/// become `interval`, user variables (used as `=~"$var"`) match any non-empty value.
pub fn substitute_variables(expr: &str, interval: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        let braced = rest.starts_with('{');
        let body = if braced { &rest[1..] } else { rest };
        let len = body
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(body.len());
        let name = &body[..len];
        let consumed = if braced && body[len..].starts_with('}') {
            len + 2
        } else {
            len
        };
        match name {
            "__rate_interval" | "__interval" | "__range" => out.push_str(interval),
            "" => out.push('$'),
            _ => out.push_str(".+"),
        }
        rest = &rest[consumed..];
    }
    out.push_str(rest);
    out
}

/// For a templating query, the PromQL inside Grafana's `label_values(expr, label)` or
/// `query_result(expr)`; a plain expression is returned as is.
pub fn variable_query_expr(query: &str) -> String {
    let q = query.trim();
    if let Some(inner) = q
        .strip_prefix("label_values(")
        .and_then(|s| s.strip_suffix(')'))
    {
        // label_values(label) has no expression; label_values(expr, label) ends in `, label`.
        return match inner.rfind(',') {
            Some(comma) => inner[..comma].to_string(),
            None => String::new(),
        };
    }
    if let Some(inner) = q
        .strip_prefix("query_result(")
        .and_then(|s| s.strip_suffix(')'))
    {
        return inner.to_string();
    }
    q.to_string()
}

/// PromQL words that are not metric names: binary/set operators, modifiers and literals.
const PROMQL_KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "inf", "nan", "start", "end", "atan2",
];
/// Keywords followed by a parenthesised list of label names.
const PROMQL_LABEL_LIST_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric table as Markdown (name, type, labels, roles, help), as `dashboards/README.md`
/// shows it.
pub fn metrics_markdown_table() -> String {
    let mut out =
        String::from("| metric | type | labels | exported by | meaning |\n|---|---|---|---|---|\n");
    for m in METRICS {
        let labels: Vec<String> = m
            .labels
            .iter()
            .map(|l| match l.values {
                [] => format!("`{}`", l.name),
                values => format!("`{}`={}", l.name, values.join("\\|")),
            })
            .collect();
        let roles: Vec<&str> = m.roles.iter().map(|r| r.as_str()).collect();
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            m.name,
            m.kind.as_str(),
            labels.join(", "),
            roles.join(", "),
            m.help
        ));
    }
    out
}

/// The series names a PromQL expression selects: identifiers that are not functions,
/// aggregations, keywords, label names, strings, durations or Grafana variables, plus
/// `{__name__="..."}` matchers.
pub fn promql_series_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let ident_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_string(&chars, i),
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '{' => {
                let end = find_closing(&chars, i, '{', '}');
                let body: String = chars[i + 1..end.min(chars.len())].iter().collect();
                if let Some(name) = name_matcher(&body) {
                    names.insert(name);
                }
                i = end + 1;
            }
            '[' => i = find_closing(&chars, i, '[', ']') + 1,
            '$' => {
                // A Grafana variable: `$name` or `${name}`.
                i += 1;
                if chars.get(i) == Some(&'{') {
                    i = find_closing(&chars, i, '{', '}') + 1;
                } else {
                    while i < chars.len() && ident_char(chars[i]) {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                // Numbers and durations (1e-3, 0x1f, 5m).
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if ident_start(c) => {
                let start = i;
                while i < chars.len() && ident_char(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let lower = word.to_ascii_lowercase();
                if PROMQL_LABEL_LIST_KEYWORDS.contains(&lower.as_str()) {
                    if chars.get(next) == Some(&'(') {
                        i = find_closing(&chars, next, '(', ')') + 1;
                    }
                } else if chars.get(next) == Some(&'(')
                    || PROMQL_KEYWORDS.contains(&lower.as_str())
                    || starts_with_grouping(&chars[next..])
                {
                    // A function call, an aggregation (`sum by (l) (...)`), or an operator word.
                } else {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// Whether the text starts with `by` or `without` as a whole word (an aggregation's grouping).
fn starts_with_grouping(chars: &[char]) -> bool {
    ["by", "without"].iter().any(|kw| {
        let n = kw.len();
        chars.len() > n
            && chars[..n]
                .iter()
                .collect::<String>()
                .eq_ignore_ascii_case(kw)
            && !(chars[n].is_ascii_alphanumeric() || chars[n] == '_')
    })
}

fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' => i += 2,
            c if c == quote => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// Index of the bracket closing the one at `open_at` (strings inside are skipped), or the end.
fn find_closing(chars: &[char], open_at: usize, open: char, close: char) -> usize {
    let mut depth = 0;
    let mut i = open_at;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => {
                i = skip_string(chars, i);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
        i += 1;
    }
    chars.len()
}

/// The metric name of a `__name__="x"` equality matcher inside a `{...}` selector.
fn name_matcher(body: &str) -> Option<String> {
    let rest = body.trim_start().strip_prefix("__name__")?.trim_start();
    let rest = rest.strip_prefix('=')?;
    if rest.starts_with('~') || rest.starts_with('=') {
        return None;
    }
    let rest = rest.trim_start();
    let quote = rest.chars().next()?;
    let value = rest[1..].split(quote).next()?;
    Some(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(expr: &str) -> Vec<String> {
        promql_series_names(expr).into_iter().collect()
    }

    #[test]
    fn extraction_skips_functions_aggregations_labels_and_durations() {
        assert_eq!(
            names(
                r#"histogram_quantile(0.95, sum by (le, phase) (rate(eqim_step_phase_duration_seconds_bucket{job=~"$job", worker=~"$worker"}[$__rate_interval])))"#
            ),
            ["eqim_step_phase_duration_seconds_bucket"]
        );
        assert_eq!(
            names("sum(rate(eqim_images_total[5m])) without (worker) / on(job) group_left max(eqim_membership_size) offset 1m"),
            ["eqim_images_total", "eqim_membership_size"]
        );
        assert_eq!(
            names(
                r#"time() - max(eqim_last_good_checkpoint_timestamp_seconds{job="a b"}) > bool 3600 and eqim_epoch or vector(0)"#
            ),
            ["eqim_epoch", "eqim_last_good_checkpoint_timestamp_seconds"]
        );
        assert_eq!(
            names(
                r#"label_replace(eqim_train_loss, "dst", "$1", "worker", "(.*)") # eqim_comment_only"#
            ),
            ["eqim_train_loss"]
        );
        assert_eq!(
            names(r#"{__name__="eqim_grad_norm", job="x"}"#),
            ["eqim_grad_norm"]
        );
        assert_eq!(names("1e-3 * 0x1f + Inf - NaN"), Vec::<String>::new());
        assert_eq!(
            names("sum by(worker)(eqim_steps_total)"),
            ["eqim_steps_total"]
        );
    }

    #[test]
    fn variable_queries_yield_their_inner_expression() {
        assert_eq!(
            variable_query_expr(r#"label_values(eqim_build_info{role="worker"}, worker)"#),
            r#"eqim_build_info{role="worker"}"#
        );
        assert_eq!(variable_query_expr("label_values(job)"), "");
        assert_eq!(
            variable_query_expr("query_result(eqim_epoch)"),
            "eqim_epoch"
        );
    }

    #[test]
    fn variables_are_substituted_for_evaluation() {
        assert_eq!(
            substitute_variables(
                r#"rate(eqim_steps_total{job=~"$job",worker=~"${worker}"}[$__rate_interval])"#,
                "20s"
            ),
            r#"rate(eqim_steps_total{job=~".+",worker=~".+"}[20s])"#
        );
    }

    fn minimal_dashboard(expr: &str) -> Value {
        serde_json::json!({
            "id": null, "uid": "eqim-test", "title": "t", "schemaVersion": 39,
            "templating": {"list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {"name": "job", "type": "query",
                 "datasource": {"type": "prometheus", "uid": "${datasource}"},
                 "query": {"query": "label_values(eqim_build_info, job)", "refId": "v"}}
            ]},
            "panels": [{
                "id": 1, "type": "timeseries", "title": "p",
                "gridPos": {"h": 8, "w": 12, "x": 0, "y": 0},
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "targets": [{"refId": "A", "expr": expr}]
            }]
        })
    }

    fn check_file(json: &Value) -> Result<Dashboard, DashboardError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.json");
        std::fs::write(&path, serde_json::to_string(json).expect("json")).expect("write");
        load_dashboard(&path)
    }

    #[test]
    fn an_unknown_metric_in_a_panel_fails_with_its_name() {
        let ok = check_file(&minimal_dashboard(r#"eqim_train_loss{job=~"$job"}"#));
        assert!(ok.is_ok(), "{ok:?}");
        let err = check_file(&minimal_dashboard("rate(eqim_train_losses[1m])"))
            .expect_err("unknown metric must fail")
            .to_string();
        assert!(err.contains("eqim_train_losses"), "{err}");
        // A histogram's bare name is not a series.
        assert!(check_file(&minimal_dashboard("eqim_step_duration_seconds")).is_err());
    }

    #[test]
    fn missing_grafana_fields_and_bad_layout_fail() {
        let mut no_uid = minimal_dashboard("eqim_epoch");
        no_uid.as_object_mut().expect("object").remove("uid");
        assert!(check_file(&no_uid).unwrap_err().to_string().contains("uid"));

        let mut overlap = minimal_dashboard("eqim_epoch");
        let panel = overlap["panels"][0].clone();
        let mut second = panel.clone();
        second["id"] = 2.into();
        second["gridPos"]["x"] = 6.into();
        overlap["panels"] = Value::Array(vec![panel, second]);
        assert!(check_file(&overlap)
            .unwrap_err()
            .to_string()
            .contains("overlaps"));

        let mut wide = minimal_dashboard("eqim_epoch");
        wide["panels"][0]["gridPos"]["w"] = 30.into();
        assert!(check_file(&wide).is_err());

        let mut unknown_var = minimal_dashboard(r#"eqim_epoch{job=~"$jobb"}"#);
        unknown_var["panels"][0]["targets"][0]["refId"] = "B".into();
        assert!(check_file(&unknown_var)
            .unwrap_err()
            .to_string()
            .contains("$jobb"));
    }
}
