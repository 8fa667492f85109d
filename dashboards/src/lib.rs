//! eqim's dashboards as code: the Grafana/PromQL linter that checks `dashboards/*.json` against
//! the metric table (`eqim_common::metrics::METRICS`), and what a real job's check may expect of
//! each metric. Test tooling only: no eqim binary links this crate.
#![forbid(unsafe_code)]

pub mod expectations;
pub mod lint;

pub use lint::{
    dashboard_files, load_dashboard, metrics_markdown_table, promql_series_names,
    substitute_variables, variable_query_expr, Dashboard, DashboardError, DashboardQuery,
};
