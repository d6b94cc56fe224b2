//! The one integration-test binary (each extra binary would link the whole stack again).

mod adapter_io;
mod bad_input;
mod cli;
mod common;
mod engine;
mod eval;
mod fuzz;
mod golden;
mod openapi;
mod properties;
mod server;
mod train;
