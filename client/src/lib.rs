//! Cairn client SDK.
//!
//! Everything that touches plaintext or keys happens here: chunking,
//! hashing, compression and encryption before data leaves the process.

pub mod chunker;
pub mod pack;
pub mod path_guard;
pub mod seal;
pub mod tree;
