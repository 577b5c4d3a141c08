//! The [`KvStore`] conformance suite: every engine, the in-memory one
//! included, must pass all of it. Each case gets a fresh, empty store from the
//! caller's factory. Engines with real durability add the reopen fixture.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use super::{KvStore, WriteBatch};

/// Runs every case against stores made by `make` (one fresh store per case).
pub fn run_all<S: KvStore>(make: impl Fn() -> S) {
    get_put_delete(&make());
    empty_value_is_not_absent(&make());
    batch_applies_in_order_and_is_visible_on_return(&make());
    prefix_scan_is_ordered_and_bounded(&make());
    range_honours_bounds_and_limit(&make());
    last_with_prefix_finds_the_greatest_key(&make());
    flush_keeps_data_readable(&make());
    matches_a_btreemap_model(&make);
}

fn get_put_delete(kv: &impl KvStore) {
    assert_eq!(kv.get(b"a").expect("get"), None);
    kv.put(b"a", b"1").expect("put");
    assert_eq!(kv.get(b"a").expect("get"), Some(b"1".to_vec()));
    kv.put(b"a", b"2").expect("overwrite");
    assert_eq!(kv.get(b"a").expect("get"), Some(b"2".to_vec()));
    kv.delete(b"a").expect("delete");
    assert_eq!(kv.get(b"a").expect("get"), None);
    kv.delete(b"a")
        .expect("deleting an absent key is not an error");
}

fn empty_value_is_not_absent(kv: &impl KvStore) {
    kv.put(b"k", b"").expect("put");
    assert_eq!(kv.get(b"k").expect("get"), Some(Vec::new()));
    kv.put(b"", b"empty key").expect("put");
    assert_eq!(kv.get(b"").expect("get"), Some(b"empty key".to_vec()));
}

fn batch_applies_in_order_and_is_visible_on_return(kv: &impl KvStore) {
    kv.put(b"old", b"x").expect("put");
    let mut batch = WriteBatch::new();
    batch.put(b"a".to_vec(), b"1".to_vec());
    batch.put(b"b".to_vec(), b"1".to_vec());
    batch.delete(b"b".to_vec()); // later op on the same key wins
    batch.delete(b"c".to_vec());
    batch.put(b"c".to_vec(), b"3".to_vec());
    batch.delete(b"old".to_vec());
    kv.apply_batch(batch).expect("batch");
    assert_eq!(kv.get(b"a").expect("get"), Some(b"1".to_vec()));
    assert_eq!(kv.get(b"b").expect("get"), None);
    assert_eq!(kv.get(b"c").expect("get"), Some(b"3".to_vec()));
    assert_eq!(kv.get(b"old").expect("get"), None);
    kv.apply_batch(WriteBatch::new()).expect("empty batch");
    assert_eq!(kv.scan_prefix(b"").expect("scan").len(), 2);
}

fn prefix_scan_is_ordered_and_bounded(kv: &impl KvStore) {
    for key in [&b"p/b"[..], b"p/a", b"q", b"p", b"o/z", b"p/\xff", b"p/a/1"] {
        kv.put(key, key).expect("put");
    }
    let keys: Vec<Vec<u8>> = kv
        .scan_prefix(b"p/")
        .expect("scan")
        .into_iter()
        .map(|(k, v)| {
            assert_eq!(k, v, "value belongs to its key");
            k
        })
        .collect();
    assert_eq!(
        keys,
        vec![
            b"p/a".to_vec(),
            b"p/a/1".to_vec(),
            b"p/b".to_vec(),
            b"p/\xff".to_vec()
        ]
    );
    let all = kv.scan_prefix(b"").expect("scan all");
    assert_eq!(all.len(), 7);
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "ascending order");
    assert!(kv.scan_prefix(b"zz").expect("scan").is_empty());
}

fn range_honours_bounds_and_limit(kv: &impl KvStore) {
    for i in 0u64..10 {
        kv.put(&i.to_be_bytes(), b"v").expect("put");
    }
    let keys = |pairs: Vec<(Vec<u8>, Vec<u8>)>| -> Vec<u64> {
        pairs
            .into_iter()
            .map(|(k, _)| u64::from_be_bytes(k.try_into().expect("8-byte key")))
            .collect()
    };
    let r = kv
        .range(&3u64.to_be_bytes(), Some(&7u64.to_be_bytes()), usize::MAX)
        .expect("range");
    assert_eq!(keys(r), vec![3, 4, 5, 6]);
    let r = kv
        .range(&8u64.to_be_bytes(), None, usize::MAX)
        .expect("range");
    assert_eq!(keys(r), vec![8, 9]);
    let r = kv.range(&0u64.to_be_bytes(), None, 2).expect("range");
    assert_eq!(keys(r), vec![0, 1]);
    let r = kv
        .range(&5u64.to_be_bytes(), Some(&5u64.to_be_bytes()), usize::MAX)
        .expect("empty range");
    assert!(r.is_empty());
    let r = kv
        .range(&6u64.to_be_bytes(), Some(&2u64.to_be_bytes()), usize::MAX)
        .expect("inverted range");
    assert!(r.is_empty());
}

