//! The [`Store`] contract: what every implementation must do, written
//! against the trait only, so that the embedded SQLite store and any other
//! (PostgreSQL next) pass the same suite unchanged. An implementation runs
//! it with [`store_contract!`], given a way to make an empty [`Database`].
//!
//! Covered: migrations from an empty database and reopening it; every
//! method's effect and its event, written in the same transaction; the
//! first version becoming stable; at most one active rollout per model; a
//! rollback marking what it undoes; event pages and retention; concurrent
//! writers (registrations and rollout creation from many threads); a copy
//! (snapshot, event log, restore) that keeps ids, timestamps and order;
//! leadership and fencing (a leader's rollout write of an older term than
//! the lease's is refused and changes nothing).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{
    Counts, Fence, Inserted, LeaseSettings, NewEvent, NotCreated, Page, RolloutRecord, Store,
    StoreError,
};
use crate::gateway::RoutePolicy;
use crate::records::{EventKind, InstanceReport, ServingSettings, Source, VersionRecord};
use crate::runtime::Signature;
use crate::spec::RolloutSpec;
use crate::strategy::{Phase, RolloutKind, RolloutState, initial_state};

/// One database an implementation can open any number of times (opening
/// it again is a restart: everything committed is there).
pub trait Database {
    fn open(&self) -> Arc<dyn Store>;
    /// Another empty database of the same kind (a copy's target).
    fn another(&self) -> Box<dyn Database>;
}

/// One `#[test]` per check of the contract, for an implementation whose
/// empty databases `$new` makes (an expression of type `Box<dyn Database>`).
#[macro_export]
macro_rules! store_contract {
    ($new:expr) => {
        $crate::store_contract!(@tests $new;
            an_empty_database_is_migrated_and_empty,
            the_first_version_is_stable_and_versions_round_trip,
            each_change_is_stored_with_its_event,
            a_rollout_pass_that_publishes_stores_the_route_with_it,
            an_event_kind_this_build_does_not_know_reads_as_stored,
            everything_committed_survives_reopening,
            a_model_has_at_most_one_active_rollout,
            a_rollback_marks_the_rollout_it_undoes,
            event_pages_join_to_the_whole_history,
            retention_keeps_active_rollouts_events,
            concurrent_registrations_make_exactly_one_stable,
            concurrent_rollouts_of_one_model_make_exactly_one,
            a_copy_keeps_every_row_id_timestamp_and_event,
            a_copy_refuses_a_store_that_holds_anything_unless_replacing,
            two_handles_on_one_database_share_its_identity,
            every_change_of_what_serves_grows_the_route_version,
            concurrent_changes_take_distinct_route_versions,
            instances_report_themselves_and_are_forgotten,
            a_leader_s_write_of_an_older_term_is_refused_and_changes_nothing,
        );
    };
    (@tests $new:expr; $($check:ident),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                let db: Box<dyn $crate::store::contract::Database> = $new;
                $crate::store::contract::$check(&*db);
            }
        )*
    };
}

/// A version record with every field set, for store tests.
pub fn record(model: &str, version: &str) -> VersionRecord {
    let mut labels = BTreeMap::new();
    labels.insert("git".to_string(), format!("sha-{version}"));
    VersionRecord {
        model: model.into(),
        version: version.into(),
        source: Source::Onnx {
            digest: format!("{:0>64}", version),
            size: 100 + version.len() as u64,
        },
        signature: Signature {
            inputs: vec![],
            outputs: vec![],
        },
        labels,
        settings: ServingSettings::default(),
        created_at: crate::units::now_rfc3339(),
        loaded: false,
    }
}

fn event(model: &str, kind: &str) -> NewEvent {
    NewEvent::new(
        model,
        EventKind::parse(kind),
        format!("{kind} happened"),
        serde_json::json!({"k": kind}),
    )
}

fn kinds(store: &dyn Store, model: &str) -> Vec<String> {
    store
        .events(model, Page::Latest { limit: 10_000 })
        .unwrap()
        .into_iter()
        .map(|e| e.kind.to_string())
        .collect()
}

