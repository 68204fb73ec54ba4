//! Which hosts a rollout spec may make Ferry call (`ferry serve
//! --allow-outbound HOST[:PORT],...`): notify webhooks, webhook checks and
//! Prometheus addresses. Without the flag every host is allowed (as before);
//! with it, a spec naming another host is refused at apply time and every
//! call is checked again when it is sent (the HTTP client follows no
//! redirects, so an allowed host cannot send Ferry elsewhere).

use reqwest::Url;

use crate::spec::RolloutSpec;

/// One allowed host, on one port or any.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Allowed {
    host: String,
    port: Option<u16>,
}

/// The parsed `--allow-outbound` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    allowed: Vec<Allowed>,
    /// As given, for messages.
    text: String,
}

impl AllowList {
    /// Parses `HOST[:PORT],...` (`[::1]:9000` for IPv6); the error names
    /// the flag and the entry.
    pub fn parse(text: &str) -> Result<AllowList, String> {
        let mut allowed = Vec::new();
        for entry in text.split(',').map(str::trim) {
            let bad = |why: &str| {
                format!(
                    "--allow-outbound entry {entry:?} {why}; give HOST or HOST:PORT, separated by commas (e.g. hooks.example.com,127.0.0.1:9090)"
                )
            };
            if entry.is_empty() {
                return Err(bad("is empty"));
            }
            let url = Url::parse(&format!("http://{entry}"))
                .map_err(|e| bad(&format!("is not a host ({e})")))?;
            if url.path() != "/"
                || url.query().is_some()
                || !url.username().is_empty()
                || entry.contains('/')
            {
                return Err(bad("is not just a host and port"));
            }
            let host = url
                .host_str()
                .ok_or_else(|| bad("has no host"))?
                .to_string();
            allowed.push(Allowed {
                host,
                port: url.port(),
            });
        }
        Ok(AllowList {
            allowed,
            text: text.to_string(),
        })
    }

    /// Whether `url` names an allowed host (and port).
    pub fn allows(&self, url: &str) -> bool {
        let Ok(url) = Url::parse(url) else {
            return false;
        };
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
            return false;
        };
        self.allowed
            .iter()
            .any(|a| a.host == host && a.port.is_none_or(|p| p == port))
    }

    /// Why `url` (the spec's `field`) is refused.
    pub fn refusal(&self, field: &str, url: &str) -> String {
        format!(
            "{field} {url:?} names a host that --allow-outbound does not list (allowed: {}); use an allowed host or add it to the server's --allow-outbound",
            self.text
        )
    }

    /// Refuses a spec whose outbound URLs name a host not on the list.
    pub fn check_spec(&self, spec: &RolloutSpec) -> Result<(), String> {
        for (field, url) in outbound_urls(spec) {
            if !self.allows(&url) {
                return Err(self.refusal(&field, &url));
            }
        }
        Ok(())
    }
}

/// Every URL a spec makes Ferry call, with its field.
fn outbound_urls(spec: &RolloutSpec) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, n) in spec.notify.iter().enumerate() {
        out.push((format!("notify[{i}].url"), n.url.clone()));
    }
    for (i, c) in spec
        .analysis
        .iter()
        .flat_map(|a| a.checks.iter().enumerate())
    {
        if let Some(u) = &c.url {
            out.push((format!("analysis.checks[{i}].url"), u.clone()));
        }
        if let Some(a) = &c.address {
            out.push((format!("analysis.checks[{i}].address"), a.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_ports_are_matched() {
        let list = AllowList::parse("hooks.example.com, 127.0.0.1:9090,[::1]:80").unwrap();
        assert!(list.allows("http://hooks.example.com/a"));
        assert!(
            list.allows("http://HOOKS.example.com:8000/a"),
            "any port when none is given"
        );
        assert!(list.allows("http://127.0.0.1:9090"));
        assert!(
            !list.allows("http://127.0.0.1:8080/v2/health/live"),
            "another port"
        );
        assert!(!list.allows("http://127.0.0.2:9090"));
        assert!(list.allows("http://[::1]/x"), "port 80 is http's default");
        assert!(!list.allows("http://hooks.example.com.evil.net/"));
        assert!(!list.allows("http://user@evil.net/@hooks.example.com"));
        assert!(!list.allows("not a url"));
    }

    #[test]
    fn bad_entries_name_the_flag() {
        for bad in ["", "a,,b", "http://x", "x/y", "a b"] {
            let err = AllowList::parse(bad).unwrap_err();
            assert!(err.starts_with("--allow-outbound entry"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_spec_naming_another_host_is_refused_naming_the_field() {
        let list = AllowList::parse("127.0.0.1:9000").unwrap();
        let spec = |notify: &str, check: &str| {
            RolloutSpec::from_yaml(&format!(
                "model: m\nversion: \"2\"\nstrategy: {{ canary: {{ steps: [ {{ weight: 100 }} ] }} }}\nnotify: [ {{ url: \"{notify}\" }} ]\nanalysis: {{ checks: [ {check} ] }}"
            ))
            .unwrap()
        };
        let ok = "{ kind: webhook, url: \"http://127.0.0.1:9000/c\" }";
        list.check_spec(&spec("http://127.0.0.1:9000/n", ok))
            .unwrap();
        let err = list
            .check_spec(&spec(
                "http://127.0.0.1:8080/v2/repository/models/m/unload",
                ok,
            ))
            .unwrap_err();
        assert!(err.starts_with("notify[0].url \"http://127.0.0.1:8080/v2/repository/models/m/unload\" names a host that --allow-outbound does not list (allowed: 127.0.0.1:9000)"), "{err}");
        let err = list
            .check_spec(&spec(
                "http://127.0.0.1:9000/n",
                "{ kind: prometheus, address: \"http://10.0.0.1:9090\", query: q, max: 1 }",
            ))
            .unwrap_err();
        assert!(err.starts_with("analysis.checks[0].address"), "{err}");
    }
}
