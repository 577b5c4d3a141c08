//! The `cairn` command line's library half: what the binary shows and the
//! tools built around the SDK (the in-process demo and benchmark, the chat
//! data generator, byte-for-byte verification). The SDK itself
//! (`cairn-client`) knows nothing of terminals or in-process clusters.

pub mod access;
pub mod agent;
pub mod check;
pub mod datagen;
pub mod demo;
pub mod lifecycle;
pub mod progress;
pub mod stream;
pub mod verify;
