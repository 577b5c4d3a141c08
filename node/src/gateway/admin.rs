//! Operations of the cluster itself, behind the gateway: status, the node
//! view, adding nodes, fault intake and the metrics snapshot. Repair work is
//! the repairer's; this module only hands it over.

use std::sync::Arc;

use cairn_proto::v1 as pb;

use super::{Gateway, GatewayError, MetricsSnapshot, check_name, id32};
use crate::auth::permission::may_create_token;
use crate::auth::token::token_key;
use crate::auth::{Caller, Role};
use crate::meta::membership::{AddPlan, check_add};
use crate::meta::types::{Command, CommandResult, TokenRecord};
use crate::meta::types::{NodeId, NodeInfo};
use crate::model::{NodeView, StorageClass};
use crate::peers::addressed;
use crate::repair::RepairState;
use std::collections::BTreeMap;

impl Gateway {
    /// The cluster map as this gateway sees it: the membership, with `up`
    /// from liveness (not declared down) and `draining` from drains in progress.
    pub fn node_views(&self) -> Vec<NodeView> {
        self.meta
            .node_views()
            .into_values()
            .map(|view| NodeView {
                up: view.id == self.node_id || !self.liveness.is_down(view.id),
                draining: self.repairer.is_draining(view.id),
                ..view
            })
            .collect()
    }

    /// Checks that `addr` is served by node `id` before it is added: a node
    /// that is not running (or another node at that address) must not enter
    /// the membership, where it would count for placement and voting.
    pub(super) async fn must_answer_as(&self, id: NodeId, addr: &str) -> Result<(), GatewayError> {
        let unreachable = |reason: String| GatewayError::NodeUnreachable {
            node: id,
            addr: addr.to_string(),
            reason,
        };
        // Asked as a one-node map: the node is not a member yet.
        let info = NodeInfo {
            region: String::new(),
            addr: addr.to_string(),
        };
        let candidate = BTreeMap::from([(id, NodeView::member(id, &info, false))]);
        match self.io.stats(id, &candidate).await {
            Ok(_) => Ok(()),
            Err(crate::shard_io::ShardIoError::Remote {
                code: tonic::Code::FailedPrecondition,
                message,
                ..
            }) => Err(GatewayError::WrongNodeAtAddress {
                node: id,
                addr: addr.to_string(),
                answer: message,
            }),
            Err(error) => Err(unreachable(error.to_string())),
        }
    }

    /// Values for the metrics page.
    pub fn metrics_snapshot(&self) -> MetricsSnapshot {
        let (shards, shard_bytes) = self.io.store().stats();
        MetricsSnapshot {
            term: self.meta.term(),
            is_leader: self.is_leader(),
            last_applied: self.meta.last_applied(),
            shards,
            shard_bytes,
            protection: self.repairer.protection().unwrap_or_default(),
            nodes: self.node_views(),
        }
    }

    /// Reports bad shards to the leader's repairer (this node's if it leads).
    /// Bounded by the RPC deadline; a failed report is logged, and scrub or
    /// the next check finds the shard again.
    pub(crate) async fn report_to_leader(
        &self,
        faults: Vec<pb::ShardFault>,
    ) -> Result<(), GatewayError> {
        if faults.is_empty() {
            return Ok(());
        }
        if self.is_leader() {
            return self.take_faults(&faults);
        }
        let (leader, mut client) = self.leader_client()?;
        client
            .report_faults(addressed(
                leader,
                pb::ReportFaultsRequest { faults },
                self.config.rpc_timeout,
            ))
            .await
            .map(|_| ())
            .map_err(|status| GatewayError::Leader {
                leader,
                message: status.message().to_string(),
            })
    }

    /// Parses reported faults and hands them to the repairer.
    pub(super) fn take_faults(&self, faults: &[pb::ShardFault]) -> Result<(), GatewayError> {
        super::check_fault_count(faults.len())?;
        let mut parsed = Vec::with_capacity(faults.len());
        for fault in faults {
            parsed.push((id32(&fault.pack_id, "pack id")?, fault.index, fault.node_id));
        }
        self.repairer.report_faults(parsed);
        Ok(())
    }