fn spec(model: &str, version: &str) -> RolloutSpec {
    RolloutSpec::from_yaml(&format!(
        "model: {model}\nversion: \"{version}\"\nstrategy: {{ basic: {{}} }}"
    ))
    .unwrap()
}

/// Creates a basic rollout of `model` to version 2, recorded with `events`.
fn begin(
    store: &dyn Store,
    model: &str,
    events: Vec<NewEvent>,
) -> Result<RolloutRecord, NotCreated> {
    store
        .create_rollout(
            model,
            RolloutKind::Basic,
            &spec(model, "2"),
            &started(model),
            None,
            events,
            Fence::Unfenced,
        )
        .unwrap()
}

/// Ends a rollout in `phase`, recorded with `events`; returns its state.
/// A rollback of `r` on model `m` back to version 1, created.
fn rollback_of(store: &dyn Store, r: &RolloutRecord) -> RolloutRecord {
    store
        .create_rollout(
            "m",
            RolloutKind::Rollback,
            &spec("m", "1"),
            &started("m"),
            Some(r.id),
            vec![event("m", "rollback_started")],
            Fence::Unfenced,
        )
        .unwrap()
        .unwrap()
}

fn end(store: &dyn Store, r: &RolloutRecord, phase: Phase, events: Vec<NewEvent>) -> RolloutState {
    let mut state = r.state.clone();
    state.phase = phase;
    store
        .update_rollout(r.id, &state, events, None, Fence::Unfenced)
        .unwrap();
    state
}

fn started(model: &str) -> RolloutState {
    let mut state = initial_state(&RoutePolicy::stable_only("1"), 1_000);
    state.message = format!("rolling {model}");
    state
}

pub fn two_handles_on_one_database_share_its_identity(db: &dyn Database) {
    let (one, two) = (db.open(), db.open());
    let identity = one.identity().unwrap();
    assert_eq!(two.identity().unwrap(), identity);
    let other = db.another();
    assert_ne!(other.open().identity().unwrap(), identity);
}

pub fn an_empty_database_is_migrated_and_empty(db: &dyn Database) {
    let store = db.open();
    assert!(store.models().unwrap().is_empty());
    assert!(store.model("m").unwrap().is_none());
    assert!(store.versions("m").unwrap().is_empty());
    assert!(store.version("m", "1").unwrap().is_none());
    assert!(store.route("m").unwrap().is_none());
    assert!(store.active_rollouts().unwrap().is_empty());
    assert!(store.rollouts("m", 10).unwrap().is_empty());
    assert!(store.rollout(1).unwrap().is_none());
    assert!(kinds(&*store, "m").is_empty());
    // Opening a migrated database again migrates nothing and loses nothing.
    drop(store);
    assert!(db.open().models().unwrap().is_empty());
}

pub fn the_first_version_is_stable_and_versions_round_trip(db: &dyn Database) {
    let store = db.open();
    let one = record("m", "1");
    assert_eq!(
        store.insert_version(&one).unwrap(),
        Inserted::Created { stable: true }
    );
    assert_eq!(
        store.insert_version(&record("m", "2")).unwrap(),
        Inserted::Created { stable: false }
    );
    // The same name again: nothing changes, the stored record comes back.
    let mut other = record("m", "1");
    other.labels.clear();
    assert_eq!(
        store.insert_version(&other).unwrap(),
        Inserted::Exists(Box::new(one.clone()))
    );
    assert_eq!(store.version("m", "1").unwrap(), Some(one));
    let model = store.model("m").unwrap().unwrap();
    assert_eq!(model.stable.as_deref(), Some("1"));
    let versions: Vec<String> = store
        .versions("m")
        .unwrap()
        .into_iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(versions, ["1", "2"], "in the order they were registered");
    assert_eq!(
        kinds(&*store, "m"),
        ["version_registered", "stable_set", "version_registered"]
    );
}