fn last_with_prefix_finds_the_greatest_key(kv: &impl KvStore) {
    assert_eq!(kv.last_with_prefix(b"e").expect("last"), None);
    for key in [&b"d\xff"[..], b"e\x00", b"e\x05", b"e\xff\xff", b"f"] {
        kv.put(key, b"v").expect("put");
    }
    let last = kv.last_with_prefix(b"e").expect("last").map(|(k, _)| k);
    assert_eq!(last, Some(b"e\xff\xff".to_vec()));
    let last = kv.last_with_prefix(b"\xff").expect("last");
    assert_eq!(last, None);
    kv.put(b"\xff\xff", b"v").expect("put");
    let last = kv.last_with_prefix(b"\xff").expect("last").map(|(k, _)| k);
    assert_eq!(last, Some(b"\xff\xff".to_vec()));
    let last = kv.last_with_prefix(b"").expect("last").map(|(k, _)| k);
    assert_eq!(last, Some(b"\xff\xff".to_vec()));
}

fn flush_keeps_data_readable(kv: &impl KvStore) {
    kv.put(b"durable", b"yes").expect("put");
    kv.flush().expect("flush");
    assert_eq!(kv.get(b"durable").expect("get"), Some(b"yes".to_vec()));
}

#[derive(Debug, Clone)]
enum Op {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    Batch(Vec<(Vec<u8>, Option<Vec<u8>>)>),
}

fn small_key() -> impl Strategy<Value = Vec<u8>> {
    // A tiny alphabet makes prefixes and overwrites collide often.
    proptest::collection::vec(prop_oneof![Just(0u8), Just(1), Just(0xff)], 0..4)
}

fn op() -> impl Strategy<Value = Op> {
    let value = proptest::collection::vec(any::<u8>(), 0..4);
    prop_oneof![
        (small_key(), value.clone()).prop_map(|(k, v)| Op::Put(k, v)),
        small_key().prop_map(Op::Delete),
        proptest::collection::vec((small_key(), proptest::option::of(value)), 0..6)
            .prop_map(Op::Batch),
    ]
}

/// Random operation sequences leave the store equal to a `BTreeMap` model,
/// for full scans, prefix scans and last-with-prefix.
fn matches_a_btreemap_model<S: KvStore>(make: &impl Fn() -> S) {
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (proptest::collection::vec(op(), 0..24), small_key());
    runner
        .run(&strategy, |(ops, probe)| {
            let kv = make();
            let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Put(k, v) => {
                        kv.put(&k, &v).expect("put");
                        model.insert(k, v);
                    }
                    Op::Delete(k) => {
                        kv.delete(&k).expect("delete");
                        model.remove(&k);
                    }
                    Op::Batch(items) => {
                        let mut batch = WriteBatch::new();
                        for (k, v) in items {
                            match v {
                                Some(v) => {
                                    batch.put(k.clone(), v.clone());
                                    model.insert(k, v);
                                }
                                None => {
                                    batch.delete(k.clone());
                                    model.remove(&k);
                                }
                            }
                        }
                        kv.apply_batch(batch).expect("batch");
                    }
                }
            }
            let all: Vec<_> = model.clone().into_iter().collect();
            prop_assert_eq!(kv.scan_prefix(b"").expect("scan"), all);
            let with_prefix: Vec<_> = model
                .iter()
                .filter(|(k, _)| k.starts_with(&probe))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            prop_assert_eq!(kv.scan_prefix(&probe).expect("scan"), with_prefix.clone());
            prop_assert_eq!(
                kv.last_with_prefix(&probe).expect("last"),
                with_prefix.last().cloned()
            );
            for (k, v) in &model {
                prop_assert_eq!(kv.get(k).expect("get"), Some(v.clone()));
            }
            Ok(())
        })
        .expect("store must behave like the BTreeMap model");
}

/// Writes the data [`check_reopen_fixture`] expects, to two stores sharing a database.
pub fn write_reopen_fixture(log: &impl KvStore, state: &impl KvStore) {
    for i in 0u64..100 {
        log.put(&i.to_be_bytes(), format!("entry {i}").as_bytes())
            .expect("put");
    }
    let mut batch = WriteBatch::new();
    batch.put(b"applied".to_vec(), b"99".to_vec());
    batch.put(b"tenant/a".to_vec(), b"slot".to_vec());
    state.apply_batch(batch).expect("batch");
    log.delete(&5u64.to_be_bytes()).expect("delete");
}

/// Checks, after a flush and a reopen, what [`write_reopen_fixture`] wrote.
pub fn check_reopen_fixture(log: &impl KvStore, state: &impl KvStore) {
    assert_eq!(log.scan_prefix(b"").expect("scan").len(), 99);
    assert_eq!(log.get(&5u64.to_be_bytes()).expect("get"), None);
    assert_eq!(
        log.get(&42u64.to_be_bytes()).expect("get"),
        Some(b"entry 42".to_vec())
    );
    assert_eq!(state.get(b"applied").expect("get"), Some(b"99".to_vec()));
    assert_eq!(state.get(b"tenant/a").expect("get"), Some(b"slot".to_vec()));
    assert_eq!(
        state.get(&42u64.to_be_bytes()).expect("get"),
        None,
        "trees are separate"
    );
}
