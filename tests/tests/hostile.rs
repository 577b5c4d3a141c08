//! A hostile client against real `cairn-node` processes: malformed bytes on
//! every RPC of every service are the caller's error (`InvalidArgument`,
//! never `Internal`), messages over a method's limit are refused from their
//! length prefix, a flood of large requests leaves the node inside its
//! 512 MiB memory budget and answering a well-behaved client, and a call
//! that never sends its message cannot hold a stopping node past its grace.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_node::limits::limits_of;
use cairn_proto::v1 as pb;
use cairn_tests::process::{ProcessCluster, ProcessOptions, status};
use http_body_util::{BodyExt, Full};
use tonic::Code;
use tonic::codegen::Service;
use tonic::transport::Channel;

/// The node's memory budget.
const RSS_BUDGET_BYTES: u64 = 512 * 1024 * 1024;

/// Every RPC path of the protocol, read from the `.proto` itself so that a
/// method added later is covered without editing this test.
fn every_rpc_path() -> Vec<String> {
    let proto = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/proto/cairn.proto"),
    )
    .expect("cairn.proto");
    let mut service = String::new();
    let mut paths = Vec::new();
    for line in proto.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("service ") {
            service = rest.trim_end_matches('{').trim().to_string();
        } else if let Some(rest) = line.strip_prefix("rpc ") {
            let method = rest.split('(').next().expect("rpc name").trim();
            paths.push(format!("/cairn.v1.{service}/{method}"));
        }
    }
    assert!(paths.len() >= 30, "parsed only {paths:?}");
    paths
}

/// A gRPC message frame: flag 0, big-endian length, body.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Sends `body` as the raw HTTP/2 body of a gRPC call to `path` and returns
/// the call's status (`Ok` counts as `Code::Ok`).
async fn raw_call(
    channel: &Channel,
    addr: &str,
    path: &str,
    body: Vec<u8>,
    node_id: Option<u64>,
) -> tonic::Status {
    let mut request = tonic::codegen::http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(id) = node_id {
        request = request.header(cairn_proto::transport::NODE_ID_HEADER, id.to_string());
    }
    let request = request
        .body(tonic::body::Body::new(
            Full::new(Bytes::from(body)).map_err(|never| match never {}),
        ))
        .expect("request");
    let mut channel = channel.clone();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .expect("channel ready");
    let response = match tokio::time::timeout(Duration::from_secs(30), channel.call(request)).await
    {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => return tonic::Status::unavailable(format!("transport: {e}")),
        Err(_) => return tonic::Status::deadline_exceeded("no answer in 30 s"),
    };
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return status;
    }
    let collected = match response.into_body().collect().await {
        Ok(collected) => collected,
        Err(e) => return e,
    };
    collected
        .trailers()
        .and_then(tonic::Status::from_header_map)
        .unwrap_or_else(|| tonic::Status::unknown("no grpc-status"))
}

/// Protobuf that no message type decodes: a field with the invalid wire
/// type 7, a length-delimited field longer than the message, a varint of
/// eleven bytes, and a truncated fixed64.
const UNDECODABLE: [&[u8]; 4] = [
    &[0x0f, 0x01, 0x02, 0x03],
    &[0x0a, 0xff, 0xff, 0x7f, 0x01],
    &[
        0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
    ],
    &[0x09, 0x01, 0x02],
];

fn node_pid(addr: &str) -> u32 {
    let wanted = format!("--listen\0{addr}\0");
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&wanted) {
            return pid;
        }
    }
    panic!("no cairn-node process listening on {addr}");
}

/// `VmHWM` (peak resident set) of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kib * 1024
}

async fn started(dir: &Path) -> ProcessCluster {
    let cluster = ProcessCluster::start(&dir.join("cluster"), &[2, 2, 2], "10m");
    cluster.wait_ready(Duration::from_secs(60)).await;
    cluster
}