    /// Repair counters for `cluster status`.
    pub(super) fn repair_status(&self) -> pb::RepairStatus {
        use std::sync::atomic::Ordering;
        let r: Arc<RepairState> = self.repairer.state();
        pb::RepairStatus {
            queue: r.queue.load(Ordering::Relaxed),
            rate_bytes_per_s: r.rate_milli_bytes_per_s.load(Ordering::Relaxed) as f64 / 1000.0,
            packs_repaired_total: r.packs_repaired_total.load(Ordering::Relaxed),
            shards_written_total: r.shards_written_total.load(Ordering::Relaxed),
            bytes_written_total: r.bytes_written_total.load(Ordering::Relaxed),
            last_pass_unix_ms: r.last_pass_unix_ms.load(Ordering::Relaxed) as i64,
            errors_total: r.errors_total.load(Ordering::Relaxed),
            rate_limit_bytes_per_s: self.repairer.config().rate_bytes_per_s,
            lost_total: r.passes_lost_total.load(Ordering::Relaxed),
            shards_cleaned_total: r.shards_cleaned_total.load(Ordering::Relaxed),
            bad_shards_reported: r.bad_len() as u64,
        }
    }

    /// Shard and scrub stats of one node; `None` if it did not answer.
    pub(super) async fn node_stats(
        &self,
        node: NodeId,
        members: &crate::shard_io::Members,
    ) -> Option<pb::ShardStatsReply> {
        if node == self.node_id {
            let (shards, bytes) = self.io.store().stats();
            return Some(pb::ShardStatsReply {
                shards,
                bytes,
                scrub: Some(self.scrub.report()),
            });
        }
        self.io.stats(node, members).await.ok()
    }

