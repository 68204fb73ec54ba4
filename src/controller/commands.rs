//! Commands from any instance: `apply`, `promote`, `pause`, `resume`,
//! `abort`, `retry` and `rollback` asked of any instance are executed by the
//! one that drives the rollouts (the leader), with the code a local command
//! runs ([`Controller::execute`]).
//!
//! 1. **Here or at the leader.** [`Controller::submit`] executes a command
//!    itself when this instance leads (or the store has one instance:
//!    SQLite). Otherwise it stores the command with who asked and all its
//!    arguments (the validated spec for `apply`) in the store's queue
//!    ([`CommandQueue`]), which announces it.
//! 2. **The leader executes.** [`Controller::run_commands`] takes each
//!    pending command as soon as it is announced (and looks every
//!    [`CHECK_EVERY`], for a missed announcement), executes it, and stores
//!    the answer it would have given its own client: status and exact body
//!    ([`Answerer`], the control API's mapping, passed in).
//! 3. **The caller waits.** The asking instance waits for that answer
//!    (announcement, and a look every [`LOOK_EVERY`]) and returns it. When
//!    no leader took the command within the bound (`ferry serve
//!    --command-timeout`), it withdraws it — only while it is still
//!    pending, in one conditional update — and answers that nothing was
//!    done ([`ControlError::NoLeader`]); a command a leader took is waited
//!    for [`EXECUTING_BOUND`] more, then answered as possibly executed
//!    ([`ControlError::Unanswered`]), as is one whose answer cannot be read.
//!    The decision is [`next`], pure.
//! 4. **Pruning.** The leader deletes commands older than [`KEEP`] every
//!    [`PRUNE_EVERY`].
//!
//! Checks that need the server's own settings (`--allow-outbound`,
//! `--qa-dir`) run where the command is executed: on the leader.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::rollouts::{Applied, Status};
use super::{ControlError, Controller};
use crate::spec::RolloutSpec;
use crate::store::commands::{
    CommandOutcome, CommandQueue, CommandRecord, CommandState, NewCommand,
};
use crate::strategy::Command;
use crate::units::now_ms;

/// How often the leader looks for commands without being told.
pub const CHECK_EVERY: Duration = super::cluster::CHECK_EVERY;
/// How often the asking instance looks at its command without being told.
pub const LOOK_EVERY: Duration = Duration::from_millis(250);
/// How long the asking instance waits for a leader to take a command, by
/// default (`--command-timeout`).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);
/// How much longer it waits for the answer of a leader that took it (an
/// `apply` warms the candidate first).
pub const EXECUTING_BOUND: Duration = Duration::from_secs(60);
/// Commands are kept this long (for whoever looks at the table), then
/// deleted by the leader.
pub const KEEP: Duration = Duration::from_secs(3600);
/// How often the leader prunes.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// `Retry-After` when no leader took a command.
pub const RETRY_AFTER_SECS: u32 = 5;

/// A rollout command with all its arguments: what an instance that does not
/// lead stores, and what [`Controller::execute`] runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", content = "args", rename_all = "snake_case")]
pub enum Request {
    /// Start a rollout from a spec validated where it entered.
    Apply {
        spec: Box<RolloutSpec>,
    },
    Promote {
        full: bool,
    },
    Pause,
    Resume,
    Abort,
    Retry,
    Rollback {
        to: Option<String>,
    },
}

impl Request {
    /// What the command is, for messages: `pause of model "cancer"`.
    pub fn describe(&self, model: &str) -> String {
        let what = match self {
            Request::Apply { spec } => format!("apply of version \"{}\"", spec.version),
            Request::Promote { full: true } => "promote --full".into(),
            Request::Rollback { to: Some(v) } => format!("rollback to version \"{v}\""),
            other => {
                let value = serde_json::to_value(other).unwrap_or_default();
                value["command"].as_str().unwrap_or("command").to_string()
            }
        };
        format!("{what} of model \"{model}\"")
    }
}

