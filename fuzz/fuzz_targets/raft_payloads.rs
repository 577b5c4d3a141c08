//! The postcard payloads of the `Raft` service and the values stored in the
//! Raft log, selected by the first input byte: arbitrary bytes decode or
//! fail cleanly, never panic or allocate without bound.
#![no_main]

use cairn_node::meta::admission::ClusterInfoRequest;
use cairn_node::meta::codec;
use cairn_node::meta::membership::ChangeRequest;
use cairn_node::meta::types::{Command, NodeId, TypeConfig};
use libfuzzer_sys::fuzz_target;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::de::DeserializeOwned;

fn check<T: DeserializeOwned>(bytes: &[u8]) {
    let _ = codec::decode::<T>("fuzz input", bytes);
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let table: &[fn(&[u8])] = &[
        check::<AppendEntriesRequest<TypeConfig>>,
        check::<VoteRequest<NodeId>>,
        check::<InstallSnapshotRequest<TypeConfig>>,
        check::<Command>,
        check::<ChangeRequest>,
        check::<ClusterInfoRequest>,
        check::<()>,
        check::<openraft::Entry<TypeConfig>>,
    ];
    table[usize::from(selector) % table.len()](bytes);
});
