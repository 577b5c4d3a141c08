//! The SDK's decoders of what comes back from nodes, selected by the first
//! input byte: trees (v1 and v2, raw and behind a valid header), the pack trailer, and sealed snapshot
//! records. A hostile node's bytes must give an error, never a panic.
#![no_main]

use std::sync::OnceLock;

use cairn_client::pack::read_pack_index;
use cairn_client::seal::{MasterKey, SnapshotFields};
use cairn_client::tree::Tree;
use libfuzzer_sys::fuzz_target;

fn key() -> &'static MasterKey {
    static KEY: OnceLock<MasterKey> = OnceLock::new();
    KEY.get_or_init(MasterKey::generate)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    match selector % 4 {
        0 => {
            let _ = Tree::decode(bytes);
        }
        3 => {
            // Past the magic and version: the postcard body and validation.
            let mut tree = Tree {
                entries: Vec::new(),
            }
            .encode();
            tree.pop(); // the empty entry list
            if bytes.first().is_some_and(|b| b & 1 == 1) {
                // Format v1, still read.
                if let Some(version) = tree.last_mut() {
                    *version = 1;
                }
            }
            tree.extend_from_slice(bytes);
            let _ = Tree::decode(&tree);
        }
        1 => {
            let _ = read_pack_index(key(), bytes);
        }
        _ => {
            let id = [7u8; 32];
            let fields = SnapshotFields {
                tenant: "t",
                id: &id,
                dataset: "d",
                parent: None,
                time_unix_ms: 0,
                kind: "full",
                root_tree: &id,
                files: 0,
                bytes: 0,
                bytes_added: 0,
                tags: &[],
            };
            let _ = key().open_snapshot_info(&fields, bytes);
        }
    }
});
