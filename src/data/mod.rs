//! Images in: folders and archives, augmentations, and the two-view batch loader.

pub mod archive;
pub mod augment;
pub mod folder;
pub mod loader;
pub mod preview;
