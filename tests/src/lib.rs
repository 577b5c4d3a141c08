//! Cluster harness for the multi-node tests.
