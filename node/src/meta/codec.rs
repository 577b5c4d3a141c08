//! The one encoding of the metadata group: a version byte followed by postcard.
//!
//! Used for every value stored in the log and state trees and for every
//! `RaftPayload` on the wire, so a future format change is a new version byte
//! that old nodes refuse cleanly instead of misreading. It must not be used
//! for anything a client reads (the client API has its own protobuf messages).

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Version byte of the current encoding (postcard 1.x of the serde types in `types.rs`).
pub const FORMAT_VERSION: u8 = 1;

/// Why bytes could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Nothing to decode: a truncated record or an empty payload.
    #[error("empty {what}: expected a version byte")]
    Empty { what: &'static str },
    /// Written by a newer (or unknown) version of Cairn.
    #[error(
        "{what} has format version {found}, this node reads version {FORMAT_VERSION}; upgrade the node"
    )]
    UnknownVersion { what: &'static str, found: u8 },
    /// The bytes do not decode as the expected type: corruption or a bug.
    #[error("cannot decode {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    /// A value could not be serialized (a bug in a serde implementation).
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
}

/// Encodes `value` as `[FORMAT_VERSION] ++ postcard(value)`.
pub fn encode<T: Serialize + ?Sized>(what: &'static str, value: &T) -> Result<Vec<u8>, CodecError> {
    postcard::to_extend(value, vec![FORMAT_VERSION])
        .map_err(|source| CodecError::Encode { what, source })
}

/// Decodes what [`encode`] produced; trailing bytes are refused as corruption.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty { what })?;
    if version != FORMAT_VERSION {
        return Err(CodecError::UnknownVersion {
            what,
            found: version,
        });
    }
    let (value, rest) =
        postcard::take_from_bytes(body).map_err(|source| CodecError::Decode { what, source })?;
    if !rest.is_empty() {
        return Err(CodecError::Decode {
            what,
            source: postcard::Error::DeserializeBadEncoding,
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::types::{Command, NodeInfo, TypeConfig};
    use proptest::prelude::*;

    #[test]
    fn round_trips_openraft_types() {
        let vote = openraft::Vote::<u64>::new_committed(7, 3);
        let bytes = encode("vote", &vote).expect("encode");
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(
            decode::<openraft::Vote<u64>>("vote", &bytes).expect("decode"),
            vote
        );

        let entry = openraft::Entry::<TypeConfig> {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(2, 1), 9),
            payload: openraft::EntryPayload::Normal(Command::InitTenant {
                tenant: "t".into(),
                key_slot: vec![1, 2, 3],
            }),
        };
        let bytes = encode("entry", &entry).expect("encode");
        let back: openraft::Entry<TypeConfig> = decode("entry", &bytes).expect("decode");
        assert_eq!(back.log_id, entry.log_id);
        assert_eq!(
            format!("{:?}", back.payload),
            format!("{:?}", entry.payload)
        );

        let membership = openraft::Membership::<u64, NodeInfo>::new(
            vec![[1u64, 2].into_iter().collect()],
            [
                (1u64, NodeInfo::default()),
                (2, NodeInfo::default()),
                (3, NodeInfo::default()),
            ]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>(),
        );
        let bytes = encode("membership", &membership).expect("encode");
        assert_eq!(
            decode::<openraft::Membership<u64, NodeInfo>>("membership", &bytes).expect("decode"),
            membership
        );
    }

    #[test]
    fn refuses_unknown_versions_empty_input_and_trailing_bytes() {
        assert!(matches!(
            decode::<u64>("x", &[]),
            Err(CodecError::Empty { .. })
        ));
        assert!(matches!(
            decode::<u64>("x", &[2, 0]),
            Err(CodecError::UnknownVersion { found: 2, .. })
        ));
        let mut bytes = encode("x", &5u64).expect("encode");
        bytes.push(0);
        assert!(matches!(
            decode::<u64>("x", &bytes),
            Err(CodecError::Decode { .. })
        ));
    }

    /// The log holds postcard-encoded commands, whose first byte is the
    /// variant index: variants may only be appended. This pins every index.
    #[test]
    fn command_variant_indices_never_move() {
        use crate::meta::types::{PackRecord, SnapshotRecord};
        let pack = PackRecord {
            id: [0; 32],
            tenant: String::new(),
            data_shards: 0,
            parity_shards: 0,
            pack_len: 0,
            shard_len: 0,
            shards: vec![],
            needs_rebalance: false,
        };
        let snapshot = SnapshotRecord {
            id: [0; 32],
            dataset: String::new(),
            parent: None,
            time_unix_ms: 0,
            kind: String::new(),
            root_tree: [0; 32],
            sealed_info: vec![],
            files: 0,
            bytes: 0,
            bytes_added: 0,
            tags: vec![],
        };
        let commands = [
            Command::InitTenant {
                tenant: String::new(),
                key_slot: vec![],
            },
            Command::AddPack {
                pack,
                blobs: vec![],
            },
            Command::SetPlacement {
                pack_id: [0; 32],
                shards: vec![],
                needs_rebalance: false,
            },
            Command::CommitSnapshot {
                tenant: String::new(),
                snapshot,
            },
            Command::MarkRemoved { node: 5 },
            Command::MarkAdded { node: 5 },
            Command::MarkHoldsLog { node: 5 },
            Command::SetPlacementIf {
                pack_id: [0; 32],
                expected: vec![],
                shards: vec![],
                needs_rebalance: false,
            },
            Command::CreateToken {
                key: [0; 32],
                role: crate::auth::Role::Backup,
                tenant: None,
                ttl_ms: 0,
                label: String::new(),
                created_by: String::new(),
            },
            Command::RevokeToken { id: String::new() },
            Command::BootstrapToken {
                at: 0,
                node: 1,
                key: [0; 32],
            },
            Command::AddKeySlot {
                tenant: String::new(),
                key_slot: vec![],
            },
            Command::RemoveKeySlot {
                tenant: String::new(),
                id: String::new(),
            },
            Command::Audit {
                at: 0,
                actor: Default::default(),
                action: String::new(),
                target: String::new(),
                result: String::new(),
            },
            Command::Audited {
                at: 0,
                actor: Default::default(),
                action: String::new(),
                target: String::new(),
                cmd: Box::new(Command::MarkAdded { node: 1 }),
            },
        ];
        for (index, cmd) in commands.iter().enumerate() {
            let bytes = encode("command", cmd).expect("encode");
            assert_eq!(
                usize::from(bytes[1]),
                index,
                "variant index of {cmd:?} moved"
            );
        }
        assert_eq!(
            encode("command", &Command::MarkHoldsLog { node: 300 }).expect("encode"),
            vec![FORMAT_VERSION, 6, 0xac, 0x02],
            "a mark is the variant index then the node id as a varint"
        );
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<openraft::Entry<TypeConfig>>("entry", &bytes);
            let _ = decode::<Command>("command", &bytes);
        }
    }
}
