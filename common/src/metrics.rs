//! Prometheus metric names, shared by the coordinator, the workers and the dashboards' tests.
//! Conventions (prometheus.io naming): prefix `eqim_`, base units, counters end in `_total`.

pub const NAMESPACE: &str = "eqim";

/// Counter: distinct image files the data loader found unreadable and skipped.
pub const DATA_UNREADABLE_FILES_TOTAL: &str = "eqim_data_unreadable_files_total";
