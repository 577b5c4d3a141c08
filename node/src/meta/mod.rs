//! The Raft metadata group.
pub mod types;
