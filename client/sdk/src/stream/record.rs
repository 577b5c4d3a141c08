//! One live record, its wire and segment format, and the room key.
//!
//! A record is one JSON object (`{"room", "user", "ts", ...}`) kept as the
//! bytes it arrived as, so an export prints exactly what was appended. A
//! segment's plaintext, and a compacted day file, are the same thing: JSON
//! lines sorted by `ts` (ties keep commit order). The room name only ever
//! leaves the client sealed; nodes index rooms by [`room_key`].

use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::{ClientError, Result};
use crate::seal::MasterKey;

/// A room name becomes a directory of a compaction snapshot: at most this long.
pub const ROOM_NAME_MAX: usize = 255;
/// One record line, at most (a chat record is a few hundred bytes).
pub const RECORD_BYTES_MAX: usize = 64 * 1024;

/// One record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Per-writer sequence number: strictly increasing, chosen by the caller,
    /// so a re-send after a crash is recognised and not stored twice.
    pub seq: u64,
    pub room: String,
    /// The record's own time, Unix milliseconds (its `ts` field).
    pub ts_ms: i64,
    /// The JSON object as given, one line, no trailing newline.
    pub line: Vec<u8>,
}

/// The fields a record must carry; everything else passes through untouched.
#[derive(Deserialize)]
struct Head {
    room: String,
    ts: serde_json::Value,
    #[serde(default)]
    seq: Option<u64>,
}

/// The fields an export reads back from a stored line.
#[derive(Deserialize)]
struct Stored {
    room: String,
    ts: serde_json::Value,
}

impl Record {
    /// Parses one input line. `seq` comes from the line's `"seq"` field if it
    /// has one, else from `default_seq`.
    pub fn parse(line: &[u8], default_seq: u64) -> Result<Record> {
        let line = line.trim_ascii();
        if line.len() > RECORD_BYTES_MAX {
            return Err(bad(format!(
                "record of {} bytes, at most {RECORD_BYTES_MAX}",
                line.len()
            )));
        }
        let head: Head = serde_json::from_slice(line)
            .map_err(|e| bad(format!("not a JSON object with \"room\" and \"ts\": {e}")))?;
        check_room(&head.room)?;
        let ts_ms = parse_ts_value(&head.ts)?;
        Ok(Record {
            seq: head.seq.unwrap_or(default_seq),
            room: head.room,
            ts_ms,
            line: line.to_vec(),
        })
    }
}

/// A record read back from a segment or a day file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub room: String,
    pub ts_ms: i64,
    pub line: Vec<u8>,
}

/// A room name must be usable as one path component of a snapshot.
pub fn check_room(room: &str) -> Result<()> {
    if room.is_empty() || room.len() > ROOM_NAME_MAX {
        return Err(bad(format!(
            "room name must be 1 to {ROOM_NAME_MAX} bytes, got {}",
            room.len()
        )));
    }
    if room == "." || room == ".." || room.contains('/') || room.chars().any(char::is_control) {
        return Err(bad(format!(
            "room name {room:?} cannot be a path component (no '/', control characters, '.' or '..')"
        )));
    }
    Ok(())
}

/// `ts` as Unix ms: an integer (ms) or an RFC 3339 string.
pub fn parse_ts_value(value: &serde_json::Value) -> Result<i64> {
    match value {
        serde_json::Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| bad(format!("ts {n} is not a whole number of milliseconds"))),
        serde_json::Value::String(s) => parse_time(s),
        other => Err(bad(format!(
            "ts must be Unix milliseconds or an RFC 3339 string, got {other}"
        ))),
    }
}

/// A time given as Unix milliseconds or RFC 3339 (`2026-11-28T21:00:00Z`,
/// offsets allowed), as Unix ms.
pub fn parse_time(text: &str) -> Result<i64> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let time = OffsetDateTime::parse(text, &Rfc3339).map_err(|e| {
        bad(format!(
            "time {text:?} is neither Unix milliseconds nor RFC 3339 (2026-11-28T21:00:00Z): {e}"
        ))
    })?;
    i64::try_from(time.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| bad(format!("time {text:?} is out of range")))
}

