//! Every instance's closed telemetry buckets on PostgreSQL, for analysis
//! over the whole cluster: `telemetry_buckets` holds one row per instance,
//! model, version, role and 5-second epoch (the bucket as JSON), written
//! once (a retried flush conflicts and is skipped); `telemetry_marks` the
//! epoch each instance has flushed through, written in the same statement
//! (a quiet instance still reports). Neither takes the writers' advisory
//! lock: rows are per instance, nothing else reads them in a transaction.

use std::collections::BTreeMap;

use super::{Db, Result2, json, to_json};
use crate::metrics::Role;
use crate::metrics::cluster::{Flush, PeerBucket, Peers};

/// The migration that adds them.
pub(super) const MIGRATION: &str = r#"
CREATE TABLE telemetry_buckets (
    instance  TEXT NOT NULL,
    model     TEXT NOT NULL,
    version   TEXT NOT NULL,
    role      TEXT NOT NULL,
    epoch     BIGINT NOT NULL,
    data      TEXT NOT NULL,
    PRIMARY KEY (model, epoch, instance, version, role)
);
CREATE INDEX telemetry_buckets_by_epoch ON telemetry_buckets(epoch);
CREATE TABLE telemetry_marks (
    instance  TEXT PRIMARY KEY,
    through   BIGINT NOT NULL
);
"#;

/// One statement: the mark moves forward (never back), every bucket is
/// inserted unless already there.
const FLUSH: &str = "WITH mark AS (
    INSERT INTO telemetry_marks (instance, through) VALUES ($1::text, $2)
    ON CONFLICT (instance) DO UPDATE SET through = GREATEST(telemetry_marks.through, EXCLUDED.through)
)
INSERT INTO telemetry_buckets (instance, model, version, role, epoch, data)
SELECT $1::text, m, v, r, e, d FROM unnest($3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[]) AS t(m, v, r, e, d)
ON CONFLICT DO NOTHING";

pub(super) async fn flush(db: &Db, f: &Flush) -> Result2<()> {
    let models: Vec<&str> = f.buckets.iter().map(|b| b.model.as_str()).collect();
    let versions: Vec<&str> = f.buckets.iter().map(|b| b.version.as_str()).collect();
    let roles: Vec<&str> = f.buckets.iter().map(|b| b.role.as_str()).collect();
    let epochs: Vec<i64> = f.buckets.iter().map(|b| b.bucket.epoch as i64).collect();
    let data: Vec<String> = f.buckets.iter().map(|b| to_json(&b.bucket)).collect();
    let client = db.client().await?;
    client
        .execute(
            FLUSH,
            &[
                &f.instance,
                &(f.through as i64),
                &models,
                &versions,
                &roles,
                &epochs,
                &data,
            ],
        )
        .await?;
    Ok(())
}

pub(super) async fn peers(db: &Db, model: &str, after: u64, me: &str) -> Result2<Peers> {
    let client = db.client().await?;
    // The marks first: a flush that lands between the two reads adds
    // buckets past the marks read (counted at the next read), never a mark
    // past the buckets read.
    let marks = client
        .query("SELECT instance, through FROM telemetry_marks", &[])
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get::<_, i64>(1)?.max(0) as u64)))
        .collect::<Result2<BTreeMap<String, u64>>>()?;
    let rows = client
        .query(
            "SELECT instance, version, role, data FROM telemetry_buckets
             WHERE model = $1 AND epoch > $2 AND instance <> $3",
            &[&model, &(after as i64), &me],
        )
        .await?;
    let mut buckets = Vec::with_capacity(rows.len());
    for r in &rows {
        let role: String = r.try_get(2)?;
        // A role this build does not know (a newer instance's) is skipped.
        let Some(role) = Role::parse(&role) else {
            continue;
        };
        buckets.push(PeerBucket {
            instance: r.try_get(0)?,
            version: r.try_get(1)?,
            role,
            bucket: json(r, 3, "a telemetry bucket")?,
        });
    }
    Ok(Peers { buckets, marks })
}

pub(super) async fn prune(db: &Db, before: u64) -> Result2<usize> {
    let client = db.client().await?;
    let before = before as i64;
    let buckets = client
        .execute("DELETE FROM telemetry_buckets WHERE epoch < $1", &[&before])
        .await?;
    let marks = client
        .execute("DELETE FROM telemetry_marks WHERE through < $1", &[&before])
        .await?;
    Ok((buckets + marks) as usize)
}

#[cfg(test)]
mod tests {
    use crate::metrics::Role;
    use crate::metrics::cluster::{Flush, Flushed};
    use crate::metrics::window::Bucket;
    use crate::store::testpg;
    use crate::store::{PostgresStore, Store};

    fn flushed(model: &str, version: &str, epoch: u64, requests: u64) -> Flushed {
        let mut bucket = Bucket {
            epoch,
            requests,
            ..Bucket::default()
        };
        bucket.latency.add(0.004);
        bucket.classes.add(-1, requests);
        Flushed {
            model: model.into(),
            version: version.into(),
            role: Role::Candidate,
            bucket,
        }
    }

    /// A flush is one statement, idempotent when retried; another
    /// instance reads back the buckets of the others only (the bucket as
    /// written), every mark, and old rows are pruned.
    #[test]
    fn buckets_are_written_once_read_by_the_others_and_pruned() {
        let store = PostgresStore::open(&testpg::database()).unwrap();
        let a = Flush {
            instance: "a".into(),
            through: 101,
            buckets: vec![flushed("m", "2", 100, 3), flushed("m", "2", 101, 4)],
        };
        store.flush_buckets(&a).unwrap();
        store.flush_buckets(&a).unwrap(); // retried: nothing doubles
        let mut changed = a.clone();
        changed.buckets[1].bucket.requests = 99;
        store.flush_buckets(&changed).unwrap(); // written once: kept as first written
        store
            .flush_buckets(&Flush {
                instance: "b".into(),
                through: 101,
                buckets: vec![flushed("m", "1", 101, 5), flushed("other", "1", 101, 6)],
            })
            .unwrap();
        // A quiet instance moves its mark only, and never back.
        let quiet = |through| Flush {
            instance: "c".into(),
            through,
            buckets: vec![],
        };
        store.flush_buckets(&quiet(102)).unwrap();
        store.flush_buckets(&quiet(90)).unwrap();
        let seen = store.peer_buckets("m", 99, "b").unwrap();
        let mut got: Vec<(String, u64, u64)> = seen
            .buckets
            .iter()
            .map(|p| (p.instance.clone(), p.bucket.epoch, p.bucket.requests))
            .collect();
        got.sort();
        assert_eq!(got, vec![("a".into(), 100, 3), ("a".into(), 101, 4)]);
        assert_eq!(seen.buckets[0].bucket, a.buckets[0].bucket);
        assert_eq!(
            seen.marks.into_iter().collect::<Vec<_>>(),
            vec![("a".into(), 101), ("b".into(), 101), ("c".into(), 102)]
        );
        assert_eq!(store.peer_buckets("m", 100, "x").unwrap().buckets.len(), 2);
        // Pruned before epoch 101: a's first bucket goes (the marks stay).
        assert_eq!(store.prune_buckets(101).unwrap(), 1);
        assert_eq!(store.peer_buckets("m", 0, "b").unwrap().buckets.len(), 1);
    }
}