/// What a command executed on this instance returns.
#[derive(Debug, Clone)]
pub enum Answer {
    /// `apply`: created or unchanged, and the status after it.
    Applied(Applied, Status),
    /// Every other command: the status after it.
    Status(Status),
}

/// The control API's answer to a command's result: its status and exact
/// body, what the leader stores and the asking instance sends on.
pub type Answerer = fn(Result<Answer, ControlError>) -> CommandOutcome;

/// A command's answer, and where it was executed when not here.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub outcome: CommandOutcome,
    pub executed_by: Option<ExecutedBy>,
}

/// The instance that executed a command stored by another.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutedBy {
    /// The command's id in the store.
    pub command: i64,
    pub instance: String,
    /// Its term as leader, when the store counts terms.
    pub term: Option<i64>,
}

impl std::fmt::Display for ExecutedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "instance {}", self.instance)?;
        if let Some(term) = self.term {
            write!(f, " (term {term})")?;
        }
        write!(f, ", command {}", self.command)
    }
}

/// What the asking instance does next about its stored command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing yet: wait for an announcement or the next look.
    Wait,
    /// No leader took it within the bound: withdraw it (if still pending).
    Withdraw,
    /// Executed: send its answer on.
    Answer,
    /// Withdrawn: it will never be executed.
    NoLeader,
    /// A leader took it and has not answered within the bound.
    Silent,
}

/// The asking instance's decision about a command in `state`, `waited`
/// after it was stored, with `wait` the bound for a leader to take it.
pub fn next(state: CommandState, waited: Duration, wait: Duration) -> Next {
    match state {
        CommandState::Done => Next::Answer,
        CommandState::Cancelled => Next::NoLeader,
        CommandState::Pending if waited >= wait => Next::Withdraw,
        CommandState::Claimed if waited >= wait + EXECUTING_BOUND => Next::Silent,
        CommandState::Pending | CommandState::Claimed => Next::Wait,
    }
}

impl Controller {
    /// Runs a command where it must run: here when this instance leads the
    /// rollouts (or is the only one), else at the leader, waiting for its
    /// answer (see the module doc). `answer` is the control API's mapping.
    pub async fn submit(
        &self,
        model: &str,
        request: Request,
        who: &str,
        answer: Answerer,
    ) -> Result<Reply, ControlError> {
        let store = self.registry.store().clone();
        let queue = match store.commands() {
            Some(queue) if !store.drives_rollouts()? => queue,
            _ => {
                return Ok(Reply {
                    outcome: answer(self.execute(model, request, who).await),
                    executed_by: None,
                });
            }
        };
        let me = self.me.get().map_or("unknown", |m| m.id.as_str());
        let what = request.describe(model);
        let command = NewCommand {
            model: model.to_string(),
            request: serde_json::to_value(&request).expect("requests always serialise"),
            who: format!("{who} on instance {me}"),
            asked_by: me.to_string(),
            take_within: self.command_wait,
        };
        let heard = queue.command_notices();
        let id = queue.submit_command(&command)?;
        self.wait_for(queue, heard, id, what).await
    }

