//! Helpers shared by the worker's end-to-end tests (each test file includes this module).

pub mod coordinator;
