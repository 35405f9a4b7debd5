//! BYOL (Bootstrap Your Own Latent, Grill et al. 2020) self-supervised training on burn.
//!
//! Layout: [`model`] (backbone, heads, the online/target pair), [`loss`], [`ema`], [`optim`]
//! (optimizers, schedules), [`data`] (datasets, augmentations, loader), [`eval`] (kNN),
//! [`train`] (the loop; [`threads`] keeps the compute pool awake through a step), [`cli`].
//!
//! The docs are written for this crate's developers and link private items: read them with
//! `cargo doc --document-private-items`.
#![allow(rustdoc::private_intra_doc_links)]

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod ema;
pub mod eval;
pub mod export;
pub mod io;
pub mod loss;
pub mod model;
pub mod optim;
pub mod report;
pub mod threads;
pub mod train;
