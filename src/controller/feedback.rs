//! Delayed labels across instances: a label posted to an instance that did
//! not answer the request (its id unknown here) is passed to the other live
//! instances — each is asked at its advertised URL, on the same feedback
//! endpoint, with the caller's own credentials and a header that says it
//! was forwarded (so it is never passed on again). The instance that
//! answered the request labels it as if the label had been posted there:
//! one label per id (its memory says so), counted into its own bucket of
//! the version that answered, which it flushes like any other. Nothing of
//! this touches the inference path.

use std::time::Duration;

use super::Controller;
use super::cluster::LIVE_WITHIN;

/// The header a forwarded label carries: the id of the instance that
/// forwarded it. An instance that receives it answers from its own memory.
pub const FORWARDED: &str = "x-ferry-forwarded-by";
/// How long the others are given to answer (asked all at once).
pub const ASK_WITHIN: Duration = Duration::from_secs(2);

/// Another instance's answer to a forwarded label.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerAnswer {
    /// The instance that answered, by id.
    pub instance: String,
    pub status: u16,
    pub body: Vec<u8>,
}

/// What asking the other instances came to.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Asked {
    /// The answer to return: the instance that knew the id (200, or 409
    /// when it was already labelled or shared), if one did.
    pub answer: Option<PeerAnswer>,
    /// Instances that could not be asked, with why.
    pub unreachable: Vec<String>,
}

/// Sorts the others' answers: the one that knew the id — a label taken
/// (2xx) before a refusal (409: already labelled, or the id answered more
/// than one request) — is the answer; a 404 is "not here"; anything else
/// (a 401 when the instances do not share their tokens, a 5xx) means that
/// instance could not be asked, and says why.
pub fn decisive(answers: Vec<PeerAnswer>) -> Asked {
    let mut asked = Asked::default();
    for a in answers {
        match a.status {
            200..=299 | 409 => {
                let better = asked.answer.as_ref().is_none_or(|b| b.status == 409);
                if better {
                    asked.answer = Some(a);
                }
            }
            404 => {}
            status => {
                let said = String::from_utf8_lossy(&a.body)
                    .chars()
                    .take(300)
                    .collect::<String>();
                let hint = match status {
                    401 | 403 => {
                        " (give every instance the same admin token and --feedback-token-file)"
                    }
                    _ => "",
                };
                asked
                    .unreachable
                    .push(format!("{} answered {status}{hint}: {said}", a.instance));
            }
        }
    }
    asked
}

impl Controller {
    /// Asks every other live instance to take the label `body` for a
    /// request of `model` this instance does not know (see the module
    /// doc), with the caller's `authorization`. Bounded by [`ASK_WITHIN`].
    pub async fn label_elsewhere(
        &self,
        model: &str,
        body: Vec<u8>,
        authorization: Option<String>,
    ) -> Asked {
        let Some(me) = self.me.get() else {
            return Asked::default();
        };
        // A store call blocks its thread: off the serving thread.
        let store = self.registry.store().clone();
        if !store.keeps_buckets() {
            return Asked::default(); // an embedded store: one instance
        }
        let read = tokio::task::spawn_blocking(move || store.instances()).await;
        let others = match read.map_err(|e| e.to_string()) {
            Ok(Ok(records)) => records,
            Ok(Err(e)) => return unknown_peers(e.to_string()),
            Err(e) => return unknown_peers(e),
        };
        let live_since = crate::units::now_ms().saturating_sub(LIVE_WITHIN.as_millis() as u64);
        let asks = others
            .into_iter()
            .filter(|i| i.last_seen_ms >= live_since && i.report.id != me.id)
            .map(|i| (i.report.id, i.report.url))
            .map(|(id, url)| {
                // Model names are checked (`check_name`): nothing to escape.
                let url = format!("{}/v2/models/{model}/feedback", url.trim_end_matches('/'));
                let mut req = self
                    .http
                    .control
                    .post(&url)
                    .timeout(ASK_WITHIN)
                    .header(FORWARDED, &me.id)
                    .header("content-type", "application/json")
                    .body(body.clone());
                if let Some(auth) = &authorization {
                    req = req.header("authorization", auth);
                }
                async move {
                    let answer = async {
                        let resp = req.send().await?;
                        let status = resp.status().as_u16();
                        Ok::<_, reqwest::Error>((status, resp.bytes().await?.to_vec()))
                    };
                    match answer.await {
                        Ok((status, body)) => Ok(PeerAnswer {
                            instance: id,
                            status,
                            body,
                        }),
                        // Sent but not answered in time: the label may
                        // have reached it (a paused instance takes it when
                        // it runs again).
                        Err(e) if e.is_timeout() => Err(format!(
                            "{id} ({url}) did not answer within {ASK_WITHIN:?}; if it answered that request, the label may have been recorded there: posting it again then says so (409)"
                        )),
                        Err(e) => Err(format!("{id} ({url}): {e}")),
                    }
                }
            });
        let mut pending: tokio::task::JoinSet<_> = asks.collect();
        let mut answers = Vec::new();
        let mut unreachable = Vec::new();
        while let Some(result) = pending.join_next().await {
            match result {
                Ok(Ok(a)) => answers.push(a),
                Ok(Err(why)) => unreachable.push(why),
                Err(e) => unreachable.push(e.to_string()),
            }
        }
        let mut asked = decisive(answers);
        asked.unreachable.extend(unreachable);
        asked
    }
}

/// Nobody could be asked: the store's instances table could not be read.
fn unknown_peers(why: String) -> Asked {
    Asked {
        answer: None,
        unreachable: vec![format!(
            "the other instances (the store could not be read: {why})"
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(instance: &str, status: u16) -> PeerAnswer {
        PeerAnswer {
            instance: instance.into(),
            status,
            body: vec![],
        }
    }

    #[test]
    fn the_instance_that_knew_the_id_answers() {
        let none = decisive(vec![answer("a", 404), answer("b", 404)]);
        assert_eq!(none, Asked::default());
        assert_eq!(decisive(vec![]), Asked::default());
        let taken = decisive(vec![answer("a", 409), answer("b", 200), answer("c", 404)]);
        assert_eq!(taken.answer.unwrap().instance, "b");
        let refused = decisive(vec![answer("a", 409), answer("b", 404)]);
        assert_eq!(refused.answer.unwrap().status, 409);
        // Another token there: that instance could not be asked, and why.
        let mut other_token = answer("c", 401);
        other_token.body = br#"{"error":"feedback needs a token"}"#.to_vec();
        let asked = decisive(vec![answer("a", 404), other_token]);
        assert_eq!(asked.answer, None);
        assert_eq!(
            asked.unreachable,
            vec![
                r#"c answered 401 (give every instance the same admin token and --feedback-token-file): {"error":"feedback needs a token"}"#
            ]
        );
    }
}