pub fn each_change_is_stored_with_its_event(db: &dyn Database) {
    let store = db.open();
    store.insert_version(&record("m", "1")).unwrap();
    store.insert_version(&record("m", "2")).unwrap();
    let settings = ServingSettings {
        replicas: 3,
        ..ServingSettings::default()
    };
    store
        .update_settings("m", "2", &settings, event("m", "settings_changed"))
        .unwrap();
    assert_eq!(store.version("m", "2").unwrap().unwrap().settings, settings);
    store
        .set_loaded("m", "2", true, event("m", "version_loaded"))
        .unwrap();
    assert!(store.version("m", "2").unwrap().unwrap().loaded);
    let route = RoutePolicy::stable_only("2");
    store
        .set_route("m", &route, event("m", "route_changed"))
        .unwrap();
    assert_eq!(store.route("m").unwrap(), Some(route));
    assert_eq!(
        store.model("m").unwrap().unwrap().stable.as_deref(),
        Some("2"),
        "the route's stable version is the model's"
    );
    store
        .remove_version("m", "1", event("m", "version_removed"))
        .unwrap();
    assert!(store.version("m", "1").unwrap().is_none());
    let r = begin(&*store, "m", vec![event("m", "rollout_started")]).unwrap();
    let done = end(
        &*store,
        &r,
        Phase::Succeeded,
        vec![event("m", "succeeded"), event("m", "note")],
    );
    assert_eq!(store.rollout(r.id).unwrap().unwrap().state, done);
    store
        .set_rollout_report(r.id, &serde_json::json!({"versions": 2}), Fence::Unfenced)
        .unwrap();
    assert_eq!(
        store.rollout(r.id).unwrap().unwrap().report,
        Some(serde_json::json!({"versions": 2}))
    );
    let all = store.events("m", Page::Latest { limit: 100 }).unwrap();
    let tail: Vec<(&str, Option<&str>)> = all[3..]
        .iter()
        .map(|e| (e.kind.as_str(), e.rollout.as_deref()))
        .collect();
    let name = r.name();
    assert_eq!(
        tail,
        [
            ("settings_changed", None),
            ("version_loaded", None),
            ("route_changed", None),
            ("version_removed", None),
            ("rollout_started", Some(name.as_str())),
            ("succeeded", Some(name.as_str())),
            ("note", Some(name.as_str())),
        ],
        "every change with its event, in order; a rollout's events name it"
    );
    assert_eq!(all.last().unwrap().data, serde_json::json!({"k": "note"}));
    let theirs = store
        .rollout_events(r.id, Page::Latest { limit: 100 })
        .unwrap();
    assert_eq!(theirs.len(), 3);
}

/// A rollout pass that publishes its route stores it as the model's (its
/// stable version too) in the pass's own transaction, with the route's
/// event after the rollout's and not named by it; a pass that does not
/// publish leaves the model's route alone.
pub fn a_rollout_pass_that_publishes_stores_the_route_with_it(db: &dyn Database) {
    let store = db.open();
    store.insert_version(&record("m", "1")).unwrap();
    store.insert_version(&record("m", "2")).unwrap();
    let r = begin(&*store, "m", vec![event("m", "rollout_started")]).unwrap();
    let mut state = r.state.clone();
    state.step = 1;
    state.route = RoutePolicy::stable_only("2");
    store
        .update_rollout(
            r.id,
            &state,
            vec![event("m", "step")],
            None,
            Fence::Unfenced,
        )
        .unwrap();
    assert_eq!(
        store.route("m").unwrap(),
        None,
        "not published: not the model's"
    );
    assert_eq!(
        store.model("m").unwrap().unwrap().stable.as_deref(),
        Some("1")
    );
    store
        .update_rollout(
            r.id,
            &state,
            vec![event("m", "succeeded")],
            Some(event("m", "route_changed")),
            Fence::Unfenced,
        )
        .unwrap();
    assert_eq!(store.route("m").unwrap(), Some(state.route.clone()));
    assert_eq!(
        store.model("m").unwrap().unwrap().stable.as_deref(),
        Some("2")
    );
    assert_eq!(store.rollout(r.id).unwrap().unwrap().state, state);
    let all = store.events("m", Page::Latest { limit: 100 }).unwrap();
    let name = r.name();
    let tail: Vec<(&str, Option<&str>)> = all[all.len() - 4..]
        .iter()
        .map(|e| (e.kind.as_str(), e.rollout.as_deref()))
        .collect();
    assert_eq!(
        tail,
        [
            ("rollout_started", Some(name.as_str())),
            ("step", Some(name.as_str())),
            ("succeeded", Some(name.as_str())),
            ("route_changed", None),
        ]
    );
}