/// The UTC day of a time, `YYYY-MM-DD`: the name of its compacted day file
/// (without `.jsonl`).
pub fn day_of(ts_ms: i64) -> String {
    let day = ts_ms.div_euclid(DAY_MS);
    match OffsetDateTime::from_unix_timestamp(day * 86_400) {
        Ok(t) => format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day()),
        Err(_) => format!("day{day}"),
    }
}

/// The first millisecond of the UTC day holding `ts_ms`.
pub fn day_start(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(DAY_MS) * DAY_MS
}

pub const DAY_MS: i64 = 86_400_000;

/// The key nodes index a room by: blake3 keyed with a key derived from the
/// tenant's id key, over the dataset and the room name. Stable for the
/// tenant, unreadable without its key, and different per dataset.
pub fn room_key(key: &MasterKey, dataset: &str, room: &str) -> [u8; 32] {
    key.room_key(dataset.as_bytes(), room.as_bytes())
}

/// A segment's (or day file's) plaintext: the lines, sorted by time, ties
/// in the given order.
pub fn encode_segment<'a>(records: impl IntoIterator<Item = (i64, &'a [u8])>) -> Vec<u8> {
    let mut lines: Vec<(i64, &[u8])> = records.into_iter().collect();
    lines.sort_by_key(|(ts, _)| *ts);
    let mut out = Vec::with_capacity(lines.iter().map(|(_, l)| l.len() + 1).sum());
    for (_, line) in lines {
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out
}

/// Reads a segment or day file back. A line that is not a record is an
/// error naming it: the blob passed its id check, so this is a bug or a
/// foreign file, never silently skipped.
pub fn decode_segment(plaintext: &[u8]) -> Result<Vec<StoredRecord>> {
    let mut out = Vec::new();
    for (n, line) in plaintext.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let stored: Stored = serde_json::from_slice(line)
            .map_err(|e| bad(format!("stored record {} is not a record: {e}", n + 1)))?;
        out.push(StoredRecord {
            room: stored.room,
            ts_ms: parse_ts_value(&stored.ts)?,
            line: line.to_vec(),
        });
    }
    Ok(out)
}

fn bad(what: String) -> ClientError {
    ClientError::BadInput { what }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ms_and_rfc3339_and_keeps_the_line() {
        let r = Record::parse(
            br#" {"room":"r1","user":"u","ts":1700000000123,"text":"hi"} "#,
            7,
        )
        .expect("record");
        assert_eq!(r.seq, 7);
        assert_eq!(r.ts_ms, 1_700_000_000_123);
        assert_eq!(
            r.line,
            br#"{"room":"r1","user":"u","ts":1700000000123,"text":"hi"}"#
        );
        let r = Record::parse(
            br#"{"room":"r1","ts":"2026-11-28T21:00:00+01:00","seq":9}"#,
            1,
        )
        .expect("record");
        assert_eq!(r.seq, 9);
        assert_eq!(r.ts_ms, parse_time("2026-11-28T20:00:00Z").expect("time"));
    }

    #[test]
    fn refuses_bad_records() {
        for line in [
            &br#"{"ts":1}"#[..],
            br#"{"room":"a/b","ts":1}"#,
            br#"{"room":"..","ts":1}"#,
            br#"{"room":"r","ts":"yesterday"}"#,
            br#"{"room":"r","ts":1.5}"#,
            b"not json",
        ] {
            assert!(
                Record::parse(line, 1).is_err(),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn segments_round_trip_sorted_by_time() {
        let a = br#"{"room":"r","ts":5,"n":1}"#;
        let b = br#"{"room":"r","ts":3,"n":2}"#;
        let c = br#"{"room":"r","ts":5,"n":3}"#;
        let bytes = encode_segment([(5, &a[..]), (3, &b[..]), (5, &c[..])]);
        let back = decode_segment(&bytes).expect("decode");
        let lines: Vec<&[u8]> = back.iter().map(|r| r.line.as_slice()).collect();
        assert_eq!(lines, vec![&b[..], &a[..], &c[..]]);
    }

    #[test]
    fn days_are_utc() {
        assert_eq!(
            day_of(parse_time("2026-11-28T23:59:59.999Z").expect("t")),
            "2026-11-28"
        );
        assert_eq!(
            day_of(parse_time("2026-11-29T00:00:00Z").expect("t")),
            "2026-11-29"
        );
        assert_eq!(day_of(-1), "1969-12-31");
    }
}
