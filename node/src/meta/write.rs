//! Writes to the metadata group: [`Meta::write`] proposes a command on the
//! leader (locally, or forwarded over the `Forward` RPC) and returns once it
//! is applied on this node too; the retry loop against the current leader
//! that reads share; waiting for a local apply.

use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::metrics::WaitError;
use openraft::raft::ClientWriteResponse;

use super::error::fatal;
use super::network::{CallError, Rpc};
use super::types::{Command, CommandResult, NodeId, NodeInfo, TypeConfig};
use super::{Meta, MetaError};

/// Answer of a forwarded command, as the leader's `Raft::client_write` gave it.
type ForwardAnswer =
    Result<ClientWriteResponse<TypeConfig>, RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>>;

/// This node's wall clock, Unix ms: what a leader stamps on the commands it
/// proposes ([`Command::stamp`]); the state machine keeps the applied time
/// monotonic across leaders.
pub fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// One try of an operation against the leader.
pub(super) enum Attempt<T> {
    Done(T),
    /// Not applied anywhere; safe to try again after a pause.
    Retry,
}

impl Meta {
    /// Proposes a command on the leader (locally, or forwarded over the
    /// `Forward` RPC), retrying while there is no leader, for at most
    /// [`MetaConfig::op_timeout`](crate::meta::MetaConfig::op_timeout). Returns only once the command is applied
    /// on this node too (read-your-writes on the proposing node).
    ///
    /// A call that fails with [`MetaError::Unavailable`] may have been
    /// applied; commands are idempotent (`AlreadyExists` on a repeat).
    pub async fn write(&self, cmd: Command) -> Result<CommandResult, MetaError> {
        self.retrying(|leader, deadline| {
            let mut cmd = cmd.clone();
            async move {
                if leader == self.inner.node_id {
                    cmd.stamp(wall_clock_ms());
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    let proposed =
                        tokio::time::timeout(remaining, self.inner.raft.client_write(cmd)).await;
                    let Ok(answer) = proposed else {
                        return Err(MetaError::Unconfirmed {
                            waited_ms: remaining.as_millis() as u64,
                        });
                    };
                    return match answer {
                        // openraft answers as soon as the state machine has
                        // applied the entry, before its metrics say so: wait
                        // for them too, so `last_applied()` (and every
                        // metrics-based wait) covers this write on return.
                        Ok(response) => {
                            self.wait_applied(response.log_id.index, deadline).await?;
                            Ok(Attempt::Done(response.data))
                        }
                        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                            Ok(Attempt::Retry)
                        }
                        Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                            source,
                        ))) => Err(MetaError::Membership { source }),
                        Err(RaftError::Fatal(f)) => Err(fatal(f)),
                    };
                }
                let Some(addr) = self.address_of(leader) else {
                    return Ok(Attempt::Retry);
                };
                let timeout = self.call_timeout(deadline);
                let answer: Result<ForwardAnswer, CallError> = self
                    .inner
                    .channels
                    .call(leader, &addr, Rpc::Forward, &cmd, timeout)
                    .await;
                match answer {
                    Ok(Ok(response)) => {
                        self.wait_applied(response.log_id.index, deadline).await?;
                        Ok(Attempt::Done(response.data))
                    }
                    // Leadership moved, or the leader is stopping: not applied.
                    Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                        Ok(Attempt::Retry)
                    }
                    Ok(Err(RaftError::Fatal(_))) => Ok(Attempt::Retry),
                    Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                        source,
                    )))) => Err(MetaError::Membership { source }),
                    Err(e) if e.not_delivered() => Ok(Attempt::Retry),
                    Err(source) => Err(MetaError::Unavailable { leader, source }),
                }
            }
        })
        .await
    }

    /// Runs `attempt` against the current leader until it is done, an error
    /// is final, or [`MetaConfig::op_timeout`](crate::meta::MetaConfig::op_timeout) has passed.
    pub(super) async fn retrying<T, F, Fut>(&self, mut attempt: F) -> Result<T, MetaError>
    where
        F: FnMut(NodeId, Instant) -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>, MetaError>>,
    {
        let started = Instant::now();
        let deadline = started + self.inner.config.op_timeout();
        let pause = Duration::from_millis(self.inner.config.heartbeat_ms.max(10));
        loop {
            if *self.inner.stop.borrow() {
                return Err(MetaError::ShuttingDown);
            }
            let no_leader = || MetaError::NoLeader {
                waited_ms: started.elapsed().as_millis() as u64,
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(no_leader());
            }
            let leader = match self
                .inner
                .raft
                .wait(Some(remaining))
                .metrics(|m| m.current_leader.is_some(), "a metadata leader is known")
                .await
            {
                Ok(metrics) => metrics
                    .current_leader
                    .expect("the wait condition ensures a leader"),
                Err(WaitError::Timeout(..)) => return Err(no_leader()),
                Err(WaitError::ShuttingDown) => return Err(MetaError::ShuttingDown),
            };
            match attempt(leader, deadline).await? {
                Attempt::Done(value) => return Ok(value),
                Attempt::Retry => {
                    // Back off a heartbeat: a new leader shows up in the
                    // metrics within an election; hammering does not help.
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    tokio::time::sleep(pause.min(remaining)).await;
                }
            }
        }
    }

    pub(super) fn call_timeout(&self, deadline: Instant) -> Duration {
        let remaining = deadline.saturating_duration_since(Instant::now());
        Duration::from_millis(self.inner.config.rpc_timeout_ms)
            .min(remaining)
            .max(Duration::from_millis(1))
    }

    /// Waits until the local state machine has applied `index`.
    pub(super) async fn wait_applied(
        &self,
        index: u64,
        deadline: Instant,
    ) -> Result<(), MetaError> {
        let started = Instant::now();
        let remaining = deadline
            .saturating_duration_since(started)
            .max(Duration::from_millis(1));
        match self
            .inner
            .raft
            .wait(Some(remaining))
            .applied_index_at_least(Some(index), "a committed entry is applied locally")
            .await
        {
            Ok(_) => Ok(()),
            Err(WaitError::ShuttingDown) => Err(MetaError::ShuttingDown),
            Err(WaitError::Timeout(..)) => Err(MetaError::ApplyLagging {
                index,
                applied: self.last_applied_index(),
                waited_ms: started.elapsed().as_millis() as u64,
            }),
        }
    }

    pub(super) fn address_of(&self, node: NodeId) -> Option<String> {
        let metrics = self.inner.raft.metrics();
        let metrics = metrics.borrow();
        metrics
            .membership_config
            .membership()
            .get_node(&node)
            .map(|info| info.addr.clone())
    }
}
