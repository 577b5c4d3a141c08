//! Compiles `proto/*.proto` with protox (pure Rust): no system `protoc` needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/cairn.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // Packs are cloned on every retry: share the buffer instead of copying 16 MiB.
        .bytes(".cairn.v1.PutPackRequest.data")
        // Read ranges stay slices of the received message instead of copies.
        .bytes(".cairn.v1.ReadPackReply.ranges")
        // Shard files are shared by the gateway's writes and retries, and the
        // receiving node keeps the decode buffer's bytes instead of a copy.
        .bytes(".cairn.v1.PutShardRequest.shard")
        // Undecodable messages are the caller's error (InvalidArgument), not INTERNAL.
        .codec_path("crate::codec::CairnCodec")
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
