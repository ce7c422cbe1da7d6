//! The command groups of the `kiln` binary, one module each. A command parses nothing itself
//! (clap did), calls the library and prints: the only code in kiln that prints.

pub mod bench;
pub mod build;
pub mod cache;
pub mod chat;
pub mod common;
pub mod lock;
pub mod model;
pub mod print;
pub mod sweep;
pub mod train;
