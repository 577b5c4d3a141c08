//! The shard file decoder (header, then header and payload): arbitrary
//! bytes are refused cleanly, never a panic. Half the inputs get a valid
//! magic, version and header checksum, so the fields behind the checksum
//! (code, index, lengths) and the payload check are reached too.
#![no_main]

use cairn_node::erasure::{Code, HEADER_LEN, ShardHeader, encode_pack, parse_shard_file};
use libfuzzer_sys::fuzz_target;

/// Magic and version: the first 10 bytes of any valid shard file.
const PREFIX: usize = 10;

fuzz_target!(|data: &[u8]| {
    let _ = ShardHeader::decode(data);
    let _ = parse_shard_file(data);
    if data.len() >= HEADER_LEN {
        let valid = encode_pack(Code::default(), [1; 32], b"x")[0].to_file_bytes();
        let mut file = data.to_vec();
        file[..PREFIX].copy_from_slice(&valid[..PREFIX]);
        let sum = blake3::hash(&file[..HEADER_LEN - 32]);
        file[HEADER_LEN - 32..HEADER_LEN].copy_from_slice(sum.as_bytes());
        let _ = ShardHeader::decode(&file);
        let _ = parse_shard_file(&file);
    }
});