    pub(super) async fn cluster_status_inner(
        &self,
        _req: pb::ClusterStatusRequest,
    ) -> Result<pb::ClusterStatusReply, GatewayError> {
        let views = self.node_views();
        let members = self.members();
        let stats =
            futures::future::join_all(views.iter().map(|view| self.node_stats(view.id, &members)))
                .await;
        let (orphan_shards, orphan_bytes) = stats
            .iter()
            .flatten()
            .filter_map(|s| s.scrub.as_ref())
            .fold((0, 0), |(n, b), s| {
                (n + s.orphan_shards, b + s.orphan_bytes)
            });
        let by_class = self.class_usage(&views, &stats)?;
        let nodes = views
            .into_iter()
            .zip(stats)
            .map(|(view, stats)| {
                if stats.is_some() {
                    self.liveness.saw(view.id);
                }
                pb::NodeStatus {
                    storage_class: view.storage_class.to_string(),
                    node_id: view.id,
                    up: stats.is_some(),
                    voter: view.voter,
                    shards: stats.as_ref().map(|s| s.shards).unwrap_or_default(),
                    bytes: stats.as_ref().map(|s| s.bytes).unwrap_or_default(),
                    scrub: stats.and_then(|s| s.scrub),
                    last_seen_unix_ms: self.liveness.last_seen_unix_ms(view.id),
                    down_since_unix_ms: self.liveness.down_since_unix_ms(view.id),
                    region: view.region,
                    addr: view.addr,
                }
            })
            .collect();
        let meta_stats = self.meta.stats()?;
        let leader = self.meta.leader();
        let view = self.meta.view()?;
        let warnings = crate::lifecycle::warnings(&view, None, view.clock()?)?;
        Ok::<_, GatewayError>(pb::ClusterStatusReply {
            nodes,
            leader_id: leader.unwrap_or_default(),
            has_leader: leader.is_some(),
            term: self.meta.term(),
            last_applied: self.meta.last_applied(),
            packs: meta_stats.packs,
            packs_degraded: meta_stats.packs_needing_rebalance,
            k: self.config.code.data,
            m: self.config.code.parity,
            protection: Some(self.repairer.protection()?.into_wire()),
            repair: Some(self.repair_status()),
            orphan_shards,
            orphan_bytes,
            insecure: self.config.insecure,
            warnings,
            by_class,
            tiering_queue_packs: self
                .tiering()
                .queue_packs
                .load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Nodes, shards, bytes and packs per storage class, hot first.
    fn class_usage(
        &self,
        views: &[NodeView],
        stats: &[Option<pb::ShardStatsReply>],
    ) -> Result<Vec<pb::ClassUsage>, GatewayError> {
        let pack_classes = self.meta.pack_classes()?;
        let packs_total = self.meta.stats()?.packs;
        let cold_packs = pack_classes
            .values()
            .filter(|c| **c == StorageClass::Cold)
            .count() as u64;
        Ok(StorageClass::ALL
            .iter()
            .map(|class| {
                let mut usage = pb::ClassUsage {
                    storage_class: class.to_string(),
                    packs: match class {
                        StorageClass::Hot => packs_total.saturating_sub(cold_packs),
                        StorageClass::Cold => cold_packs,
                    },
                    ..Default::default()
                };
                for (view, stats) in views.iter().zip(stats) {
                    if view.storage_class != *class {
                        continue;
                    }
                    usage.nodes += 1;
                    if let Some(stats) = stats {
                        usage.shards += stats.shards;
                        usage.bytes += stats.bytes;
                    }
                }
                usage
            })
            .collect())
    }

    pub(super) async fn add_node_inner(
        &self,
        req: pb::AddNodeRequest,
    ) -> Result<pb::AddNodeReply, GatewayError> {
        check_name(&req.region, "region")?;
        let (id, info) = (
            req.node_id,
            NodeInfo {
                region: req.region,
                addr: req.addr,
            },
        );
        let plan = check_add(&self.meta.node_views(), id, &info)?;
        if plan == AddPlan::Join {
            self.must_answer_as(id, &info.addr).await?;
        }
        // Runs on the leader: `Meta::add_node` forwards the change there.
        self.meta.add_node(id, info.clone()).await?;
        tracing::info!(node_id = self.node_id, added = id, region = %info.region, addr = %info.addr, ?plan, "node added to the cluster");
        Ok(pb::AddNodeReply {})
    }
}

/// Most audit entries one AuditLog page returns.
pub const AUDIT_PAGE_MAX: usize = 1000;
/// Longest token label.
const LABEL_LEN_MAX: usize = 128;

fn token_to_wire(t: TokenRecord) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id,
        role: t.role.as_str().into(),
        tenant: t.tenant.unwrap_or_default(),
        created_unix_ms: t.created_unix_ms,
        expires_unix_ms: t.expires_unix_ms,
        revoked: t.revoked,
        label: t.label,
        created_by: t.created_by,
    }
}

/// The tenant a caller's token is bound to (`None`: cluster-wide, a node, or insecure).
fn bound_tenant(caller: &Caller) -> Option<&str> {
    match caller {
        Caller::Token {
            tenant: Some(t), ..
        } => Some(t),
        _ => None,
    }
}

impl Gateway {
    pub(super) async fn create_token_inner(
        &self,
        req: pb::CreateTokenRequest,
        caller: &Caller,
    ) -> Result<pb::CreateTokenReply, GatewayError> {
        let role: Role = req
            .role
            .parse()
            .map_err(|e: crate::auth::UnknownRole| super::invalid(e.to_string()))?;
        let tenant = may_create_token(caller, role, &req.tenant)?;
        match (role, &tenant) {
            (Role::ClusterAdmin, Some(_)) => {
                return Err(super::invalid(
                    "a cluster-admin token is cluster-wide: give no tenant",
                ));
            }
            (Role::Admin | Role::Backup | Role::Restore, None) => {
                return Err(super::invalid(format!("a {role} token needs a tenant")));
            }
            _ => {}
        }
        if let Some(tenant) = &tenant {
            check_name(tenant, "tenant")?;
        }
        if req.label.len() > LABEL_LEN_MAX || req.label.chars().any(char::is_control) {
            return Err(super::invalid(format!(
                "label must be at most {LABEL_LEN_MAX} printable characters"
            )));
        }
        let ttl_ms = req
            .ttl_seconds
            .checked_mul(1000)
            .filter(|ms| i64::try_from(*ms).is_ok())
            .ok_or_else(|| super::invalid("ttl too large"))?;
        let secret = crate::auth::token::generate();
        let key = token_key(&secret);
        let id = crate::meta::state::token_id(&key);
        let created_by = match caller {
            Caller::Token { id, .. } => id.clone(),
            _ => String::new(),
        };
        let target = format!(
            "token {id} ({role}{})",
            tenant
                .as_deref()
                .map(|t| format!(", tenant {t}"))
                .unwrap_or_default()
        );
        let cmd = Command::CreateToken {
            key,
            role,
            tenant,
            ttl_ms,
            label: req.label,
            created_by,
        };
        match self
            .write_audited(caller, "CreateToken", target, cmd)
            .await?
        {
            CommandResult::Ok => {}
            other => {
                return Err(GatewayError::Precondition {
                    what: format!("token not created: {}", other.audit_text()),
                });
            }
        }
        let record = self
            .meta
            .token(&key)?
            .ok_or_else(|| GatewayError::NotFound {
                what: format!("token {id} after its creation"),
            })?;
        Ok(pb::CreateTokenReply {
            info: Some(token_to_wire(record)),
            token: secret,
        })
    }

