//! A small blocking client of the admin API, for the CLI commands that talk to a running
//! daemon (`list`, `stats`, `allow`, `deny`, `purge`, `explain --live`, `reload`).

use std::time::Duration;

use serde_json::Value;

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

    /// GET `path` (with its query), JSON answer.
    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call("GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call("POST", path, Some(body))
    }

    pub fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.call("DELETE", path, None)
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

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let result = match (method, body) {
            ("POST", body) => {
                let mut r = self.agent.post(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send_json(body.unwrap_or(&Value::Null))
            }
            ("DELETE", _) => {
                let mut r = self.agent.delete(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            _ => {
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
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status >= 400 {
            let message = value
                .get("error")
                .and_then(Value::as_str)
                .map_or_else(|| value.to_string(), str::to_string);
            return Err(ClientError::Refused { status, message });
        }
        Ok(value)
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
