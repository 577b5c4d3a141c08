//! A zstd dictionary per dataset, for data chunks.
//!
//! Data chunks are ~32 KiB and compressed one by one, so each starts
//! without context; chat logs (JSON lines) repeat the same keys and values
//! in every chunk. A dictionary trained on the dataset's first chunks gives
//! each chunk that context back (about 4 % fewer stored bytes on generated
//! chat data), without larger chunks, which would make appends costlier.
//!
//! A backup session uses the dataset's dictionary if it has one. If not, it
//! samples the first compressible chunks (up to [`SAMPLE_BYTES`], a prefix
//! of each chunk so the sample spans many chunks and files), trains a
//! dictionary (zstd's fastCover trainer) on one worker while the others go
//! on compressing without one, stores it sealed with `PutDictionary` and
//! compresses every later chunk with it. The metadata group keeps the first
//! dictionary of a dataset; a session that loses that race uses the
//! winner's. A dictionary is stored before any blob compressed with it.
//! Trees, reference lists and stream segments never use one.
//!
//! Dictionaries are tenant metadata, never garbage collected: a chunk made
//! with dataset A's dictionary can be deduplicated into dataset B, so it
//! must stay readable after every snapshot of A is gone.

use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::repo::Repository;
use crate::seal::{BlobId, Dictionary};

/// Bytes of samples a dictionary is trained on. Training takes about 0.12 s
/// per MiB on one core; 2 MiB of 8 KiB prefixes gain within a few tenths of
/// a percent of what 16 MiB gain on chat data.
pub const SAMPLE_BYTES: usize = 2 * 1024 * 1024;
/// Bytes taken from the start of each sampled chunk: many short samples from
/// many chunks train a more general dictionary than a few whole chunks.
const SAMPLE_PER_CHUNK: usize = 8 * 1024;
/// Largest dictionary trained (a sealed dictionary must fit
/// `cairn_proto::DICTIONARY_SEALED_BYTES_MAX`).
pub const DICTIONARY_BYTES: usize = 64 * 1024;

enum State {
    /// Compress with this dictionary (`None`: without one, for this session).
    Using(Option<Arc<Dictionary>>),
    /// Collecting samples for training.
    Sampling { data: Vec<u8>, sizes: Vec<usize> },
    /// One worker trains and stores; the others compress without one.
    Training,
}

/// One backup session's dictionary for its dataset's data chunks.
pub(crate) struct DatasetDictionary {
    dataset: String,
    state: Mutex<State>,
}

impl DatasetDictionary {
    /// The dataset's dictionary if the repository has loaded one, else a
    /// dictionary to train from this session's first chunks.
    pub(crate) fn new(repo: &Repository, dataset: &str) -> Self {
        let state = match repo.dataset_dictionary(dataset) {
            Some(dictionary) => State::Using(Some(dictionary)),
            None => State::Sampling {
                data: Vec::new(),
                sizes: Vec::new(),
            },
        };
        Self {
            dataset: dataset.to_string(),
            state: Mutex::new(state),
        }
    }

    /// Seals a data chunk (as [`crate::seal::MasterKey::encode_blob`]) with
    /// the dataset's dictionary when there is one; until then samples it,
    /// and the worker that completes the sample trains and stores the
    /// dictionary (blocking on `runtime`, as the session's other calls).
    pub(crate) fn encode(
        &self,
        repo: &Repository,
        runtime: &tokio::runtime::Handle,
        id: &BlobId,
        data: &[u8],
    ) -> Result<Vec<u8>> {
        let current = match &*self.lock() {
            State::Using(dictionary) => Some(dictionary.clone()),
            _ => None,
        };
        if let Some(dictionary) = current {
            return Ok(repo
                .key()
                .encode_blob_with(id, data, dictionary.as_ref())?
                .0);
        }
        let (blob, compressed) = repo.key().encode_blob_with(id, data, None)?;
        if compressed && let Some(samples) = self.sample(data) {
            let dictionary = self.train_and_store(repo, runtime, samples);
            *self.lock() = State::Using(dictionary);
        }
        Ok(blob)
    }