    pub(super) async fn list_tokens_inner(
        &self,
        caller: &Caller,
    ) -> Result<pb::ListTokensReply, GatewayError> {
        self.catch_up().await;
        let scope = bound_tenant(caller);
        let tokens = self
            .meta
            .tokens()?
            .into_iter()
            .filter(|t| scope.is_none() || t.tenant.as_deref() == scope)
            .map(token_to_wire)
            .collect();
        Ok(pb::ListTokensReply { tokens })
    }

    pub(super) async fn revoke_token_inner(
        &self,
        req: pb::RevokeTokenRequest,
        caller: &Caller,
    ) -> Result<pb::RevokeTokenReply, GatewayError> {
        if req.id.len() != 16 || !req.id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(super::invalid("token id must be 16 hex digits"));
        }
        let id = req.id.to_ascii_lowercase();
        let not_found = || GatewayError::NotFound {
            what: format!("token {id}"),
        };
        self.catch_up().await;
        let token = self
            .meta
            .tokens()?
            .into_iter()
            .find(|t| t.id == id)
            .ok_or_else(not_found)?;
        // An admin sees only its tenant's tokens: others are "not found".
        if let Some(own) = bound_tenant(caller)
            && token.tenant.as_deref() != Some(own)
        {
            return Err(not_found());
        }
        let cmd = Command::RevokeToken { id: id.clone() };
        match self
            .write_audited(caller, "RevokeToken", format!("token {id}"), cmd)
            .await?
        {
            CommandResult::UnknownToken => Err(not_found()),
            // Revoking twice leaves it revoked: done either way.
            _ => Ok(pb::RevokeTokenReply {}),
        }
    }

    pub(super) async fn audit_log_inner(
        &self,
        req: pb::AuditLogRequest,
    ) -> Result<pb::AuditLogReply, GatewayError> {
        self.catch_up().await;
        let limit = match req.limit as usize {
            0 => AUDIT_PAGE_MAX,
            n => n.min(AUDIT_PAGE_MAX),
        };
        let mut entries = self.meta.audit_entries(req.after_seq, limit + 1)?;
        let more = entries.len() > limit;
        entries.truncate(limit);
        let (head_seq, head_hash) = self.meta.audit_head()?;
        Ok(pb::AuditLogReply {
            entries: entries.iter().map(|e| e.to_wire()).collect(),
            more,
            head_seq,
            head_hash: head_hash.to_vec(),
        })
    }

    pub(super) fn who_am_i_inner(&self, caller: &Caller) -> Result<pb::WhoAmIReply, GatewayError> {
        Ok(match caller {
            Caller::Insecure => pb::WhoAmIReply {
                insecure: true,
                ..Default::default()
            },
            Caller::Node(id) => pb::WhoAmIReply {
                role: format!("node {id}"),
                ..Default::default()
            },
            Caller::Token { id, role, tenant } => pb::WhoAmIReply {
                insecure: false,
                token_id: id.clone(),
                role: role.as_str().into(),
                tenant: tenant.clone().unwrap_or_default(),
                expires_unix_ms: self
                    .meta
                    .tokens()?
                    .into_iter()
                    .find(|t| t.id == *id)
                    .map(|t| t.expires_unix_ms)
                    .unwrap_or_default(),
            },
        })
    }
}