    /// Waits for the answer to command `id`, stored for the leader: sends
    /// it on, or withdraws the command when no leader took it in time (see
    /// the module doc). Once stored, a command whose fate cannot be read is
    /// answered as possibly executed, never as not done.
    async fn wait_for(
        &self,
        queue: &dyn CommandQueue,
        mut heard: tokio::sync::watch::Receiver<i64>,
        id: i64,
        what: String,
    ) -> Result<Reply, ControlError> {
        let asked = Instant::now();
        let unanswered = |why: String| ControlError::Unanswered {
            command: what.clone(),
            why,
        };
        loop {
            let record = match queue.command(id) {
                Ok(Some(record)) => record,
                Ok(None) => return Err(unanswered(format!("command {id} is no longer stored"))),
                Err(e) => return Err(unanswered(format!("its answer could not be read: {e}"))),
            };
            match next(record.state, asked.elapsed(), self.command_wait) {
                Next::Wait => {}
                Next::Answer => return Ok(executed(record)),
                Next::Withdraw => match queue.cancel_command(id) {
                    Ok(true) => return Err(self.no_leader(what)),
                    Ok(false) => continue, // taken meanwhile: wait for its answer
                    Err(e) => {
                        return Err(unanswered(format!("it could not be withdrawn: {e}")));
                    }
                },
                Next::NoLeader => return Err(self.no_leader(what)),
                Next::Silent => {
                    let waited = Duration::from_secs(asked.elapsed().as_secs());
                    return Err(unanswered(format!(
                        "the leader (instance {}) took it and had not answered after {}",
                        record.claimed_by.unwrap_or_default(),
                        crate::units::HumanDuration(waited)
                    )));
                }
            }
            if let Ok(Err(_)) = tokio::time::timeout(LOOK_EVERY, heard.changed()).await {
                tokio::time::sleep(LOOK_EVERY).await; // nobody announces any more
            }
        }
    }

    fn no_leader(&self, command: String) -> ControlError {
        ControlError::NoLeader {
            command,
            waited: self.command_wait,
        }
    }

    /// Executes a command on this instance: the one code path, whether it
    /// was asked here or of another instance.
    pub async fn execute(
        &self,
        model: &str,
        request: Request,
        who: &str,
    ) -> Result<Answer, ControlError> {
        let status = |command| self.command(model, command, who);
        match request {
            Request::Apply { spec } => self
                .apply_rollout(*spec, who)
                .await
                .map(|(applied, status)| Answer::Applied(applied, status)),
            Request::Promote { full } => {
                status(Command::Promote { full }).await.map(Answer::Status)
            }
            Request::Pause => status(Command::Pause).await.map(Answer::Status),
            Request::Resume => status(Command::Resume).await.map(Answer::Status),
            Request::Abort => status(Command::Abort).await.map(Answer::Status),
            Request::Retry => self.retry(model, who).await.map(Answer::Status),
            Request::Rollback { to } => self
                .rollback(model, to.as_deref(), who)
                .await
                .map(Answer::Status),
        }
    }

    /// Executes the commands other instances store, while this instance
    /// leads, until the process ends (see the module doc). An embedded
    /// store has no queue: nothing to do.
    pub async fn run_commands(self: Arc<Self>, answer: Answerer) {
        let store = self.registry.store().clone();
        let Some(queue) = store.commands() else {
            return;
        };
        let mut heard = queue.command_notices();
        let mut pruned: Option<Instant> = None;
        let mut failing = false;
        loop {
            if let Ok(Err(_)) = tokio::time::timeout(CHECK_EVERY, heard.changed()).await {
                tokio::time::sleep(CHECK_EVERY).await; // nobody announces any more
            }
            if !self.is_ready() || !matches!(store.drives_rollouts(), Ok(true)) {
                continue;
            }
            if pruned.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                let before = now_ms().saturating_sub(KEEP.as_millis() as u64);
                match queue.prune_commands(before) {
                    Ok(n) if n > 0 => tracing::debug!("pruned {n} commands older than {KEEP:?}"),
                    Ok(_) => {}
                    Err(e) => tracing::debug!("cannot prune old commands: {e}"),
                }
                pruned = Some(Instant::now());
            }
            let me = self
                .me
                .get()
                .map_or("unknown", |m| m.id.as_str())
                .to_string();
            loop {
                match queue.claim_command(&me, store.leading()) {
                    Ok(Some(command)) => self.execute_stored(queue, command, answer).await,
                    Ok(None) => break,
                    Err(e) => {
                        if !failing {
                            tracing::warn!(
                                "cannot take the commands other instances store: {e}; trying again every {CHECK_EVERY:?}"
                            );
                        }
                        failing = true;
                        break;
                    }
                }
                failing = false;
            }
        }
    }

    /// Executes a command this instance took, and stores its answer.
    async fn execute_stored(
        &self,
        queue: &dyn CommandQueue,
        stored: CommandRecord,
        answer: Answerer,
    ) {
        let c = &stored.command;
        let result = match serde_json::from_value::<Request>(c.request.clone()) {
            Ok(request) => self.execute(&c.model, request, &c.who).await,
            Err(e) => Err(ControlError::Invalid(format!(
                "the leader (Ferry {}) cannot read command {}: {e}; run the same Ferry version on every instance",
                env!("CARGO_PKG_VERSION"),
                stored.id
            ))),
        };
        let outcome = answer(result);
        tracing::info!(
            command = stored.id,
            model = %c.model,
            "executed a command asked of instance {}: {}",
            c.asked_by,
            outcome.status
        );
        if let Err(e) = queue.finish_command(stored.id, &outcome) {
            tracing::warn!(
                "executed command {} but cannot store its answer: {e}; the instance that asked answers that it may have been executed",
                stored.id
            );
        }
    }
}

