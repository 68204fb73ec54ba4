//! The controller's I/O on behalf of analysis and people: fetching external
//! checks (webhook, Prometheus) for an analysis window, and telling `notify`
//! webhooks about rollout events (bounded retries, never blocking a rollout).

use std::time::Duration;

use serde_json::{Value, json};

use super::outbound::AllowList;
use crate::analysis::{External, Outcome};
use crate::metrics::Summary;
use crate::records::EventKind;
use crate::spec::Check;
use crate::store::RolloutRecord;
use crate::strategy::PlannedEvent;

const TIMEOUT: Duration = Duration::from_secs(2);

/// Fetches every external check of the window, in order.
pub async fn fetch(
    http: &reqwest::Client,
    allowed: Option<&AllowList>,
    record: &RolloutRecord,
    checks: &[Check],
    candidate: &Summary,
    stable: &Summary,
) -> Vec<External> {
    let mut out = Vec::new();
    for check in checks {
        // Checked again as it is sent: a spec stored before --allow-outbound
        // was set must not reach other hosts either.
        if let Check::Webhook { url } | Check::Prometheus { address: url, .. } = check
            && let Some(a) = allowed.filter(|a| !a.allows(url))
        {
            out.push(External::Unavailable(a.refusal("analysis check", url)));
            continue;
        }
        match check {
            Check::Metric { .. } => {}
            Check::Webhook { url } => out.push(webhook(http, url, record, candidate, stable).await),
            Check::Prometheus { address, query, .. } => {
                out.push(prometheus(http, address, query).await)
            }
        }
    }
    out
}

async fn webhook(
    http: &reqwest::Client,
    url: &str,
    record: &RolloutRecord,
    candidate: &Summary,
    stable: &Summary,
) -> External {
    let context = json!({
        "model": record.model,
        "rollout": record.name(),
        "candidate": {"version": record.spec.version, "metrics": candidate},
        "stable": {"version": record.state.route.stable, "metrics": stable},
    });
    let answer = async {
        let r = http
            .post(url)
            .timeout(TIMEOUT)
            .json(&context)
            .send()
            .await
            .map_err(|e| cause(&e))?;
        if !r.status().is_success() {
            return Err(format!("answered {}", r.status()));
        }
        r.json::<Value>()
            .await
            .map_err(|e| format!("answered something other than JSON: {e}"))
    }
    .await;
    match answer {
        Err(e) => External::Unavailable(format!("webhook check {url}: {e}")),
        Ok(v) => {
            let reason = v["reason"].as_str().unwrap_or("").to_string();
            match v["result"].as_str() {
                Some("pass") => External::Verdict(
                    Outcome::Pass,
                    format!("webhook passed {reason}").trim().into(),
                ),
                Some("fail") => External::Verdict(
                    Outcome::Fail,
                    format!("webhook {url} failed the window: {reason}"),
                ),
                Some("inconclusive") => External::Verdict(
                    Outcome::Inconclusive,
                    format!("webhook inconclusive {reason}").trim().into(),
                ),
                _ => External::Unavailable(format!(
                    "webhook check {url} answered {v}; expected {{\"result\": \"pass\" | \"fail\" | \"inconclusive\"}}"
                )),
            }
        }
    }
}

async fn prometheus(http: &reqwest::Client, address: &str, query: &str) -> External {
    let url = format!("{}/api/v1/query", address.trim_end_matches('/'));
    let check = format!("prometheus check {query:?} at {address}");
    let answer = async {
        let r = http
            .get(&url)
            .query(&[("query", query)])
            .timeout(TIMEOUT)
            .send()
            .await
            .map_err(|e| cause(&e))?;
        let status = r.status();
        r.json::<Value>().await.map_err(|e| {
            format!(
                "{url} answered {status} with something other than Prometheus' JSON: {}",
                cause(&e)
            )
        })
    }
    .await;
    let v = match answer {
        Ok(v) => v,
        Err(e) => return External::Unavailable(format!("{check}: {e}")),
    };
    if v["status"] != "success" {
        return External::Unavailable(format!(
            "{check}: the query failed: {}",
            v["error"].as_str().unwrap_or("no reason given")
        ));
    }
    let data = &v["data"];
    let value = match data["resultType"].as_str() {
        Some("scalar") => data["result"][1].as_str(),
        Some("vector") => data["result"][0]["value"][1].as_str(),
        _ => None,
    };
    match value.and_then(|s| s.parse::<f64>().ok()) {
        Some(x) if x.is_finite() => External::Value(x),
        _ => External::Unavailable(format!(
            "{check}: the query returned no single number (it must yield one scalar or one series): {data}"
        )),
    }
}

