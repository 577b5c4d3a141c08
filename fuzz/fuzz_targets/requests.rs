//! Every request message a node decodes, selected by the first input byte:
//! decoding arbitrary bytes never panics, a decode error is the caller's
//! (`InvalidArgument`), and what decodes re-encodes to a message that
//! decodes to the same value.
#![no_main]

use cairn_proto::v1 as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn check<M: Message + Default + PartialEq>(bytes: &[u8]) {
    match M::decode(bytes) {
        Ok(message) => {
            let again =
                M::decode(message.encode_to_vec().as_slice()).expect("re-encoded message decodes");
            assert!(again == message, "round trip changed the message");
        }
        Err(error) => {
            let status = cairn_proto::codec::decode_error(error);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
        }
    }
}

macro_rules! select {
    ($selector:expr, $bytes:expr, $($ty:ty),+ $(,)?) => {{
        let table: &[fn(&[u8])] = &[$(check::<$ty>),+];
        table[usize::from($selector) % table.len()]($bytes)
    }};
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    select!(
        selector,
        bytes,
        pb::RaftPayload,
        pb::PutShardRequest,
        pb::GetShardRequest,
        pb::DeleteShardRequest,
        pb::ShardStatsRequest,
        pb::WhoAmIRequest,
        pb::InitTenantRequest,
        pb::GetKeySlotsRequest,
        pb::AddKeySlotRequest,
        pb::RemoveKeySlotRequest,
        pb::CreateTokenRequest,
        pb::ListTokensRequest,
        pb::RevokeTokenRequest,
        pb::AuditLogRequest,
        pb::FindBlobsRequest,
        pb::LocateBlobsRequest,
        pb::PutPackRequest,
        pb::ReadPackRequest,
        pb::CommitSnapshotRequest,
        pb::ListSnapshotsRequest,
        pb::ClusterStatusRequest,
        pb::RepairRequest,
        pb::ReportFaultsRequest,
        pb::AddNodeRequest,
        pb::RemoveNodeRequest,
        pb::CheckPacksRequest,
    );
});
