//! The leader's lease on PostgreSQL: one row (`leader_lease`) with its
//! holder, term, when it was taken and when it expires, both computed with
//! the database's clock (`now()`). [`campaign`] renews it (or tries to
//! take it) every `renew` on a connection of its own, so a busy pool never
//! delays a renewal; [`check`] is the fencing every rollout write runs in
//! its own transaction. The decisions are [`crate::store::lease`]'s.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio_postgres::{Client, GenericClient, Transaction};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::Result2;
use super::failure::Failure;
use crate::store::StoreError;
use crate::store::lease::{Campaign, Change, Fence, Leader, LeaseSettings, Term};

/// The migration that adds the lease: free (expired) from the start.
pub(super) const MIGRATION: &str = r#"
CREATE TABLE leader_lease (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    holder       TEXT,
    term         BIGINT NOT NULL,
    acquired_at  TIMESTAMPTZ,
    expires_at   TIMESTAMPTZ NOT NULL
);
INSERT INTO leader_lease (id, holder, term, acquired_at, expires_at)
VALUES (1, NULL, 0, NULL, '-infinity');
"#;

/// Takes the lease when it is free or expired (term + 1), or renews it when
/// `instance` holds it in `held`; `Some(term)` when `instance` holds it
/// then, `None` when another does. One statement: two instances taking an
/// expired lease at once are ordered by the row lock, and the second finds
/// it taken.
pub(super) async fn take_or_renew(
    client: &impl GenericClient,
    instance: &str,
    held: Option<Term>,
    settings: LeaseSettings,
) -> Result2<Option<Term>> {
    let row = client
        .query_opt(
            "UPDATE leader_lease SET
               term = CASE WHEN holder = $1 AND term = $2 AND expires_at > now()
                           THEN term ELSE term + 1 END,
               acquired_at = CASE WHEN holder = $1 AND term = $2 AND expires_at > now()
                                  THEN acquired_at ELSE now() END,
               holder = $1,
               expires_at = now() + make_interval(secs => $3)
             WHERE id = 1 AND (expires_at <= now() OR (holder = $1 AND term = $2))
             RETURNING term",
            &[
                &instance,
                &held.unwrap_or(-1),
                &settings.lease.as_secs_f64(),
            ],
        )
        .await?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}

/// Ends this instance's lease of `term` now (a graceful stop), so another
/// instance takes it at its next renewal instead of after the lease.
pub(super) async fn resign(client: &impl GenericClient, instance: &str, term: Term) -> Result2<()> {
    client
        .execute(
            "UPDATE leader_lease SET expires_at = now()
             WHERE id = 1 AND holder = $1 AND term = $2 AND expires_at > now()",
            &[&instance, &term],
        )
        .await?;
    Ok(())
}

/// Fencing, in a rollout write's transaction: a leader's write whose term
/// is older than the lease's is refused. `FOR SHARE` holds the row until
/// the write commits, so a takeover (an `UPDATE` of the row) waits for the
/// writes of the term it ends: once a new leader holds the lease, every
/// write of an older term is either committed (and the new leader reads
/// it) or refused.
pub(super) async fn check(tx: &Transaction<'_>, fence: Fence) -> Result2<()> {
    let Fence::Term(mine) = fence else {
        return Ok(());
    };
    let row = tx
        .query_one(
            "SELECT term, COALESCE(holder, '') FROM leader_lease WHERE id = 1 FOR SHARE",
            &[],
        )
        .await?;
    let term: Term = row.try_get(0)?;
    if fence.refused_at(term) {
        return Err(Failure::Store(StoreError::Fenced {
            term: mine,
            newer: term,
            holder: row.try_get(1)?,
        }));
    }
    Ok(())
}

/// The lease as stored (`None` before any instance took it).
pub(super) async fn leader(client: &impl GenericClient) -> Result2<Option<Leader>> {
    let row = client
        .query_opt(
            "SELECT holder, term,
                    to_char(acquired_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                    expires_at > now()
             FROM leader_lease WHERE id = 1 AND holder IS NOT NULL",
            &[],
        )
        .await?;
    row.map(|r| {
        Ok(Leader {
            instance: r.try_get(0)?,
            term: r.try_get(1)?,
            since: r.try_get(2)?,
            valid: r.try_get(3)?,
        })
    })
    .transpose()
}

/// Renews (or tries to take) the lease every `settings.renew` as
/// `instance`, until the store is dropped, telling `state` each answer; each
/// change of role is logged once.
pub(super) async fn campaign(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    shown: String,
    instance: String,
    settings: LeaseSettings,
    state: Arc<Mutex<Campaign>>,
) {
    let mut client: Option<Client> = None;
    let mut failing = false;
    let mut ticks = tokio::time::interval(settings.renew);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if lock(&state).resigned() {
            return;
        }
        let sent = Instant::now();
        let held = lock(&state).renewing(sent);
        // An answer later than the lease is worth nothing: the lease counts
        // from `sent`.
        let answer = tokio::time::timeout(settings.lease, async {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = Some(connect(&config, tls.clone()).await?);
            }
            let c = client.as_ref().expect("connected just above");
            take_or_renew(c, &instance, held, settings).await
        })
        .await;
        match answer {
            Ok(Ok(now_held)) => {
                lock(&state).answered(sent, now_held);
                failing = false;
            }
            Ok(Err(e)) => {
                client = None;
                if !failing {
                    let e = e.into_store_error(&shown);
                    tracing::warn!(
                        "cannot renew or take the leader's lease: {e}; trying again every {:?}",
                        settings.renew
                    );
                }
                failing = true;
            }
            Err(_) => {
                client = None;
                if !failing {
                    tracing::warn!(
                        "the store at {shown} did not answer a renewal of the leader's lease within {:?}; trying again every {:?}",
                        settings.lease,
                        settings.renew
                    );
                }
                failing = true;
            }
        }
        let change = lock(&state).change(Instant::now());
        match change {
            Some(Change::Gained(term)) => tracing::info!(
                "this instance leads now (term {term}): it drives the rollouts, renewing its lease every {:?}",
                settings.renew
            ),
            Some(Change::Lost(term)) => tracing::warn!(
                "this instance no longer leads (its term {term} is over: its lease could not be renewed within {:?}); it follows, and stays ready to take the lease again",
                settings.lease
            ),
            None => {}
        }
    }
}

async fn connect(config: &tokio_postgres::Config, tls: MakeRustlsConnect) -> Result2<Client> {
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

pub(super) fn lock(state: &Mutex<Campaign>) -> std::sync::MutexGuard<'_, Campaign> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}