/// An event kind written by a newer build reads back as it was stored:
/// history never fails on it.
pub fn an_event_kind_this_build_does_not_know_reads_as_stored(db: &dyn Database) {
    let store = db.open();
    store.insert_version(&record("m", "1")).unwrap();
    store.insert_version(&record("m", "2")).unwrap();
    store
        .set_loaded("m", "2", true, event("m", "warmed_in_another_region"))
        .unwrap();
    let last = store
        .events("m", Page::Latest { limit: 1 })
        .unwrap()
        .remove(0);
    assert_eq!(
        last.kind,
        EventKind::Other("warmed_in_another_region".into())
    );
    assert_eq!(
        serde_json::to_value(&last).unwrap()["kind"],
        "warmed_in_another_region"
    );
}

pub fn everything_committed_survives_reopening(db: &dyn Database) {
    let (route, id) = {
        let store = db.open();
        store.insert_version(&record("m", "1")).unwrap();
        store.insert_version(&record("m", "2")).unwrap();
        let route = RoutePolicy::stable_only("1");
        store
            .set_route("m", &route, event("m", "route_changed"))
            .unwrap();
        let r = begin(&*store, "m", vec![event("m", "rollout_started")]).unwrap();
        (route, r.id)
    };
    let store = db.open();
    assert_eq!(store.versions("m").unwrap().len(), 2);
    assert_eq!(store.route("m").unwrap(), Some(route));
    let active = store.active_rollouts().unwrap();
    assert_eq!(active.len(), 1);
    assert_eq!(
        (
            active[0].id,
            active[0].spec.clone(),
            active[0].state.clone()
        ),
        (id, spec("m", "2"), started("m"))
    );
    assert_eq!(kinds(&*store, "m").len(), 5);
}

pub fn a_model_has_at_most_one_active_rollout(db: &dyn Database) {
    let store = db.open();
    store.insert_version(&record("m", "1")).unwrap();
    store.insert_version(&record("n", "1")).unwrap();
    let first = begin(&*store, "m", vec![]).unwrap();
    match store
        .create_rollout(
            "m",
            RolloutKind::Canary,
            &spec("m", "3"),
            &started("m"),
            None,
            vec![event("m", "rollout_started")],
            Fence::Unfenced,
        )
        .unwrap()
    {
        Err(NotCreated::Active(active)) => assert_eq!(active.id, first.id),
        Ok(r) => panic!("a second active rollout {r:?}"),
    }
    assert!(
        !kinds(&*store, "m").contains(&"rollout_started".to_string()),
        "a refused rollout records nothing"
    );
    // Another model is independent; an ended rollout frees the model.
    assert!(begin(&*store, "n", vec![]).is_ok());
    end(&*store, &first, Phase::Aborted, vec![]);
    assert_eq!(store.active_rollouts().unwrap().len(), 1);
    let again = begin(&*store, "m", vec![]).unwrap();
    let newest_first: Vec<i64> = store
        .rollouts("m", 10)
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(newest_first, [again.id, first.id]);
    assert_eq!(store.rollouts("m", 1).unwrap().len(), 1);
}

pub fn a_rollback_marks_the_rollout_it_undoes(db: &dyn Database) {
    let store = db.open();
    store.insert_version(&record("m", "1")).unwrap();
    let r = begin(&*store, "m", vec![]).unwrap();
    end(&*store, &r, Phase::Succeeded, vec![]);
    let back = rollback_of(&*store, &r);
    assert_eq!(back.undoes, Some(r.id));
    assert_eq!(back.kind, RolloutKind::Rollback);
    let undone = store.rollout(r.id).unwrap().unwrap();
    assert_eq!(undone.state.phase, Phase::RolledBack);
    assert!(
        undone.state.message.contains(&back.name()),
        "{}",
        undone.state.message
    );
}

