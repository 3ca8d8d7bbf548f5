//! A small blocking client of the admin API, for the CLI commands that talk to a running
//! daemon (`list`, `stats`, `allow`, `deny`, `purge`, `explain --live`, `reload`).
//!
//! Answers are read into the types of `wire.rs`, the ones the daemon's handlers write: an
//! answer that does not fit is an error naming the path and the field, never a default.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::wire::ErrorBody;

/// Why a call to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens there: the caller may fall back to opening the store itself.
    #[error("no greygate daemon answers at {0}")]
    NotRunning(String),
    #[error("the daemon refused: {message} (HTTP {status})")]
    Refused { status: u16, message: String },
    #[error("talking to the daemon at {url} failed: {why}")]
    Failed { url: String, why: String },
    /// The request could not be encoded (a query struct that is not flat).
    #[error("cannot encode the request to {path}: {why}")]
    Unsendable { path: String, why: String },
    /// The daemon answered, but not in the shape this greygate reads (another version?).
    #[error("the daemon's answer to {path} cannot be read: {why}")]
    Unreadable { path: String, why: String },
}

/// Where the daemon's admin API is and the token for changes.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl AdminClient {
    pub fn new(base: &str, token: Option<String>, timeout: Duration) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        AdminClient {
            base: base.trim_end_matches('/').to_string(),
            token,
            agent,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// GET `path`, JSON answer.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::<()>::Get, path)
    }

    /// GET `path` with `query` (a flat struct of `wire.rs`; `None` fields are left out).
    pub fn get_query<Q: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        query: &Q,
    ) -> Result<T, ClientError> {
        self.call(Method::<()>::Get, &with_query(path, query)?)
    }

    /// POST `body` as JSON to `path`, JSON answer.
    pub fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::Post(body), path)
    }

    /// DELETE `path`, JSON answer.
    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::<()>::Delete, path)
    }

    /// DELETE `path` with `query`, as [`AdminClient::get_query`].
    pub fn delete_query<Q: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        query: &Q,
    ) -> Result<T, ClientError> {
        self.call(Method::<()>::Delete, &with_query(path, query)?)
    }

    /// GET `path` as text (for `/metrics`).
    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.agent.get(&url);
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut resp = req.call().map_err(|e| self.failed(&url, e))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| self.failed(&url, e))?;
        if status >= 400 {
            return Err(ClientError::Refused {
                status,
                message: text.trim().to_string(),
            });
        }
        Ok(text)
    }

    fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method<'_, B>,
        path: &str,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let result = match method {
            Method::Post(body) => {
                let mut r = self.agent.post(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send_json(body)
            }
            Method::Delete => {
                let mut r = self.agent.delete(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            Method::Get => {
                let mut r = self.agent.get(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
        };
        let mut resp = result.map_err(|e| self.failed(&url, e))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| self.failed(&url, e))?;
        read_answer(path, status, &text)
    }

    fn failed(&self, url: &str, e: ureq::Error) -> ClientError {
        let refused = match &e {
            ureq::Error::Io(io) => matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ),
            ureq::Error::ConnectionFailed => true,
            _ => false,
        };
        if refused {
            ClientError::NotRunning(self.base.clone())
        } else {
            ClientError::Failed {
                url: url.to_string(),
                why: e.to_string(),
            }
        }
    }
}

/// `path?query`, encoded by the crate axum's `Query` decodes with, so what the CLI writes
/// is what the handler reads.
fn with_query<Q: Serialize + ?Sized>(path: &str, query: &Q) -> Result<String, ClientError> {
    let q = serde_urlencoded::to_string(query).map_err(|e| ClientError::Unsendable {
        path: path.to_string(),
        why: e.to_string(),
    })?;
    Ok(if q.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{q}")
    })
}

/// A request's method, with the body a POST sends.
enum Method<'a, B: ?Sized> {
    Get,
    Post(&'a B),
    Delete,
}

/// Reads an answer: an error status becomes `Refused` with the API's message (or the text
/// when something in front of the API answered), a success the expected type or
/// `Unreadable`.
fn read_answer<T: DeserializeOwned>(path: &str, status: u16, text: &str) -> Result<T, ClientError> {
    if status >= 400 {
        let message = serde_json::from_str::<ErrorBody>(text)
            .map_or_else(|_| text.trim().to_string(), |b| b.error);
        return Err(ClientError::Refused { status, message });
    }
    serde_json::from_str(text).map_err(|e| ClientError::Unreadable {
        path: path.to_string(),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::wire::{EntriesQuery, LimitQuery, PurgeReport, StatsView};

    #[test]
    fn an_answer_missing_a_field_is_an_error_naming_the_path_and_the_field() {
        let e = read_answer::<PurgeReport>("/api/purge", 200, r#"{"removed":3}"#)
            .expect_err("complete is missing");
        let text = e.to_string();
        assert!(text.contains("/api/purge"), "{text}");
        assert!(text.contains("missing field `complete`"), "{text}");
        let e = read_answer::<StatsView>("/api/stats", 200, "not JSON").expect_err("not JSON");
        assert!(matches!(e, ClientError::Unreadable { .. }), "{e}");
    }

    #[test]
    fn queries_leave_out_what_is_not_given() {
        let q = EntriesQuery {
            client: Some("192.0.2.1".into()),
            cursor: Some("a b".into()),
            ..EntriesQuery::default()
        };
        assert_eq!(
            with_query("/api/entries", &q).expect("encode"),
            "/api/entries?client=192.0.2.1&cursor=a+b"
        );
        assert_eq!(
            with_query("/api/recent", &LimitQuery::default()).expect("encode"),
            "/api/recent"
        );
    }

    #[test]
    fn refusals_carry_the_api_message_or_the_text() {
        let e = read_answer::<PurgeReport>("/api/purge", 401, r#"{"error":"wrong admin token"}"#)
            .expect_err("refused");
        assert!(
            matches!(&e, ClientError::Refused { status: 401, message } if message == "wrong admin token"),
            "{e}"
        );
        let e = read_answer::<PurgeReport>("/nope", 404, "Not Found\n").expect_err("refused");
        assert!(
            matches!(&e, ClientError::Refused { status: 404, message } if message == "Not Found"),
            "{e}"
        );
    }
}
