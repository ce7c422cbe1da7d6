//! kiln: fine-tuning as an incremental build. See ARCHITECTURE.md for the code map.

pub mod cache;
pub mod config;
pub mod hash;
pub mod text;
pub mod data;
pub mod events;
pub mod stages;
pub mod plan;
pub mod scheduler;
pub mod workspace;
