//! The services' HTTP APIs as shopctl reads them.

use std::time::Duration;

use serde_json::Value;

use crate::Error;

#[derive(Debug)]
pub struct Api {
    http: reqwest::Client,
    /// Sent as `Authorization: Bearer` (see `crate::token::for_calls`).
    token: Option<String>,
}

impl Api {
    pub fn new(cli: &crate::Cli) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))?;
        let token = crate::token::for_calls(cli)?;
        Ok(Self { http, token })
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, url);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// The JSON at `url`; `None` when the service says it has no such resource.
    pub async fn get(&self, service: &'static str, url: &str) -> Result<Option<Value>, Error> {
        self.send(service, url, self.request(reqwest::Method::GET, url))
            .await
    }

    /// PUTs `body` as JSON to `url`; the answer's JSON.
    pub async fn put(
        &self,
        service: &'static str,
        url: &str,
        body: &Value,
    ) -> Result<Value, Error> {
        let request = self.request(reqwest::Method::PUT, url).json(body);
        self.send(service, url, request)
            .await?
            .ok_or_else(|| Error::Http {
                service,
                url: url.to_owned(),
                status: 404,
                detail: "not found".to_owned(),
            })
    }

    async fn send(
        &self,
        service: &'static str,
        url: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<Option<Value>, Error> {
        let response = request.send().await.map_err(|e| Error::Unreachable {
            service,
            url: url.to_owned(),
            reason: reason(&e),
        })?;
        let status = response.status();
        // The services answer an unknown id with a problem document; a bare 404
        // is another server, or a path this version of the service lacks.
        let problem = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/problem+json"));
        if status == reqwest::StatusCode::NOT_FOUND && problem {
            return Ok(None);
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(Error::Http {
                service,
                url: url.to_owned(),
                status: 404,
                detail: "not a shop service's answer (check the URL)".to_owned(),
            });
        }
        let body: Value = response.json().await.map_err(|e| Error::Http {
            service,
            url: url.to_owned(),
            status: status.as_u16(),
            detail: format!("not JSON: {e}"),
        })?;
        if !status.is_success() {
            let mut detail = body
                .get("detail")
                .or_else(|| body.get("title"))
                .and_then(Value::as_str)
                .unwrap_or("no detail")
                .to_owned();
            if status == reqwest::StatusCode::UNAUTHORIZED
                || status == reqwest::StatusCode::FORBIDDEN
            {
                detail.push_str(if self.token.is_some() {
                    " (SHOP_TOKEN must be an operator's token: scope ops, and stock:write to set stock)"
                } else {
                    " (set SHOP_TOKEN to an operator's token, e.g. from `shopctl token --sub you --scope ops`)"
                });
            }
            return Err(Error::Http {
                service,
                url: url.to_owned(),
                status: status.as_u16(),
                detail,
            });
        }
        Ok(Some(body))
    }

    /// Every item of a paginated list (`{"items": [...], "next": cursor}`), up
    /// to `limit`.
    pub async fn list(
        &self,
        service: &'static str,
        url: &str,
        limit: usize,
    ) -> Result<Vec<Value>, Error> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut page_url = reqwest::Url::parse(url)
                .map_err(|e| Error::Config(format!("invalid {service} URL {url}: {e}")))?;
            if let Some(c) = &cursor {
                page_url.query_pairs_mut().append_pair("cursor", c);
            }
            let page_url = page_url.to_string();
            let page = self.get(service, &page_url).await?.unwrap_or(Value::Null);
            if let Some(page_items) = page.get("items").and_then(Value::as_array) {
                items.extend(page_items.iter().cloned());
            }
            cursor = page.get("next").and_then(Value::as_str).map(str::to_owned);
            if cursor.is_none() || items.len() >= limit {
                items.truncate(limit);
                return Ok(items);
            }
        }
    }
}

/// The innermost cause: "connection refused", not "error sending request".
fn reason(error: &reqwest::Error) -> String {
    let mut source: &dyn std::error::Error = error;
    while let Some(next) = source.source() {
        source = next;
    }
    if error.is_timeout() {
        "no answer within 10 s".to_owned()
    } else {
        source.to_string()
    }
}
