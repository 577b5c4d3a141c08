//! The linearizable read barrier ([`Meta::read_barrier`], ReadIndex):
//! on the leader a quorum round, on a follower a read index asked of the
//! leader and a wait for the local apply.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use openraft::LogId;
use openraft::error::{CheckIsLeaderError, RaftError};

use super::error::fatal;
use super::network::{CallError, Rpc};
use super::types::{NodeId, NodeInfo};
use super::write::Attempt;
use super::{Meta, MetaError};

/// Answer of a read-index call.
type ReadIndexAnswer =
    Result<Option<LogId<NodeId>>, RaftError<NodeId, CheckIsLeaderError<NodeId, NodeInfo>>>;

impl Meta {
    /// Linearizable read barrier: when it returns `Ok`, the local state
    /// includes every write committed before the call (leader: a quorum
    /// round; follower: a read index from the leader, then a wait for the
    /// local apply).
    pub async fn read_barrier(&self) -> Result<(), MetaError> {
        let started = Instant::now();
        // Shared with each attempt's future; the future must stay `Send`.
        let last_failure: Mutex<Option<(NodeId, CallError)>> = Mutex::new(None);
        let quorum_missing = AtomicBool::new(false);
        let result = self
            .retrying(|leader, deadline| {
                let last_failure = &last_failure;
                let quorum_missing = &quorum_missing;
                async move {
                    if leader == self.inner.node_id {
                        let remaining = deadline.saturating_duration_since(Instant::now());
                        return match tokio::time::timeout(
                            remaining,
                            self.inner.raft.ensure_linearizable(),
                        )
                        .await
                        {
                            Err(_elapsed) => Ok(Attempt::Retry),
                            Ok(Ok(_)) => Ok(Attempt::Done(())),
                            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(
                                _,
                            )))) => Ok(Attempt::Retry),
                            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(
                                _,
                            )))) => {
                                quorum_missing.store(true, Ordering::Relaxed);
                                Ok(Attempt::Retry)
                            }
                            Ok(Err(RaftError::Fatal(f))) => Err(fatal(f)),
                        };
                    }
                    let Some(addr) = self.address_of(leader) else {
                        return Ok(Attempt::Retry);
                    };
                    let timeout = self.call_timeout(deadline);
                    let answer: Result<ReadIndexAnswer, CallError> = self
                        .inner
                        .channels
                        .call(leader, &addr, Rpc::ReadIndex, &(), timeout)
                        .await;
                    match answer {
                        Ok(Ok(read_log_id)) => {
                            if let Some(log_id) = read_log_id {
                                self.wait_applied(log_id.index, deadline).await?;
                            }
                            Ok(Attempt::Done(()))
                        }
                        Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => {
                            quorum_missing.store(true, Ordering::Relaxed);
                            Ok(Attempt::Retry)
                        }
                        Ok(Err(_)) => Ok(Attempt::Retry),
                        // A read changes nothing: any failure may be retried.
                        Err(e) => {
                            *last_failure.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some((leader, e));
                            Ok(Attempt::Retry)
                        }
                    }
                }
            })
            .await;
        let waited_ms = started.elapsed().as_millis() as u64;
        let last_failure = last_failure.into_inner().unwrap_or_else(|p| p.into_inner());
        match (result, last_failure) {
            (Err(MetaError::NoLeader { .. }), _) if quorum_missing.load(Ordering::Relaxed) => {
                Err(MetaError::NoQuorum { waited_ms })
            }
            (Err(MetaError::NoLeader { .. }), Some((leader, source))) => {
                Err(MetaError::Unavailable { leader, source })
            }
            (other, _) => other,
        }
    }
}
