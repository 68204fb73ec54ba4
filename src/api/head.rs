//! What a request's head must be before anything reads its body, on every
//! route (browsers and proxies are the reason):
//!
//! - exactly one `Host` (HTTP/1.1 requires it; two are a smuggling tell),
//!   and, on a loopback listener, a loopback name or one of `--allow-host`:
//!   a web page that rebinds its own DNS name to 127.0.0.1 (DNS rebinding)
//!   then cannot reach the server;
//! - no transfer coding but `chunked` (Ferry decodes no other, and must not
//!   read a gzip body as if it were plain);
//! - a browser request from another origin (it carries `Origin`) only when
//!   that origin is in `--allow-origin`: a page open on an operator's
//!   machine cannot post to inference or feedback (non-browser clients send
//!   no `Origin` and are not affected);
//! - an inference body declares a JSON (or binary extension) content type,
//!   or none: `text/plain` and `multipart/form-data` are what cross-origin
//!   forms send.
//!
//! Pure: [`HeadRules::check`] looks at the method, path and headers only.

use axum::http::{HeaderMap, Method, StatusCode, Version, header};

use super::ApiError;

/// Which hosts and origins a server accepts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeadRules {
    /// Check `Host` against loopback names and `allow_hosts` (a loopback
    /// listener); otherwise any `Host` is taken unless `allow_hosts` is set.
    pub loopback: bool,
    /// Extra host names (without port) accepted in `Host`.
    pub allow_hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`) whose browser requests are accepted,
    /// besides the server's own.
    pub allow_origins: Vec<String>,
}

impl HeadRules {
    /// Checks a request head; `inference` says whether its body will be
    /// decoded as a V2 request (inference and feedback).
    pub fn check(
        &self,
        method: &Method,
        version: Version,
        target_host: Option<&str>,
        headers: &HeaderMap,
        inference: bool,
    ) -> Result<(), ApiError> {
        let bad = |m: String| Err(ApiError::new(StatusCode::BAD_REQUEST, m));
        let mut hosts = headers.get_all(header::HOST).iter();
        let host = match (hosts.next(), hosts.next()) {
            (Some(h), None) => h.to_str().ok(),
            (None, _) if version == Version::HTTP_10 => None,
            (None, _) => return bad("HTTP/1.1 requests need a Host header".into()),
            (Some(_), Some(_)) => return bad("a request may carry only one Host header".into()),
        };
        // An absolute-form target (`POST http://name/…`) names the host too,
        // and wins over the Host header (RFC 9112 §3.2.2).
        if let Some(host) = host
            .into_iter()
            .chain(target_host)
            .find(|h| !self.host_allowed(h))
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "Host \"{}\" is not accepted by this server (it listens on loopback: use localhost or 127.0.0.1, or start it with --allow-host NAME)",
                    shown(host)
                ),
            ));
        }
        for te in headers.get_all(header::TRANSFER_ENCODING) {
            let te = te.to_str().unwrap_or("(not text)");
            if !te.trim().eq_ignore_ascii_case("chunked") {
                return Err(ApiError::new(
                    StatusCode::NOT_IMPLEMENTED,
                    format!(
                        "Transfer-Encoding \"{}\" is not supported: send the body plain or chunked",
                        shown(te)
                    ),
                ));
            }
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("(not text)");
            if !self.origin_allowed(origin, host) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "requests from web pages of origin \"{}\" are refused (a browser sent Origin); allow it with ferry serve --allow-origin ORIGIN",
                        shown(origin)
                    ),
                ));
            }
        }
        if inference && method == Method::POST {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap_or("(not text)"));
            if let Some(ct) = ct {
                let essence = ct.split(';').next().unwrap_or("").trim().as_bytes();
                if essence.eq_ignore_ascii_case(b"text/plain")
                    || essence
                        .get(..10)
                        .is_some_and(|p| p.eq_ignore_ascii_case(b"multipart/"))
                {
                    return Err(ApiError::new(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        format!(
                            "Content-Type \"{}\" is not a V2 request: send application/json (or application/octet-stream with Inference-Header-Content-Length)",
                            shown(ct)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn host_allowed(&self, host: &str) -> bool {
        if !self.loopback && self.allow_hosts.is_empty() {
            return true;
        }
        let name = host_name(host);
        (self.loopback && is_loopback_name(name))
            || self
                .allow_hosts
                .iter()
                .any(|a| a.eq_ignore_ascii_case(name))
    }

    fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        let origin = origin.trim_end_matches('/');
        // Same origin: the dashboard's own requests name the Host they went to.
        let own = origin
            .split_once("://")
            .is_some_and(|(_, authority)| host.is_some_and(|h| h.eq_ignore_ascii_case(authority)));
        own || self
            .allow_origins
            .iter()
            .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    }
}

/// The host name of a `Host` value, without its port (`[::1]:8080` → `::1`).
fn host_name(host: &str) -> &str {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    host.rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(name, _)| name)
}

fn is_loopback_name(name: &str) -> bool {
    name.eq_ignore_ascii_case("localhost")
        || name
            .len()
            .checked_sub(10)
            .and_then(|at| name.as_bytes().get(at..))
            .is_some_and(|end| end.eq_ignore_ascii_case(b".localhost"))
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A header value as an error message shows it: at most 64 characters.
fn shown(v: &str) -> String {
    v.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn check(rules: &HeadRules, pairs: &[(&'static str, &'static str)]) -> Result<(), u16> {
        rules
            .check(&Method::POST, Version::HTTP_11, None, &head(pairs), true)
            .map_err(|e| e.status.as_u16())
    }

    #[test]
    fn host_is_required_once_and_on_loopback_must_be_a_loopback_name() {
        let lo = HeadRules {
            loopback: true,
            allow_hosts: vec!["ferry.internal".into()],
            ..Default::default()
        };
        for ok in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:8080",
            "127.0.0.2",
            "[::1]:8080",
            "FERRY.internal:80",
            "app.localhost",
            "App.LocalHost:80",
        ] {
            assert_eq!(check(&lo, &[("host", ok)]), Ok(()), "{ok}");
        }
        for refused in [
            "evil.example",
            "evil.example:8080",
            "10.0.0.1",
            "localhost.evil.example",
            ".localhos",
            "evillocalhost",
        ] {
            assert_eq!(check(&lo, &[("host", refused)]), Err(403), "{refused}");
        }
        assert_eq!(check(&lo, &[]), Err(400));
        assert_eq!(
            check(&lo, &[("host", "localhost"), ("host", "localhost")]),
            Err(400)
        );
        // HTTP/1.0 may omit it.
        assert!(
            lo.check(
                &Method::GET,
                Version::HTTP_10,
                None,
                &HeaderMap::new(),
                false
            )
            .is_ok()
        );
        // An absolute-form target is checked like Host.
        let h = head(&[("host", "localhost")]);
        assert!(
            lo.check(
                &Method::GET,
                Version::HTTP_11,
                Some("evil.example"),
                &h,
                false
            )
            .is_err()
        );
        assert!(
            lo.check(
                &Method::GET,
                Version::HTTP_11,
                Some("127.0.0.1:80"),
                &h,
                false
            )
            .is_ok()
        );
        // A non-loopback listener takes any name unless told otherwise.
        let open = HeadRules::default();
        assert_eq!(check(&open, &[("host", "models.example.com")]), Ok(()));
    }

    #[test]
    fn only_chunked_transfer_coding_is_taken() {
        let r = HeadRules::default();
        assert_eq!(
            check(&r, &[("host", "h"), ("transfer-encoding", "chunked")]),
            Ok(())
        );
        for te in ["gzip, chunked", "gzip", "chunked, chunked", "identity"] {
            assert_eq!(
                check(&r, &[("host", "h"), ("transfer-encoding", te)]),
                Err(501),
                "{te}"
            );
        }
    }

    #[test]
    fn browser_requests_from_other_origins_are_refused() {
        let r = HeadRules {
            allow_origins: vec!["https://app.example".into()],
            ..Default::default()
        };
        let host = ("host", "127.0.0.1:8080");
        assert_eq!(
            check(&r, &[host, ("origin", "http://127.0.0.1:8080")]),
            Ok(())
        );
        assert_eq!(
            check(&r, &[host, ("origin", "https://app.example")]),
            Ok(())
        );
        assert_eq!(
            check(&r, &[host, ("origin", "http://evil.example")]),
            Err(403)
        );
        assert_eq!(check(&r, &[host, ("origin", "null")]), Err(403));
        // No Origin: curl, SDKs, load balancers.
        assert_eq!(check(&r, &[host]), Ok(()));
    }

    #[test]
    fn inference_bodies_must_not_be_form_or_text() {
        let r = HeadRules::default();
        let host = ("host", "h");
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "application/octet-stream",
            "application/x-www-form-urlencoded",
        ] {
            assert_eq!(check(&r, &[host, ("content-type", ok)]), Ok(()), "{ok}");
        }
        for refused in [
            "text/plain",
            "TEXT/PLAIN;charset=UTF-8",
            "multipart/form-data; boundary=x",
            "Multipart/Mixed",
        ] {
            assert_eq!(
                check(&r, &[host, ("content-type", refused)]),
                Err(415),
                "{refused}"
            );
        }
        assert_eq!(check(&r, &[host]), Ok(()), "no content type is fine");
    }
}
