//! The protobuf codec of every Cairn service: prost's, with decode errors
//! mapped to the caller's fault.
//!
//! tonic's `ProstCodec` answers bytes that do not parse as the expected
//! message with `INTERNAL`, which tells an operator the node is broken and
//! a client to retry. An undecodable message is the sender's error, so it is
//! `INVALID_ARGUMENT` here. Size limits stay tonic's: a message longer than
//! the method's limit is refused from its 5-byte length prefix with
//! `OUT_OF_RANGE` (or `RESOURCE_EXHAUSTED` when decompressing), before its
//! body is buffered.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// `tonic_prost::ProstCodec` with undecodable messages as `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct CairnCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for CairnCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for CairnCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CairnDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CairnDecoder {
            _pd: PhantomData,
            buffer_settings: BufferSettings::default(),
        }
    }
}

/// Decodes `U`; a parse error is the sender's (`INVALID_ARGUMENT`).
#[derive(Debug, Clone)]
pub struct CairnDecoder<U> {
    _pd: PhantomData<U>,
    buffer_settings: BufferSettings,
}

impl<U: Message + Default> Decoder for CairnDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        U::decode(buf).map(Some).map_err(decode_error)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.buffer_settings
    }
}

/// The status for bytes that do not decode. prost's message names the
/// message and field types only, never the bytes themselves.
pub fn decode_error(error: prost::DecodeError) -> Status {
    Status::invalid_argument(format!("malformed protobuf message: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1 as pb;

    /// Decodes `bytes` as `M`: a failure must be the caller's error.
    fn refused_as_invalid<M: Message + Default>(bytes: &[u8]) -> bool {
        match M::decode(bytes) {
            Ok(_) => false,
            Err(error) => {
                let status = decode_error(error);
                assert_eq!(status.code(), tonic::Code::InvalidArgument);
                assert!(status.message().starts_with("malformed protobuf message"));
                true
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_failures_are_invalid_argument() {
        let table: &[fn(&[u8]) -> bool] = &[
            refused_as_invalid::<pb::RaftPayload>,
            refused_as_invalid::<pb::PutShardRequest>,
            refused_as_invalid::<pb::GetShardRequest>,
            refused_as_invalid::<pb::InitTenantRequest>,
            refused_as_invalid::<pb::FindBlobsRequest>,
            refused_as_invalid::<pb::LocateBlobsRequest>,
            refused_as_invalid::<pb::PutPackRequest>,
            refused_as_invalid::<pb::ReadPackRequest>,
            refused_as_invalid::<pb::CommitSnapshotRequest>,
            refused_as_invalid::<pb::ReportFaultsRequest>,
            refused_as_invalid::<pb::AddNodeRequest>,
            refused_as_invalid::<pb::RemoveNodeRequest>,
            refused_as_invalid::<pb::CreateTokenRequest>,
            refused_as_invalid::<pb::AuditLogRequest>,
        ];
        // xorshift: reproducible without a dependency.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut refused = 0;
        for round in 0..20_000 {
            let len = round % 97;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            refused += usize::from(table[round % table.len()](&bytes));
        }
        assert!(refused > 10_000, "only {refused} inputs refused");
    }

    #[test]
    fn a_field_of_invalid_wire_type_is_refused_by_every_message() {
        assert!(refused_as_invalid::<pb::ClusterStatusRequest>(&[0x0f, 1]));
        assert!(refused_as_invalid::<pb::PutPackRequest>(&[
            0x0a, 0xff, 0xff, 0x7f
        ]));
    }
}
