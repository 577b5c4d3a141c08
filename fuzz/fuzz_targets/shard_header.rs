//! The shard file decoder (header, then header and payload): arbitrary
//! bytes are refused cleanly, never a panic.
#![no_main]

use cairn_node::erasure::{ShardHeader, parse_shard_file};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ShardHeader::decode(data);
    let _ = parse_shard_file(data);
});
