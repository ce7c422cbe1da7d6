//! kiln's hot numeric kernels: the f32 matrix product, a vectorized exp and decoding's
//! attention row. They live in their
//! own crate so that the dev/test profile can optimize them
//! (`[profile.dev.package.kiln-kernels]` in the workspace's Cargo.toml) while the rest of kiln
//! compiles quickly: an unoptimized matrix product made the real-model tests ~20× slower.
//! Nothing here knows about models, tensors or files.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod attn;
pub mod sgemm;
pub mod vmath;
