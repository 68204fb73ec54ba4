//! The queue of rollout commands on PostgreSQL ([`CommandQueue`]): the
//! `commands` table, announced with `NOTIFY ferry_commands` (`"<id> new"`
//! when one is stored, `"<id> done"` when it is answered) at commit, and
//! heard on one connection of the instance's own ([`cluster::listen`]).
//!
//! Taking a command is one `UPDATE … WHERE state = 'pending'` over a row
//! picked with `FOR UPDATE SKIP LOCKED`, and withdrawing one is the same
//! conditional update to `cancelled`: PostgreSQL's row lock lets exactly
//! one of them happen. These writes touch nothing else, so they do not take
//! the store's write lock.

use tokio_postgres::Row;

use super::cluster::{self, Channel};
use super::{PostgresStore, Result2, corrupt, to_json};
use crate::store::StoreError;
use crate::store::commands::{
    COMMANDS_CHANNEL, CommandOutcome, CommandQueue, CommandRecord, CommandState, NewCommand,
};

/// The migration that adds the table.
pub(super) const MIGRATION: &str = r#"
CREATE TABLE commands (
    id          BIGSERIAL PRIMARY KEY,
    model       TEXT NOT NULL,
    request     TEXT NOT NULL,
    who         TEXT NOT NULL,
    asked_by    TEXT NOT NULL,
    state       TEXT NOT NULL,
    created_ms  BIGINT NOT NULL,
    deadline_ms BIGINT NOT NULL,
    claimed_by  TEXT,
    term        BIGINT,
    claimed_ms  BIGINT,
    outcome     TEXT
);
CREATE INDEX commands_pending ON commands(id) WHERE state = 'pending';
CREATE INDEX commands_by_age ON commands(created_ms);
"#;

/// Commands stored or answered: every announcement moves the count on, so
/// whoever waits looks at its rows again.
static COMMANDS: Channel = Channel {
    name: COMMANDS_CHANNEL,
    what: "commands",
    latest: "SELECT 0::BIGINT",
    fold: |count, _| {
        *count += 1;
        true
    },
};

const COLUMNS: &str = "id, model, request, who, asked_by, state, created_ms, claimed_by, term, outcome, deadline_ms - created_ms";

/// The database's clock in ms since the epoch: deadlines are set and read
/// by one clock, whichever instance's clock is off.
const NOW_MS: &str = "(EXTRACT(EPOCH FROM statement_timestamp()) * 1000)::BIGINT";

fn command_row(r: &Row) -> Result2<CommandRecord> {
    let request: String = r.try_get(2)?;
    let state: String = r.try_get(5)?;
    let outcome: Option<String> = r.try_get(9)?;
    Ok(CommandRecord {
        id: r.try_get(0)?,
        command: NewCommand {
            model: r.try_get(1)?,
            request: serde_json::from_str(&request).map_err(|e| corrupt("a command", e))?,
            who: r.try_get(3)?,
            asked_by: r.try_get(4)?,
            take_within: std::time::Duration::from_millis(r.try_get::<_, i64>(10)?.max(0) as u64),
        },
        state: CommandState::parse(&state)
            .ok_or_else(|| corrupt("a command's state", format!("unknown state {state:?}")))?,
        created_ms: r.try_get::<_, i64>(6)?.max(0) as u64,
        claimed_by: r.try_get(7)?,
        term: r.try_get(8)?,
        outcome: outcome
            .map(|o| serde_json::from_str(&o))
            .transpose()
            .map_err(|e| corrupt("a command's outcome", e))?,
    })
}

impl CommandQueue for PostgresStore {
    fn submit_command(&self, command: &NewCommand) -> Result<i64, StoreError> {
        let c = command.clone();
        self.run(move |db| async move {
            let mut client = db.client().await?;
            let tx = client.transaction().await?;
            let sql = format!(
                "INSERT INTO commands (model, request, who, asked_by, state, created_ms, deadline_ms)
                 VALUES ($1, $2, $3, $4, $5, {NOW_MS}, {NOW_MS} + $6) RETURNING id"
            );
            let id: i64 = tx
                .query_one(
                    &sql,
                    &[
                        &c.model,
                        &to_json(&c.request),
                        &c.who,
                        &c.asked_by,
                        &CommandState::Pending.to_string(),
                        &(c.take_within.as_millis() as i64),
                    ],
                )
                .await?
                .try_get(0)?;
            announce(&tx, id, "new").await?;
            tx.commit().await?;
            Ok(id)
        })
    }