pub fn event_pages_join_to_the_whole_history(db: &dyn Database) {
    let store = db.open();
    store.insert_version(&record("m", "1")).unwrap();
    store.insert_version(&record("m", "2")).unwrap();
    store.insert_version(&record("other", "1")).unwrap();
    for i in 0..120 {
        store
            .set_loaded("m", "2", i % 2 == 0, event("m", "note"))
            .unwrap();
    }
    let all = store.events("m", Page::Latest { limit: 10_000 }).unwrap();
    assert_eq!(all.len(), 123);
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
    let (mut joined, mut after) = (Vec::new(), 0);
    loop {
        let page = store.events("m", Page::After { after, limit: 50 }).unwrap();
        assert!(page.len() <= 50);
        let Some(last) = page.last() else { break };
        after = last.id;
        joined.extend(page);
    }
    assert_eq!(joined, all);
    assert_eq!(
        store.events("m", Page::Latest { limit: 3 }).unwrap(),
        all[120..]
    );
}

pub fn retention_keeps_active_rollouts_events(db: &dyn Database) {
    let store = db.open();
    store.insert_version(&record("m", "1")).unwrap();
    store.insert_version(&record("n", "1")).unwrap();
    let ended = begin(&*store, "n", vec![event("n", "rollout_started")]).unwrap();
    end(
        &*store,
        &ended,
        Phase::Succeeded,
        vec![event("n", "succeeded")],
    );
    let active = begin(&*store, "m", vec![event("m", "rollout_started")]).unwrap();
    // Every event so far is older than a cutoff in the future.
    let deleted = store
        .delete_events_before("9999-01-01T00:00:00.000Z")
        .unwrap();
    assert_eq!(
        deleted,
        2 + 2 + 2,
        "registrations (2 per model) and the ended rollout's"
    );
    let left: Vec<_> = ["m", "n"]
        .iter()
        .flat_map(|m| store.events(m, Page::Latest { limit: 100 }).unwrap())
        .map(|e| (e.rollout, e.kind.to_string()))
        .collect();
    assert_eq!(left, [(Some(active.name()), "rollout_started".to_string())]);
    assert!(
        store.rollout(ended.id).unwrap().is_some(),
        "rollout records stay"
    );
    assert_eq!(
        store
            .delete_events_before("2000-01-01T00:00:00.000Z")
            .unwrap(),
        0
    );
}

pub fn concurrent_registrations_make_exactly_one_stable(db: &dyn Database) {
    let store = db.open();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                (0..5)
                    .map(|i| {
                        store
                            .insert_version(&record("m", &format!("{t}-{i}")))
                            .unwrap()
                    })
                    .filter(|r| *r == Inserted::Created { stable: true })
                    .count()
            })
        })
        .collect();
    let stable: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(stable, 1, "exactly one registration became stable");
    assert_eq!(store.versions("m").unwrap().len(), 40);
    let k = kinds(&*store, "m");
    assert_eq!(k.iter().filter(|k| *k == "version_registered").count(), 40);
    assert_eq!(k.iter().filter(|k| *k == "stable_set").count(), 1);
}

pub fn concurrent_rollouts_of_one_model_make_exactly_one(db: &dyn Database) {
    let store = db.open();
    store.insert_version(&record("m", "1")).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || {
                begin(&*store, "m", vec![event("m", "rollout_started")]).is_ok()
            })
        })
        .collect();
    let created = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|ok| *ok)
        .count();
    assert_eq!(created, 1);
    assert_eq!(store.active_rollouts().unwrap().len(), 1);
    assert_eq!(
        kinds(&*store, "m")
            .iter()
            .filter(|k| *k == "rollout_started")
            .count(),
        1
    );
}

