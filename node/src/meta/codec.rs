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

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<openraft::Entry<TypeConfig>>("entry", &bytes);
            let _ = decode::<Command>("command", &bytes);
        }
    }
}
