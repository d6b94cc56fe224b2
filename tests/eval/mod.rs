//! The benchmark's data and metrics: suite parsing on invented snippets, split determinism, the
//! real fetched suite (when `make data` has run), metrics against hand-computed values, the
//! greedy search and the reports.

mod bench;
mod cache;
mod fetch;
mod metrics;
mod report;
mod search;
mod splits;
mod suite;