/// A store with models, a route, versions, an ended and an active rollout
/// (with a report and a rollback), and events with gaps in their ids.
fn populated(store: &dyn Store) {
    store.insert_version(&record("m", "1")).unwrap();
    store.insert_version(&record("m", "2")).unwrap();
    store.insert_version(&record("n", "1")).unwrap();
    store
        .set_route(
            "m",
            &RoutePolicy::stable_only("2"),
            event("m", "route_changed"),
        )
        .unwrap();
    store
        .set_unloaded("n", Some("ops"), event("n", "unloaded"))
        .unwrap();
    let r = begin(store, "m", vec![event("m", "rollout_started")]).unwrap();
    end(store, &r, Phase::Succeeded, vec![event("m", "succeeded")]);
    store
        .set_rollout_report(
            r.id,
            &serde_json::json!({"versions": [1, 2]}),
            Fence::Unfenced,
        )
        .unwrap();
    rollback_of(store, &r);
    begin(store, "n", vec![event("n", "rollout_started")]).unwrap();
    // Retention leaves gaps in the ids: a copy keeps them.
    store
        .delete_events_before("9999-01-01T00:00:00.000Z")
        .unwrap();
    for _ in 0..3 {
        store
            .set_loaded("m", "1", true, event("m", "note"))
            .unwrap();
    }
}

/// Copies `from` into `to` page by page, as `ferry store copy` does.
fn copy(from: &dyn Store, to: &dyn Store, replace: bool) -> Result<(), StoreError> {
    to.restore(&from.snapshot()?, replace)?;
    let mut after = 0;
    loop {
        let page = from.event_log(after, 2)?;
        let Some(last) = page.last() else { break };
        after = last.id;
        to.append_events(&page)?;
    }
    Ok(())
}

fn whole_log(store: &dyn Store) -> Vec<super::Event> {
    store.event_log(0, 10_000).unwrap()
}

pub fn a_copy_keeps_every_row_id_timestamp_and_event(db: &dyn Database) {
    let from = db.open();
    populated(&*from);
    let target = db.another();
    let to = target.open();
    assert_eq!(to.counts().unwrap(), Counts::default());
    copy(&*from, &*to, false).unwrap();
    assert_eq!(to.snapshot().unwrap(), from.snapshot().unwrap());
    let log = whole_log(&*from);
    assert!(log.len() >= 5 && log[0].id > 1, "ids with gaps: {log:?}");
    assert_eq!(whole_log(&*to), log, "ids, timestamps, order and data");
    assert_eq!(to.counts().unwrap(), from.counts().unwrap());
    assert_eq!(
        to.counts().unwrap(),
        Counts {
            models: 2,
            versions: 3,
            rollouts: 3,
            events: 3 + 2,
        }
    );
    assert_eq!(
        to.events("m", Page::Latest { limit: 100 }).unwrap(),
        from.events("m", Page::Latest { limit: 100 }).unwrap()
    );
    // The copy goes on where the original left off.
    let last_event = log.last().unwrap().id;
    let last_rollout = from.snapshot().unwrap().rollouts.last().unwrap().id;
    to.set_loaded("m", "1", false, event("m", "after_copy"))
        .unwrap();
    assert!(whole_log(&*to).last().unwrap().id > last_event);
    for active in to.active_rollouts().unwrap() {
        end(&*to, &active, Phase::Aborted, vec![]);
    }
    let next = begin(&*to, "n", vec![]).unwrap();
    assert!(next.id > last_rollout, "{} after {last_rollout}", next.id);
    // And it survives reopening.
    drop(to);
    assert_eq!(whole_log(&*target.open()).len(), log.len() + 1);
}

pub fn a_copy_refuses_a_store_that_holds_anything_unless_replacing(db: &dyn Database) {
    let from = db.open();
    populated(&*from);
    let target = db.another();
    let to = target.open();
    to.insert_version(&record("other", "1")).unwrap();
    match copy(&*from, &*to, false) {
        Err(StoreError::NotEmpty {
            models: 1,
            events: 2,
        }) => {}
        other => panic!("a non-empty target was not refused: {other:?}"),
    }
    assert_eq!(to.models().unwrap().len(), 1, "nothing was changed");
    copy(&*from, &*to, true).unwrap();
    assert!(to.model("other").unwrap().is_none(), "replaced");
    assert_eq!(to.snapshot().unwrap(), from.snapshot().unwrap());
    assert_eq!(whole_log(&*to), whole_log(&*from));
}