/// What went wrong with a request, down to the root cause: reqwest's own
/// message ("error sending request for url …") says only where it failed.
fn cause(e: &reqwest::Error) -> String {
    // The URL without its query: the check's message names the query once.
    let url = e.url().map(|u| {
        let mut u = u.clone();
        u.set_query(None);
        u
    });
    let mut text = match url {
        Some(url) if e.is_timeout() => format!("no answer from {url} within {TIMEOUT:?}"),
        Some(url) if e.is_connect() => format!("cannot connect to {url}"),
        Some(url) => format!("request to {url} failed"),
        None => "request failed".to_string(),
    };
    let mut source = std::error::Error::source(e);
    let mut last = String::new();
    while let Some(inner) = source {
        let message = inner.to_string();
        // hyper and the OS often repeat the same cause at two levels.
        if message != last {
            text.push_str(": ");
            text.push_str(&message);
        }
        last = message;
        source = inner.source();
    }
    text
}

/// The event kinds sent when `notify` names none.
const DEFAULT_EVENTS: &[EventKind] = &[
    EventKind::Succeeded,
    EventKind::Aborted,
    EventKind::Failed,
    EventKind::RolledBack,
];

/// Posts each event to the rollout's notify webhooks that want it, in the
/// background, with up to three tries each.
pub fn notify(
    http: &reqwest::Client,
    allowed: Option<&AllowList>,
    record: &RolloutRecord,
    events: &[PlannedEvent],
) {
    for n in &record.spec.notify {
        if let Some(a) = allowed.filter(|a| !a.allows(&n.url)) {
            if !events.is_empty() {
                tracing::warn!("notify not sent: {}", a.refusal("notify url", &n.url));
            }
            continue;
        }
        for e in events {
            let wanted = if n.events.is_empty() {
                DEFAULT_EVENTS.contains(&e.kind)
            } else {
                n.events.iter().any(|k| k == e.kind.as_str())
            };
            if !wanted {
                continue;
            }
            let body = json!({
                "model": record.model, "rollout": record.name(), "strategy": record.kind,
                "version": record.spec.version, "kind": e.kind, "message": e.message,
                "at": crate::units::now_rfc3339(),
            });
            let (http, url) = (http.clone(), n.url.clone());
            tokio::spawn(async move {
                for attempt in 0..3u32 {
                    if attempt > 0 {
                        tokio::time::sleep(Duration::from_millis(500 * 2u64.pow(attempt))).await;
                    }
                    match http.post(&url).timeout(TIMEOUT).json(&body).send().await {
                        Ok(r) if r.status().is_success() => return,
                        Ok(r) => tracing::warn!(
                            "notify {url}: answered {} (try {})",
                            r.status(),
                            attempt + 1
                        ),
                        Err(e) => {
                            tracing::warn!("notify {url}: {} (try {})", cause(&e), attempt + 1)
                        }
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::RoutePolicy;
    use crate::spec::{Condition, RolloutSpec};

    /// An unreachable Prometheus is named (query and address) with the root
    /// cause, not only reqwest's "error sending request for url".
    #[tokio::test]
    async fn an_unreachable_check_says_which_and_why() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let query = "sum(rate(checkout_failures[1m]))";
        let External::Unavailable(why) = prometheus(&reqwest::Client::new(), &closed, query).await
        else {
            panic!("a closed port answered")
        };
        assert!(why.contains(query) && why.contains(&closed), "{why}");
        assert!(why.to_lowercase().contains("connection refused"), "{why}");
    }

    /// A spec stored before `--allow-outbound` was set still names its
    /// hosts: each call is checked as it is sent, and one off the list is
    /// not made (the window sees the check as unavailable, saying why).
    #[tokio::test]
    async fn checks_off_the_allow_list_are_not_called() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let off_list = format!("http://{}", listener.local_addr().unwrap());
        let allowed = AllowList::parse("hooks.example.com").unwrap();
        let spec =
            RolloutSpec::from_yaml("model: m\nversion: \"2\"\nstrategy: { basic: {} }").unwrap();
        let record = RolloutRecord {
            id: 1,
            model: "m".into(),
            kind: crate::strategy::RolloutKind::Basic,
            spec,
            state: crate::strategy::initial_state(&RoutePolicy::stable_only("1"), 0),
            undoes: None,
            report: None,
            created_at: String::new(),
            updated_at: String::new(),
        };
        let checks = [
            Check::Webhook {
                url: format!("{off_list}/judge"),
            },
            Check::Prometheus {
                address: off_list.clone(),
                query: "up".into(),
                condition: Condition::Max(1.0),
            },
        ];
        let none = Summary::default();
        let out = fetch(
            &reqwest::Client::new(),
            Some(&allowed),
            &record,
            &checks,
            &none,
            &none,
        )
        .await;
        assert_eq!(out.len(), 2);
        for e in out {
            let External::Unavailable(reason) = e else {
                panic!("{e:?}")
            };
            assert!(
                reason.contains("--allow-outbound does not list"),
                "{reason}"
            );
        }
        assert!(
            listener.accept().is_err(),
            "nothing connected to the host off the list"
        );
    }
}
