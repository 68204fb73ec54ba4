//! `ferry cluster`: the instances sharing the server's store, live or
//! stale, the route version each serves beside the latest, their warm
//! versions and load failures; and the short per-instance lines `ferry
//! status` adds when there is more than one instance.

use reqwest::Method;

use super::client::Client;
use super::table;
use super::{Output, print_json};
use crate::controller::cluster::{ClusterView, InstanceView};

/// `ferry cluster [-o json]`.
pub async fn run(client: &Client, output: Output) -> anyhow::Result<()> {
    let (v, view): (_, ClusterView) = client
        .send_typed(client.request(Method::GET, "/api/v1/cluster"))
        .await?;
    match output {
        Output::Json => print_json(&v),
        Output::Human => outln!("{}", render(&view)),
    }
    Ok(())
}

fn state(i: &InstanceView) -> &'static str {
    match i.live {
        true => "live",
        false => "stale",
    }
}

/// The first columns of both tables: INSTANCE, URL, STATE, ROUTE VERSION.
fn where_it_is(i: &InstanceView, latest: i64) -> Vec<String> {
    vec![
        i.id.clone(),
        i.url.clone(),
        state(i).to_string(),
        served(i, latest),
    ]
}

/// `leader 3f1c0a9b2e7d (term 4) since …`, or that no instance leads now
/// (a failover under way); nothing before any instance led.
fn leader_line(view: &ClusterView) -> Option<String> {
    match (&view.leader, view.term) {
        (Some(id), Some(term)) => Some(format!(
            "leader {id} (term {term}) since {}",
            view.leader_since.as_deref().unwrap_or("-")
        )),
        (None, Some(term)) => Some(format!(
            "no leader: the lease of term {term} expired and no instance has taken it yet"
        )),
        _ => None,
    }
}

/// The whole table.
fn render(view: &ClusterView) -> String {
    let rows: Vec<Vec<String>> = view
        .instances
        .iter()
        .map(|i| {
            let mut row = where_it_is(i, view.route_version);
            row.push(if i.leader { "leader" } else { "-" }.into());
            row.extend([
                i.version.clone(),
                i.last_seen.clone(),
                match i.warm.is_empty() {
                    true => "-".into(),
                    false => i.warm.join(" "),
                },
            ]);
            row
        })
        .collect();
    let header = [
        "INSTANCE",
        "URL",
        "STATE",
        "ROUTE VERSION",
        "ROLE",
        "BUILD",
        "LAST SEEN",
        "WARM",
    ];
    let mut out = format!(
        "route version {} (the store's latest)\n",
        view.route_version
    );
    if let Some(line) = leader_line(view) {
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(&table::render(&header, &rows));
    for i in &view.instances {
        for f in &i.failures {
            out.push_str(&format!(
                "\n{} could not load {}: {}",
                i.id, f.version, f.reason
            ));
        }
    }
    out
}

/// `41 of 42` when behind the latest, else the version.
fn served(i: &InstanceView, latest: i64) -> String {
    match i.route_version < latest {
        true => format!("{} of {latest}", i.route_version),
        false => i.route_version.to_string(),
    }
}

/// What `ferry status` adds when more than one instance shares the store:
/// the route version each serves. Nothing for a single node (its output
/// stays as it was), nor when the server cannot say (an older server).
pub async fn status_lines(client: &Client) -> Option<String> {
    let (_, view): (_, ClusterView) = client
        .send_typed(client.request(Method::GET, "/api/v1/cluster"))
        .await
        .ok()?;
    instance_lines(&view)
}

fn instance_lines(view: &ClusterView) -> Option<String> {
    if view.instances.len() < 2 {
        return None;
    }
    let rows: Vec<Vec<String>> = view
        .instances
        .iter()
        .map(|i| where_it_is(i, view.route_version))
        .collect();
    Some(format!(
        "\ninstances (route version {}):\n{}",
        view.route_version,
        table::render(&["INSTANCE", "URL", "STATE", "ROUTE VERSION"], &rows)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, live: bool, route_version: i64) -> InstanceView {
        InstanceView {
            id: id.into(),
            url: format!("http://{id}:8080"),
            version: "0.1.0".into(),
            started_at: "2026-12-01T20:00:00.000Z".into(),
            last_seen: "2026-12-01T20:00:01.000Z".into(),
            live,
            leader: false,
            route_version,
            warm: vec!["m/1".into()],
            failures: vec![],
        }
    }

    #[test]
    fn status_adds_instances_only_when_there_are_several() {
        let one = ClusterView {
            leader: None,
            term: None,
            leader_since: None,
            route_version: 4,
            instances: vec![instance("a", true, 4)],
        };
        assert_eq!(
            instance_lines(&one),
            None,
            "a single node's status is unchanged"
        );
        let three = ClusterView {
            leader: None,
            term: None,
            leader_since: None,
            route_version: 4,
            instances: vec![
                instance("a", true, 4),
                instance("b", true, 3),
                instance("c", false, 1),
            ],
        };
        assert_eq!(
            instance_lines(&three).unwrap(),
            "\ninstances (route version 4):\n\
             INSTANCE  URL            STATE  ROUTE VERSION\n\
             a         http://a:8080  live   4\n\
             b         http://b:8080  live   3 of 4\n\
             c         http://c:8080  stale  1 of 4"
        );
    }

    #[test]
    fn the_table_says_who_could_not_load_what() {
        let mut b = instance("b", true, 4);
        b.failures.push(crate::records::LoadFailure {
            version: "m/2".into(),
            reason: "warm-up failed".into(),
        });
        let view = ClusterView {
            leader: None,
            term: None,
            leader_since: None,
            route_version: 4,
            instances: vec![instance("a", true, 4), b],
        };
        let out = render(&view);
        assert!(
            out.starts_with("route version 4 (the store's latest)\nINSTANCE"),
            "{out}"
        );
        assert!(
            out.ends_with("\nb could not load m/2: warm-up failed"),
            "{out}"
        );
    }

    #[test]
    fn the_table_names_the_leader_its_term_and_since_when() {
        let mut a = instance("a", true, 4);
        a.leader = true;
        let mut view = ClusterView {
            leader: Some("a".into()),
            term: Some(3),
            leader_since: Some("2026-12-01T20:00:00.000Z".into()),
            route_version: 4,
            instances: vec![a, instance("b", true, 4)],
        };
        let out = render(&view);
        assert!(
            out.starts_with(
                "route version 4 (the store's latest)\nleader a (term 3) since 2026-12-01T20:00:00.000Z\nINSTANCE"
            ),
            "{out}"
        );
        assert!(out.contains(" live   4              leader "), "{out}");
        view.leader = None;
        view.instances[0].leader = false;
        assert!(
            render(&view).contains("\nno leader: the lease of term 3 expired"),
            "{}",
            render(&view)
        );
    }
}