/// The reply to a command another instance executed.
fn executed(record: CommandRecord) -> Reply {
    Reply {
        executed_by: Some(ExecutedBy {
            command: record.id,
            instance: record.claimed_by.unwrap_or_default(),
            term: record.term,
        }),
        outcome: record.outcome.unwrap_or(CommandOutcome {
            status: 500,
            body: r#"{"error":"the leader stored no answer"}"#.into(),
            retry_after: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn a_pending_command_is_withdrawn_at_the_bound_and_a_taken_one_waited_for() {
        let s = Duration::from_secs;
        assert_eq!(next(CommandState::Pending, s(0), WAIT), Next::Wait);
        assert_eq!(next(CommandState::Pending, s(9), WAIT), Next::Wait);
        assert_eq!(next(CommandState::Pending, s(10), WAIT), Next::Withdraw);
        // Taken before the bound, or after it but before the withdrawal:
        // its answer is waited for, bounded.
        assert_eq!(next(CommandState::Claimed, s(11), WAIT), Next::Wait);
        assert_eq!(
            next(CommandState::Claimed, WAIT + EXECUTING_BOUND, WAIT),
            Next::Silent
        );
        assert_eq!(next(CommandState::Done, s(0), WAIT), Next::Answer);
        assert_eq!(next(CommandState::Done, s(500), WAIT), Next::Answer);
        assert_eq!(next(CommandState::Cancelled, s(10), WAIT), Next::NoLeader);
    }

    #[test]
    fn requests_round_trip_through_their_stored_form_and_say_what_they_are() {
        let spec = RolloutSpec::from_yaml(
            "model: cancer\nversion: \"2\"\nstrategy:\n  canary:\n    steps: [{weight: 10}]\n",
        )
        .unwrap();
        let requests = [
            Request::Apply {
                spec: Box::new(spec),
            },
            Request::Promote { full: true },
            Request::Pause,
            Request::Resume,
            Request::Abort,
            Request::Retry,
            Request::Rollback {
                to: Some("1".into()),
            },
            Request::Rollback { to: None },
        ];
        for r in requests {
            let stored = serde_json::to_value(&r).unwrap();
            assert_eq!(serde_json::from_value::<Request>(stored).unwrap(), r);
        }
        assert_eq!(
            serde_json::to_value(Request::Pause).unwrap(),
            serde_json::json!({"command": "pause"})
        );
        assert_eq!(
            Request::Pause.describe("cancer"),
            "pause of model \"cancer\""
        );
        assert_eq!(
            Request::Promote { full: true }.describe("m"),
            "promote --full of model \"m\""
        );
        assert_eq!(
            Request::Rollback {
                to: Some("1".into())
            }
            .describe("m"),
            "rollback to version \"1\" of model \"m\""
        );
    }
}
