//! Prometheus metric names, shared by the coordinator, the workers and the dashboards' tests.
//! Conventions (prometheus.io naming): prefix `eqim_`, base units, counters end in `_total`.

pub const NAMESPACE: &str = "eqim";
