//! The one integration-test binary (each extra binary would link the whole stack again).

mod adapter_io;
mod cli;
mod common;
mod engine;
mod golden;
mod properties;
