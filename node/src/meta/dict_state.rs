//! Compression dictionaries in the metadata state: one per (tenant,
//! dataset), sealed by the client (nodes never see it in the clear).
//!
//! A dictionary is tenant metadata, not a blob: a chunk compressed with
//! dataset A's dictionary may be deduplicated into dataset B's snapshots,
//! so if the dictionary could be swept with A's snapshots, B's chunk would
//! become unreadable. Nothing here is ever garbage collected; the first
//! dictionary stored for a dataset stays (so two first backups racing agree
//! on one), and a tenant holds at most
//! [`cairn_proto::DICTIONARIES_PER_TENANT_MAX`].

use serde::{Deserialize, Serialize};

use super::codec;
use super::state::{StateError, StateView, tenant_prefix};
use super::types::{CommandResult, Id32};
use crate::kv::WriteBatch;

/// `'D' T dataset -> DictionaryRecord`.
pub(super) const DICTIONARY: u8 = b'D';

/// A dataset's dictionary as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DictionaryRecord {
    /// The client's id of the dictionary (keyed blake3 of its bytes).
    pub id: Id32,
    /// The dictionary sealed with the tenant's key.
    pub sealed: Vec<u8>,
}

/// A dictionary with the dataset it was made for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DictionaryEntry {
    pub dataset: String,
    pub record: DictionaryRecord,
}

fn dictionary_key(tenant: &str, dataset: &str) -> Vec<u8> {
    let mut key = tenant_prefix(DICTIONARY, tenant);
    // The dataset ends the key, so no length prefix is needed to keep
    // datasets apart; the tenant before it is length-prefixed.
    key.extend_from_slice(dataset.as_bytes());
    key
}

impl StateView {
    /// The tenant's dictionaries, in dataset order.
    pub fn dictionaries(&self, tenant: &str) -> Result<Vec<DictionaryEntry>, StateError> {
        let prefix = tenant_prefix(DICTIONARY, tenant);
        self.kv()
            .scan_prefix(&prefix)?
            .into_iter()
            .map(|(key, value)| {
                let dataset = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                let record = codec::decode("dictionary", &value)?;
                Ok(DictionaryEntry { dataset, record })
            })
            .collect()
    }

    /// The dataset's dictionary, if it has one.
    pub fn dictionary(
        &self,
        tenant: &str,
        dataset: &str,
    ) -> Result<Option<DictionaryRecord>, StateError> {
        self.get("dictionary", &dictionary_key(tenant, dataset))
    }
}

/// `Command::PutDictionary`.
pub(super) fn put(
    view: &StateView,
    tenant: &str,
    dataset: &str,
    id: &Id32,
    sealed: &[u8],
    batch: &mut WriteBatch,
) -> Result<CommandResult, StateError> {
    if view.key_slots(tenant)?.is_empty() {
        return Ok(CommandResult::UnknownTenant);
    }
    if let Some(existing) = view.dictionary(tenant, dataset)? {
        return Ok(CommandResult::Dictionary {
            id: existing.id,
            stored: false,
        });
    }
    let held = view
        .kv()
        .scan_prefix(&tenant_prefix(DICTIONARY, tenant))?
        .len();
    if held >= cairn_proto::DICTIONARIES_PER_TENANT_MAX {
        return Ok(CommandResult::TooManyDictionaries);
    }
    let record = DictionaryRecord {
        id: *id,
        sealed: sealed.to_vec(),
    };
    batch.put(
        dictionary_key(tenant, dataset),
        codec::encode("dictionary", &record)?,
    );
    Ok(CommandResult::Dictionary {
        id: *id,
        stored: true,
    })
}

#[cfg(test)]
mod tests {
    use super::super::state::testing::{id, run, view};
    use super::super::types::Command;
    use super::*;

    fn init(v: &StateView, tenant: &str) {
        assert_eq!(
            run(
                v,
                Command::InitTenant {
                    tenant: tenant.into(),
                    key_slot: b"slot".to_vec(),
                }
            ),
            CommandResult::Ok
        );
    }

    fn put_cmd(tenant: &str, dataset: &str, n: u8) -> Command {
        Command::PutDictionary {
            tenant: tenant.into(),
            dataset: dataset.into(),
            id: id(n),
            sealed: vec![n; 10],
        }
    }

    #[test]
    fn the_first_dictionary_of_a_dataset_wins() {
        let v = view();
        init(&v, "t");
        assert_eq!(
            run(&v, put_cmd("t", "chat", 1)),
            CommandResult::Dictionary {
                id: id(1),
                stored: true
            }
        );
        // A second backup that trained its own: told the first one's id.
        assert_eq!(
            run(&v, put_cmd("t", "chat", 2)),
            CommandResult::Dictionary {
                id: id(1),
                stored: false
            }
        );
        assert_eq!(
            run(&v, put_cmd("t", "chat2", 3)),
            CommandResult::Dictionary {
                id: id(3),
                stored: true
            }
        );
        let all = v.dictionaries("t").expect("read");
        assert_eq!(
            all.iter()
                .map(|e| (e.dataset.as_str(), e.record.id, e.record.sealed.clone()))
                .collect::<Vec<_>>(),
            vec![("chat", id(1), vec![1; 10]), ("chat2", id(3), vec![3; 10])]
        );
    }

    #[test]
    fn tenants_are_apart_and_must_exist() {
        let v = view();
        assert_eq!(run(&v, put_cmd("a", "d", 1)), CommandResult::UnknownTenant);
        init(&v, "a");
        init(&v, "ab");
        run(&v, put_cmd("a", "d", 1));
        run(&v, put_cmd("ab", "d", 2));
        assert_eq!(v.dictionaries("a").expect("read").len(), 1);
        assert_eq!(v.dictionaries("ab").expect("read")[0].record.id, id(2));
        assert!(v.dictionaries("b").expect("read").is_empty());
    }

    #[test]
    fn a_tenant_holds_a_bounded_number() {
        let v = view();
        init(&v, "t");
        for n in 0..cairn_proto::DICTIONARIES_PER_TENANT_MAX {
            let cmd = put_cmd("t", &format!("d{n}"), (n % 250) as u8);
            assert!(matches!(
                run(&v, cmd),
                CommandResult::Dictionary { stored: true, .. }
            ));
        }
        assert_eq!(
            run(&v, put_cmd("t", "one-more", 1)),
            CommandResult::TooManyDictionaries
        );
        // A dataset that has one still answers with it.
        assert_eq!(
            run(&v, put_cmd("t", "d0", 9)),
            CommandResult::Dictionary {
                id: id(0),
                stored: false
            }
        );
    }
}