fn channel(addr: &str) -> Channel {
    cairn_proto::transport::lazy_channel(addr, Duration::from_secs(2), None).expect("channel")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_refuses_malformed_and_oversized_messages_as_the_callers_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = started(dir.path()).await;
    let addr = cluster.addr(1).to_string();
    let channel = channel(&addr);
    let paths = every_rpc_path();
    let mut failures = Vec::new();
    for path in &paths {
        // Undecodable protobuf: InvalidArgument, whatever the method.
        for bytes in UNDECODABLE {
            let status = raw_call(&channel, &addr, path, frame(bytes), Some(1)).await;
            if status.code() != Code::InvalidArgument {
                failures.push(format!("{path} {bytes:02x?}: {status:?}"));
            }
        }
        // A body that is not one gRPC message: empty, a cut prefix, a bad
        // flag, a message shorter than it says.
        for body in [
            Vec::new(),
            vec![0, 0],
            vec![7, 0, 0, 0, 1, 0],
            vec![0, 0, 0, 0, 9, 1, 2],
        ] {
            let status = raw_call(&channel, &addr, path, body.clone(), Some(1)).await;
            if status.code() != Code::InvalidArgument {
                failures.push(format!("{path} body {body:02x?}: {status:?}"));
            }
        }
        // A prefix declaring one byte over the method's limit, and nothing
        // after it: refused from the prefix alone.
        let limit = limits_of(path).request;
        let mut prefix = vec![0];
        prefix.extend_from_slice(&((limit + 1) as u32).to_be_bytes());
        let status = raw_call(&channel, &addr, path, prefix, Some(1)).await;
        if !matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange) {
            failures.push(format!("{path} over its limit of {limit}: {status:?}"));
        } else if !status.message().contains(&limit.to_string()) {
            failures.push(format!(
                "{path}: the refusal does not name the limit: {status:?}"
            ));
        }
    }
    // Raft payloads that are valid protobuf but not a Raft message.
    for path in paths.iter().filter(|p| p.starts_with("/cairn.v1.Raft/")) {
        for data in [vec![0xff; 16], {
            let mut v = vec![1];
            v.extend([0xff; 24]);
            v
        }] {
            let body = prost::Message::encode_to_vec(&pb::RaftPayload { data });
            let status = raw_call(&channel, &addr, path, frame(&body), Some(1)).await;
            if status.code() != Code::InvalidArgument {
                failures.push(format!("{path} payload: {status:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The node is still up and serving.
    status(&addr)
        .await
        .expect("node answers after the hostile calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_message_of_empty_ids_is_refused_before_it_is_decoded_and_empty_lists_by_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = started(dir.path()).await;
    let addr = cluster.addr(1).to_string();
    let pid = node_pid(&addr);
    let before = peak_rss(pid);
    // 32 Mi empty ids: two bytes each on the wire, 24 bytes each once
    // decoded into a Vec<Vec<u8>> (768 MiB).
    let ids = vec![Vec::new(); 32 * 1024 * 1024 - 16];
    let request = pb::FindBlobsRequest {
        tenant: "t".into(),
        ids,
    };
    assert!(prost::Message::encoded_len(&request) > 63 * 1024 * 1024);
    let mut client = pb::cairn_client::CairnClient::new(channel(&addr))
        .max_encoding_message_size(128 * 1024 * 1024);
    let started = Instant::now();
    let refused = client
        .find_blobs(request)
        .await
        .expect_err("a 64 MiB FindBlobs is refused");
    assert!(
        matches!(
            refused.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::Cancelled
        ),
        "{refused:?}"
    );
    let after = peak_rss(pid);
    eprintln!(
        "64 MiB FindBlobs refused in {:?} ({}): node peak RSS {} MiB before, {} MiB after",
        started.elapsed(),
        refused.message(),
        before >> 20,
        after >> 20
    );
    assert!(
        after < before + 32 * 1024 * 1024,
        "the node read the message: peak RSS {} -> {} MiB",
        before >> 20,
        after >> 20
    );
    // Under PutPack's limit, but 25 Mi empty blob entries would decode into
    // about a GiB: refused from the count on the wire.
    let pack = pb::PutPackRequest {
        tenant: "t".into(),
        pack_id: vec![0; 32],
        data: vec![1].into(),
        blobs: vec![pb::BlobEntry::default(); 25 * 1024 * 1024],
        session: vec![],
    };
    let refused = client
        .put_pack(pack)
        .await
        .expect_err("a pack of empty blob entries is refused");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("blobs"), "{refused:?}");
    let after_blobs = peak_rss(pid);
    eprintln!(
        "50 MiB of empty blob entries refused ({}): node peak RSS {} MiB",
        refused.message(),
        after_blobs >> 20
    );
    assert!(
        after_blobs < 256 * 1024 * 1024,
        "peak RSS {} MiB",
        after_blobs >> 20
    );
    status(&addr).await.expect("node still answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_large_requests_keeps_the_node_in_its_memory_budget_and_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = started(dir.path()).await;
    let addr = cluster.addr(1).to_string();
    let pid = node_pid(&addr);
    let stop = Arc::new(AtomicBool::new(false));
    let codes = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        String,
        u64,
    >::new()));
    let count = |codes: &Arc<std::sync::Mutex<_>>, what: String| {
        let mut map: std::sync::MutexGuard<'_, std::collections::BTreeMap<String, u64>> =
            codes.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(what).or_default() += 1;
    };

    // Packs of 48 MiB (under the PutPack limit), whose id is not their hash:
    // each is read and decoded in full before it is refused.
    let pack = Bytes::from(vec![0x5a; 48 * 1024 * 1024]);
    let mut tasks = Vec::new();
    for worker in 0..8 {
        // Each worker on its own connection.
        let channel = channel(&addr);
        let (stop, codes, pack) = (stop.clone(), codes.clone(), pack.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = pb::cairn_client::CairnClient::new(channel)
                .max_encoding_message_size(128 * 1024 * 1024);
            while !stop.load(Ordering::Relaxed) {
                let result = client
                    .put_pack(pb::PutPackRequest {
                        tenant: format!("t{worker}"),
                        pack_id: vec![worker as u8; 32],
                        data: pack.clone(),
                        blobs: Vec::new(),
                        session: Vec::new(),
                    })
                    .await;
                let code = result.map(|_| Code::Ok).unwrap_or_else(|s| s.code());
                count(&codes, format!("PutPack 48 MiB: {code:?}"));
            }
        }));
    }
    // Oversized frames and malformed bytes, many streams at once on one connection.
    for _ in 0..2 {
        let channel = channel(&addr);
        let (stop, codes, addr) = (stop.clone(), codes.clone(), addr.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut calls = Vec::new();
                for i in 0..100u32 {
                    let (channel, addr) = (channel.clone(), addr.clone());
                    calls.push(tokio::spawn(async move {
                        let (path, body) = match i % 4 {
                            0 => {
                                let mut p = vec![0];
                                p.extend_from_slice(&u32::MAX.to_be_bytes());
                                ("/cairn.v1.Cairn/PutPack", p)
                            }
                            1 => ("/cairn.v1.Shards/PutShard", frame(UNDECODABLE[1])),
                            2 => ("/cairn.v1.Raft/AppendEntries", frame(UNDECODABLE[0])),
                            _ => ("/cairn.v1.Cairn/FindBlobs", frame(&vec![0x0a; 3 << 20])),
                        };
                        raw_call(&channel, &addr, path, body, None).await.code()
                    }));
                }
                for call in calls {
                    let code = call.await.unwrap_or(Code::Unknown);
                    count(&codes, format!("hostile small: {code:?}"));
                }
            }
        }));
    }

    // A well-behaved client meanwhile.
    let run_for = Duration::from_secs(25);
    let started = Instant::now();
    let slowest = AtomicU64::new(0);
    let mut answered = 0;
    while started.elapsed() < run_for {
        let t = Instant::now();
        let answer = status(&addr).await;
        slowest.fetch_max(t.elapsed().as_millis() as u64, Ordering::Relaxed);
        answer.unwrap_or_else(|e| panic!("ClusterStatus refused under load: {e}"));
        answered += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(60), task).await;
    }
    let peak = peak_rss(pid);
    let codes = codes.lock().unwrap_or_else(|p| p.into_inner()).clone();
    eprintln!(
        "hostile flood for {run_for:?}: node peak RSS (VmHWM) {} MiB; {answered} ClusterStatus answered, slowest {} ms; outcomes {codes:?}",
        peak >> 20,
        slowest.load(Ordering::Relaxed)
    );
    assert!(
        codes.keys().all(|k| !k.contains("Internal")),
        "no hostile request is the node's fault: {codes:?}"
    );
    assert!(
        codes
            .iter()
            .any(|(k, n)| k.starts_with("PutPack") && k.contains("InvalidArgument") && *n > 0),
        "the large packs were read and refused: {codes:?}"
    );
    assert!(
        peak < RSS_BUDGET_BYTES,
        "node peak RSS {} MiB over the 512 MiB budget",
        peak >> 20
    );
    status(&addr).await.expect("node still answers");
}

