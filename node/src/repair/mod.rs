//! Re-protection: rebuild what was lost, rebalance what was misplaced.
pub mod plan;
