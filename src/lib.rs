//! kiln: fine-tuning as an incremental build. See ARCHITECTURE.md for the code map.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod bench;
pub mod cache;
pub mod compare;
pub mod config;
pub mod data;
pub mod events;
pub mod hash;
pub mod infer;
pub mod ioerr;
pub mod lineage;
pub mod lock;
pub mod model;
pub mod plan;
pub mod plot;
pub mod rng;
pub mod scheduler;
pub mod serve;
pub mod stages;
pub mod text;
pub mod train;
pub mod workspace;