    /// Adds a chunk's prefix to the sample; returns the whole sample (and
    /// moves to `Training`) once it is large enough.
    fn sample(&self, data: &[u8]) -> Option<(Vec<u8>, Vec<usize>)> {
        let mut state = self.lock();
        let State::Sampling {
            data: samples,
            sizes,
        } = &mut *state
        else {
            return None;
        };
        let take = data.len().min(SAMPLE_PER_CHUNK);
        samples.extend_from_slice(&data[..take]);
        sizes.push(take);
        if samples.len() < SAMPLE_BYTES {
            return None;
        }
        match std::mem::replace(&mut *state, State::Training) {
            State::Sampling { data, sizes } => Some((data, sizes)),
            _ => None,
        }
    }

    /// Trains a dictionary and stores it; `None` (compress without one)
    /// if training fails or the cluster stores none. A failure here never
    /// fails the backup: the dictionary only saves space.
    fn train_and_store(
        &self,
        repo: &Repository,
        runtime: &tokio::runtime::Handle,
        (samples, sizes): (Vec<u8>, Vec<usize>),
    ) -> Option<Arc<Dictionary>> {
        let started = std::time::Instant::now();
        let bytes = match train(&samples, &sizes) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(dataset = %self.dataset, error = %e,
                    "compression dictionary not trained; compressing without one");
                return None;
            }
        };
        let trained_ms = started.elapsed().as_millis();
        let dictionary = repo.key().make_dictionary(bytes);
        match runtime.block_on(repo.put_dictionary(&self.dataset, dictionary)) {
            Ok(stored) => {
                tracing::info!(dataset = %self.dataset,
                    dictionary = stored.as_ref().map(|d| hex::encode(&d.id()[..8])),
                    trained_ms, samples = sizes.len(), "compression dictionary");
                stored
            }
            Err(e) => {
                tracing::warn!(dataset = %self.dataset, error = %e,
                    "compression dictionary not stored; compressing without one");
                None
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Trains a dictionary of at most [`DICTIONARY_BYTES`] on `samples`
/// (concatenated, `sizes` each).
pub fn train(samples: &[u8], sizes: &[usize]) -> std::io::Result<Vec<u8>> {
    zstd::dict::from_continuous(samples, sizes, DICTIONARY_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::MasterKey;

    fn chat(lines: usize, seed: u64) -> Vec<u8> {
        let words = [
            "hello", "there", "lunch", "meeting", "deploy", "coffee", "tomorrow", "ok", "thanks",
            "review", "please", "merged",
        ];
        let mut out = Vec::new();
        let mut x = seed;
        for i in 0..lines {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let text: Vec<&str> = (0..(x >> 60) as u32 + 2)
                .map(|j| words[(x.rotate_right(j * 4) % words.len() as u64) as usize])
                .collect();
            out.extend_from_slice(
                format!(
                    "{{\"id\":\"{:016x}\",\"ts\":{},\"room\":\"general-{}\",\"user\":{{\"id\":{},\"name\":\"user{}\"}},\"type\":\"message\",\"text\":\"{}\",\"reactions\":[]}}\n",
                    x,
                    1_700_000_000_000u64 + i as u64 * 7919,
                    (x >> 20) % 9,
                    (x >> 30) % 500,
                    (x >> 30) % 500,
                    text.join(" ")
                )
                .as_bytes(),
            );
        }
        out
    }

    #[test]
    fn a_trained_dictionary_shrinks_small_json_chunks() {
        let mut samples = Vec::new();
        let mut sizes = Vec::new();
        for seed in 0..200 {
            let chunk = chat(60, seed);
            sizes.push(chunk.len());
            samples.extend_from_slice(&chunk);
        }
        let bytes = train(&samples, &sizes).expect("trains");
        assert!(!bytes.is_empty() && bytes.len() <= DICTIONARY_BYTES);
        let key = MasterKey::generate();
        let dictionary = key.make_dictionary(bytes);
        key.add_dictionary(dictionary.clone());
        let (mut plain_total, mut dict_total) = (0, 0);
        for seed in 1000..1020 {
            let chunk = chat(200, seed);
            let id = key.blob_id(&chunk);
            let plain = key.encode_blob(&id, &chunk).expect("encodes");
            let (with, _) = key
                .encode_blob_with(&id, &chunk, Some(&dictionary))
                .expect("encodes");
            assert_eq!(key.decode_blob(&id, &with).expect("decodes"), chunk);
            plain_total += plain.len();
            dict_total += with.len();
        }
        assert!(
            dict_total < plain_total,
            "with dictionary {dict_total}, without {plain_total}"
        );
    }
}