/// Every change of what serves grows the route version by one, in its own
/// transaction, and names the model it changed; reads, reports and history
/// do not move it; a second handle (another instance) reads the same.
pub fn every_change_of_what_serves_grows_the_route_version(db: &dyn Database) {
    let store = db.open();
    assert_eq!(store.route_version().unwrap(), 0);
    assert_eq!(store.changed_since(0).unwrap(), vec![]);
    let expected = std::cell::Cell::new(0);
    let grows = |store: &dyn Store, model: &str, what: &str| {
        let now = expected.get() + 1;
        expected.set(now);
        assert_eq!(store.route_version().unwrap(), now, "{what}");
        let last = store.changed_since(now - 1).unwrap();
        assert_eq!(last, vec![(model.to_string(), now)], "{what}");
    };
    store.insert_version(&record("m", "1")).unwrap();
    grows(&*store, "m", "the first registration");
    store.insert_version(&record("m", "2")).unwrap();
    grows(&*store, "m", "a registration");
    store.insert_version(&record("m", "2")).unwrap();
    assert_eq!(
        store.route_version().unwrap(),
        expected.get(),
        "an existing version"
    );
    store.insert_version(&record("other", "1")).unwrap();
    grows(&*store, "other", "another model's registration");
    let settings = ServingSettings::default();
    store
        .update_settings("m", "2", &settings, event("m", "settings_changed"))
        .unwrap();
    grows(&*store, "m", "settings");
    store
        .set_loaded("m", "2", true, event("m", "version_loaded"))
        .unwrap();
    grows(&*store, "m", "a load");
    store
        .set_unloaded("m", Some("admin"), event("m", "model_unloaded"))
        .unwrap();
    grows(&*store, "m", "an unload");
    store
        .set_unloaded("m", None, event("m", "model_loaded"))
        .unwrap();
    grows(&*store, "m", "a load back");
    store
        .set_route(
            "m",
            &RoutePolicy::stable_only("2"),
            event("m", "route_changed"),
        )
        .unwrap();
    grows(&*store, "m", "a route");
    store
        .remove_version("m", "1", event("m", "version_removed"))
        .unwrap();
    grows(&*store, "m", "a removal");
    let r = begin(&*store, "m", vec![event("m", "rollout_started")]).unwrap();
    grows(&*store, "m", "a rollout's creation");
    end(&*store, &r, Phase::Succeeded, vec![event("m", "succeeded")]);
    grows(&*store, "m", "a rollout pass");
    let before = expected.get();
    store
        .set_rollout_report(r.id, &serde_json::json!({"versions": 2}), Fence::Unfenced)
        .unwrap();
    store.events("m", Page::Latest { limit: 10 }).unwrap();
    store.report_instance(&instance("a", 3)).unwrap();
    assert_eq!(
        store.route_version().unwrap(),
        before,
        "nothing that serves changed"
    );
    assert_eq!(
        store.changed_since(2).unwrap(),
        vec![("other".to_string(), 3), ("m".to_string(), before)],
        "each changed model once, with its latest change, oldest first"
    );
    assert_eq!(
        db.open().route_version().unwrap(),
        before,
        "another instance reads it"
    );
}

