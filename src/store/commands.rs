//! Rollout commands on their way to the leader: a shared store's queue of
//! commands asked of an instance that does not lead (`apply`, `promote`,
//! `pause`, `resume`, `abort`, `retry`, `rollback`), each with who asked and
//! its full arguments, and the answer of the instance that executed it.
//!
//! A command is executed at most once: the leader takes it with a
//! conditional update (`pending` → `claimed`), and the instance that asked
//! may withdraw it only while it is still pending (`pending` →
//! `cancelled`); both cannot happen. An embedded store has one instance,
//! which always leads, so it holds no queue ([`Store::commands`] is `None`).
//!
//! [`Store::commands`]: super::Store::commands

use serde::{Deserialize, Serialize};

use super::StoreError;

/// The channel a PostgreSQL store announces commands on (`NOTIFY`, at
/// commit): a new one (for the leader), and an answered one (for the
/// instance that waits for it).
pub const COMMANDS_CHANNEL: &str = "ferry_commands";

/// A command as the instance that does not lead stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCommand {
    pub model: String,
    /// What to do with all its arguments, as JSON (the controller's type:
    /// the store keeps it as it is).
    pub request: serde_json::Value,
    /// Who asked ("control API on instance 1a2b…"), as events say it.
    pub who: String,
    /// The instance that asked (its id in the instances table).
    pub asked_by: String,
    /// How long after it is stored a leader may take it (by the database's
    /// clock); later it is never executed, even when the instance that
    /// asked is gone and cannot withdraw it.
    pub take_within: std::time::Duration,
}

/// Where a command is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    /// Waiting for the leader.
    Pending,
    /// Taken by an instance that leads, which executes it once.
    Claimed,
    /// Executed; the outcome says how it went.
    Done,
    /// Withdrawn by the instance that asked, before any leader took it:
    /// never executed.
    Cancelled,
}

crate::display_from_serde!(CommandState);

impl CommandState {
    /// The state as stored.
    pub fn parse(s: &str) -> Option<CommandState> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

/// The answer a command got where it was executed: exactly what that
/// instance would have answered its own client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOutcome {
    /// The HTTP status.
    pub status: u16,
    /// The JSON body, as its bytes were sent (a status, or `{"error": …}`).
    pub body: String,
    /// `Retry-After`, in seconds, when the answer had one.
    pub retry_after: Option<u32>,
}

/// A stored command.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRecord {
    pub id: i64,
    pub command: NewCommand,
    pub state: CommandState,
    /// When it was stored (ms since the epoch).
    pub created_ms: u64,
    /// The instance that took it, and its term as leader when the store
    /// counts terms.
    pub claimed_by: Option<String>,
    pub term: Option<i64>,
    /// Set once it was executed.
    pub outcome: Option<CommandOutcome>,
}

/// A shared store's queue of commands (see the module doc). Every method is
/// one statement or one transaction.
pub trait CommandQueue: Send + Sync {
    /// Stores a pending command and announces it; returns its id.
    fn submit_command(&self, command: &NewCommand) -> Result<i64, StoreError>;
    /// Takes the oldest pending command still within its `take_within`
    /// for `instance` (which leads, in `term` when the store counts terms):
    /// at most one instance ever takes a command, even when two believe
    /// they lead.
    fn claim_command(
        &self,
        instance: &str,
        term: Option<i64>,
    ) -> Result<Option<CommandRecord>, StoreError>;
    /// Records the outcome of a command this instance took, and announces it.
    fn finish_command(&self, id: i64, outcome: &CommandOutcome) -> Result<(), StoreError>;
    /// Withdraws a command no leader took yet; false when one did (or it is
    /// gone): then it is executed, or being executed.
    fn cancel_command(&self, id: i64) -> Result<bool, StoreError>;
    fn command(&self, id: i64) -> Result<Option<CommandRecord>, StoreError>;
    /// Marks pending commands past their `take_within` cancelled, and
    /// deletes commands stored before `before_ms` (ms since the epoch),
    /// whatever their state; returns how many were deleted.
    fn prune_commands(&self, before_ms: u64) -> Result<usize, StoreError>;
    /// A number that changes whenever a command is announced (stored or
    /// answered), heard on a connection of its own. A hint only: a look at
    /// the row is the truth.
    fn command_notices(&self) -> tokio::sync::watch::Receiver<i64>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_stored_by_their_serde_names_and_read_back() {
        for s in [
            CommandState::Pending,
            CommandState::Claimed,
            CommandState::Done,
            CommandState::Cancelled,
        ] {
            assert_eq!(CommandState::parse(&s.to_string()), Some(s));
        }
        assert_eq!(CommandState::Cancelled.to_string(), "cancelled");
        assert_eq!(CommandState::parse("lost"), None);
    }
}
