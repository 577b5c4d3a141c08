//! Local reads of the trust-boundary records: tokens, key slots with their
//! ids, the cluster clock and the audit log. Writes go through
//! [`Meta::write`] like every command.

use super::types::{AuditRecord, Id32, KeySlotEntry, TokenRecord};
use super::{Meta, MetaError};

impl Meta {
    /// The token stored under `key` (local, possibly stale: a revocation
    /// reaches this node with its next applied entry).
    pub fn token(&self, key: &Id32) -> Result<Option<TokenRecord>, MetaError> {
        Ok(self.view()?.token(key)?)
    }

    /// Every token, revoked and expired ones included (local).
    pub fn tokens(&self) -> Result<Vec<TokenRecord>, MetaError> {
        Ok(self.view()?.tokens()?)
    }

    /// The tenant's key slots with ids and times (local).
    pub fn key_slot_entries(&self, tenant: &str) -> Result<Vec<KeySlotEntry>, MetaError> {
        Ok(self.view()?.key_slot_entries(tenant)?)
    }

    /// Cluster time as last applied here (local).
    pub fn cluster_clock(&self) -> Result<i64, MetaError> {
        Ok(self.view()?.clock()?)
    }

    /// Seq and hash of the newest audit entry (local).
    pub fn audit_head(&self) -> Result<(u64, Id32), MetaError> {
        Ok(self.view()?.audit_head()?)
    }

    /// Up to `limit` audit entries after `after_seq`, oldest first (local).
    pub fn audit_entries(
        &self,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, MetaError> {
        Ok(self.view()?.audit_entries(after_seq, limit)?)
    }
}