/// Writers from many threads (instances) each get their own route version.
pub fn concurrent_changes_take_distinct_route_versions(db: &dyn Database) {
    let store = db.open();
    store.insert_version(&record("m", "1")).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let store = db.open();
            std::thread::spawn(move || {
                for j in 0..5 {
                    let version = format!("{i}-{j}");
                    store.insert_version(&record("m", &version)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(store.route_version().unwrap(), 21, "one version per change");
}

fn instance(id: &str, route_version: i64) -> InstanceReport {
    InstanceReport {
        id: id.into(),
        url: format!("http://{id}.internal:8080"),
        version: "0.1.0".into(),
        started_at: "2026-12-01T20:00:00.000Z".into(),
        route_version,
        warm: vec!["m/1".into(), "m/2".into()],
        failures: vec![crate::records::LoadFailure {
            version: "m/3".into(),
            reason: "the artifact is corrupt".into(),
        }],
    }
}

/// An instance's report replaces its previous one and is stamped when
/// written; every instance reads every report; old ones are forgotten.
pub fn instances_report_themselves_and_are_forgotten(db: &dyn Database) {
    let store = db.open();
    assert_eq!(store.instances().unwrap(), vec![]);
    let before = crate::units::now_ms();
    store.report_instance(&instance("a", 1)).unwrap();
    db.open().report_instance(&instance("b", 1)).unwrap();
    store.report_instance(&instance("a", 7)).unwrap();
    let after = crate::units::now_ms();
    let all = db.open().instances().unwrap();
    let reports: Vec<_> = all.iter().map(|i| i.report.clone()).collect();
    assert_eq!(reports, vec![instance("a", 7), instance("b", 1)]);
    for i in &all {
        assert!((before..=after).contains(&i.last_seen_ms), "{i:?}");
    }
    assert_eq!(
        store.forget_instances(before).unwrap(),
        0,
        "both seen since"
    );
    assert_eq!(store.forget_instances(after + 1).unwrap(), 2);
    assert_eq!(store.instances().unwrap(), vec![]);
}

/// Leadership and fencing, as far as every store has them: an instance that
/// campaigns leads (at once on an embedded store, within its lease on a
/// shared one), the lease names it, its writes go through with its term,
/// and a write claiming an older term is refused in its transaction,
/// changing nothing (no state, no event, no report, no route version).
pub fn a_leader_s_write_of_an_older_term_is_refused_and_changes_nothing(db: &dyn Database) {
    let store = db.open();
    store.insert_version(&record("m", "1")).unwrap();
    store.insert_version(&record("m", "2")).unwrap();
    store.campaign("me", LeaseSettings::default());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let term = loop {
        if let Some(term) = store.leading() {
            break term;
        }
        assert!(std::time::Instant::now() < deadline, "never led");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(store.drives_rollouts().unwrap());
    let leader = store.leader().unwrap().expect("the lease names its holder");
    assert_eq!(
        (leader.instance.as_str(), leader.term, leader.valid),
        ("me", term, true)
    );
    let old = Fence::Term(term - 1);
    let refused = store
        .create_rollout(
            "m",
            RolloutKind::Basic,
            &spec("m", "2"),
            &started("m"),
            None,
            vec![],
            old,
        )
        .unwrap_err();
    assert!(matches!(refused, StoreError::Fenced { .. }), "{refused}");
    assert_eq!(store.rollouts("m", 10).unwrap(), vec![], "not created");
    let r = store
        .create_rollout(
            "m",
            RolloutKind::Basic,
            &spec("m", "2"),
            &started("m"),
            None,
            vec![event("m", "rollout_started")],
            Fence::Term(term),
        )
        .unwrap()
        .unwrap();
    let (events, version) = (kinds(&*store, "m"), store.route_version().unwrap());
    let mut state = r.state.clone();
    state.phase = Phase::Succeeded;
    state.route = RoutePolicy::stable_only("2");
    let e = store
        .update_rollout(
            r.id,
            &state,
            vec![event("m", "succeeded")],
            Some(event("m", "route_changed")),
            old,
        )
        .unwrap_err();
    match &e {
        StoreError::Fenced {
            term: t,
            newer,
            holder,
        } => {
            assert_eq!((*t, *newer, holder.as_str()), (term - 1, term, "me"));
        }
        other => panic!("not refused by fencing: {other}"),
    }
    let e = store
        .set_rollout_report(r.id, &serde_json::json!({}), old)
        .unwrap_err();
    assert!(matches!(e, StoreError::Fenced { .. }), "{e}");
    let stored = store.rollout(r.id).unwrap().unwrap();
    assert_eq!(
        (stored.state, stored.report),
        (r.state.clone(), None),
        "nothing applied"
    );
    assert_eq!(kinds(&*store, "m"), events, "no event");
    assert_eq!(store.route("m").unwrap(), None, "no route");
    assert_eq!(
        store.route_version().unwrap(),
        version,
        "no change of what serves"
    );
    store
        .update_rollout(
            r.id,
            &state,
            vec![event("m", "succeeded")],
            Some(event("m", "route_changed")),
            Fence::Term(term),
        )
        .unwrap();
    store
        .set_rollout_report(r.id, &serde_json::json!({}), Fence::Unfenced)
        .unwrap();
    assert_eq!(store.route("m").unwrap(), Some(state.route));
}