    fn claim_command(
        &self,
        instance: &str,
        term: Option<i64>,
    ) -> Result<Option<CommandRecord>, StoreError> {
        let instance = instance.to_string();
        self.run(move |db| async move {
            let client = db.client().await?;
            let sql = format!(
                "UPDATE commands SET state = 'claimed', claimed_by = $1, term = $2, claimed_ms = {NOW_MS}
                 WHERE state = 'pending' AND id = (
                   SELECT id FROM commands WHERE state = 'pending' AND deadline_ms > {NOW_MS}
                   ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
                 RETURNING {COLUMNS}"
            );
            let row = client
                .query_opt(&sql, &[&instance, &term])
                .await?;
            row.as_ref().map(command_row).transpose()
        })
    }

    fn finish_command(&self, id: i64, outcome: &CommandOutcome) -> Result<(), StoreError> {
        let outcome = to_json(outcome);
        self.run(move |db| async move {
            let mut client = db.client().await?;
            let tx = client.transaction().await?;
            tx.execute(
                "UPDATE commands SET state = 'done', outcome = $2 WHERE id = $1 AND state = 'claimed'",
                &[&id, &outcome],
            )
            .await?;
            announce(&tx, id, "done").await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn cancel_command(&self, id: i64) -> Result<bool, StoreError> {
        self.run(move |db| async move {
            let client = db.client().await?;
            let n = client
                .execute(
                    "UPDATE commands SET state = 'cancelled' WHERE id = $1 AND state = 'pending'",
                    &[&id],
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn command(&self, id: i64) -> Result<Option<CommandRecord>, StoreError> {
        self.run(move |db| async move {
            let client = db.client().await?;
            let sql = format!("SELECT {COLUMNS} FROM commands WHERE id = $1");
            let row = client.query_opt(&sql, &[&id]).await?;
            row.as_ref().map(command_row).transpose()
        })
    }

    fn prune_commands(&self, before_ms: u64) -> Result<usize, StoreError> {
        self.run(move |db| async move {
            let client = db.client().await?;
            let expire = format!(
                "UPDATE commands SET state = 'cancelled' WHERE state = 'pending' AND deadline_ms <= {NOW_MS}"
            );
            client.execute(&expire, &[]).await?;
            let n = client
                .execute(
                    "DELETE FROM commands WHERE created_ms < $1",
                    &[&(before_ms as i64)],
                )
                .await?;
            Ok(n as usize)
        })
    }

    fn command_notices(&self) -> tokio::sync::watch::Receiver<i64> {
        self.command_notices
            .get_or_init(|| {
                let (tx, rx) = tokio::sync::watch::channel(0);
                if let Some(runtime) = self.runtime.as_ref() {
                    runtime.spawn(cluster::listen(
                        self.config.clone(),
                        self.connector.clone(),
                        self.shown.clone(),
                        &COMMANDS,
                        tx,
                    ));
                }
                rx
            })
            .clone()
    }
}

/// Announces, at commit, that command `id` was stored (`new`) or answered
/// (`done`).
async fn announce(tx: &tokio_postgres::Transaction<'_>, id: i64, what: &str) -> Result2<()> {
    let payload = format!("{id} {what}");
    tx.execute("SELECT pg_notify($1, $2)", &[&COMMANDS_CHANNEL, &payload])
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::testpg;

    fn asked(model: &str) -> NewCommand {
        NewCommand {
            model: model.into(),
            request: serde_json::json!({"command": "pause"}),
            who: "control API on instance b".into(),
            asked_by: "b".into(),
            take_within: Duration::from_secs(60),
        }
    }

    fn outcome() -> CommandOutcome {
        CommandOutcome {
            status: 409,
            body: r#"{"error":"already paused"}"#.into(),
            retry_after: None,
        }
    }

    #[test]
    fn a_command_is_taken_once_and_answered_or_withdrawn_never_both() {
        let url = testpg::database();
        let a = PostgresStore::open(&url).unwrap();
        let b = PostgresStore::open(&url).unwrap();
        let mut heard = b.command_notices();
        let first = b.submit_command(&asked("cancer")).unwrap();
        let second = b.submit_command(&asked("iris")).unwrap();

        // Two instances that both believe they lead take different commands,
        // oldest first; a third look finds none.
        let took = a.claim_command("a", Some(7)).unwrap().unwrap();
        assert_eq!((took.id, took.state), (first, CommandState::Claimed));
        assert_eq!(took.command, asked("cancer"));
        assert_eq!(
            (took.claimed_by.as_deref(), took.term),
            (Some("a"), Some(7))
        );
        let other = b.claim_command("b", None).unwrap().unwrap();
        assert_eq!(other.id, second);
        assert!(a.claim_command("a", Some(7)).unwrap().is_none());

        // Taken: it cannot be withdrawn; its outcome is stored and announced.
        assert!(!b.cancel_command(first).unwrap());
        let before = *heard.borrow_and_update();
        a.finish_command(first, &outcome()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), heard.changed())
                .await
                .expect("the answer is announced")
                .unwrap();
        });
        assert_ne!(*heard.borrow(), before);
        let done = b.command(first).unwrap().unwrap();
        assert_eq!(
            (done.state, done.outcome),
            (CommandState::Done, Some(outcome()))
        );

        // Withdrawn while pending: no leader ever takes it, and a late
        // answer does not overwrite the withdrawal.
        let third = b.submit_command(&asked("cancer")).unwrap();
        assert!(b.cancel_command(third).unwrap());
        assert!(!b.cancel_command(third).unwrap(), "withdrawn once");
        assert!(a.claim_command("a", Some(7)).unwrap().is_none());
        a.finish_command(third, &outcome()).unwrap();
        let cancelled = b.command(third).unwrap().unwrap();
        assert_eq!(
            (cancelled.state, cancelled.outcome),
            (CommandState::Cancelled, None)
        );

        // Past its time to be taken (the instance that asked is gone and
        // never withdrew it): never taken, and marked cancelled.
        let late = b
            .submit_command(&NewCommand {
                take_within: Duration::ZERO,
                ..asked("cancer")
            })
            .unwrap();
        assert!(a.claim_command("a", Some(7)).unwrap().is_none());
        assert_eq!(a.prune_commands(0).unwrap(), 0);
        let expired = a.command(late).unwrap().unwrap();
        assert_eq!(expired.state, CommandState::Cancelled);

        // Pruned by age, whatever their state.
        let now = crate::units::now_ms();
        assert_eq!(a.prune_commands(now + 60_000).unwrap(), 4);
        assert!(a.command(first).unwrap().is_none());
    }
}