/// Starts a call to `addr` whose message never arrives: its frame header
/// announces 1,000 bytes and the body then waits forever. The call stays
/// in flight until the node gives up on it.
fn stall_a_call(addr: &str) -> tokio::task::JoinHandle<()> {
    let addr = addr.to_string();
    tokio::spawn(async move {
        let header = Bytes::from(vec![0, 0, 0, 0x03, 0xe8]);
        let body = http_body_util::StreamBody::new(futures::StreamExt::chain(
            futures::stream::once(
                async move { Ok::<_, tonic::Status>(http_body::Frame::data(header)) },
            ),
            futures::stream::pending(),
        ));
        let request = tonic::codegen::http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/cairn.v1.Cairn/ClusterStatus"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::new(body))
            .expect("request");
        let mut channel = channel(&addr);
        if std::future::poll_fn(|cx| channel.poll_ready(cx))
            .await
            .is_ok()
        {
            let _ = channel.call(request).await;
        }
    })
}

fn signal_stop(pid: u32) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a process id");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_call_cannot_hold_a_stopping_node_past_its_grace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let grace = Duration::from_secs(3);
    let mut cluster = ProcessCluster::start_with(
        &dir.path().join("cluster"),
        &[2, 2, 2],
        "10m",
        ProcessOptions {
            node_args: vec!["--shutdown-grace".into(), "3s".into()],
            ..ProcessOptions::default()
        },
    );
    cluster.wait_ready(Duration::from_secs(60)).await;

    // The stop drains calls in flight: the stalled one holds it for the
    // whole grace (its own deadline is far longer), then the node exits.
    let stalled = stall_a_call(cluster.addr(1));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let asked = Instant::now();
    signal_stop(cluster.pid(1).expect("node 1 runs"));
    let exit = cluster.must_exit(1, Duration::from_secs(30)).await;
    let took = asked.elapsed();
    stalled.abort();
    assert!(
        took >= grace - Duration::from_millis(500),
        "the stalled call held the stop only {took:?}: the test no longer stalls it"
    );
    assert!(!exit.success(), "a stop cut short says so: {exit:?}");
    assert!(
        cluster
            .log_tail(1)
            .contains("stop did not finish within its grace"),
        "{}",
        cluster.log_tail(1)
    );

    // A second signal does not wait for the grace.
    let stalled = stall_a_call(cluster.addr(2));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = cluster.pid(2).expect("node 2 runs");
    signal_stop(pid);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = Instant::now();
    signal_stop(pid);
    let exit = cluster.must_exit(2, Duration::from_secs(30)).await;
    let took = asked.elapsed();
    stalled.abort();
    assert!(took < grace, "the second signal waited {took:?}");
    assert!(!exit.success(), "{exit:?}");
    assert!(
        cluster.log_tail(2).contains("second stop signal"),
        "{}",
        cluster.log_tail(2)
    );
}
