//! Errors at the HTTP edge as `application/problem+json` (RFC 9457), and request
//! extractors whose rejections say what is wrong and where: a client never gets a
//! bare 400/500 without a reason.

use axum::{
    Json,
    extract::{
        FromRequest, FromRequestParts, Path, Query, Request,
        rejection::{JsonRejection, PathRejection, QueryRejection},
    },
    http::{StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
};
use serde::{Serialize, de::DeserializeOwned};

/// One problem with the request, pointing at the field when there is one.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

#[derive(Clone, Debug)]
pub struct Problem {
    pub status: StatusCode,
    pub detail: String,
    pub errors: Vec<FieldError>,
    /// `WWW-Authenticate` of a 401 or 403 (RFC 6750).
    pub challenge: Option<String>,
}

impl Problem {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self {
            status,
            detail: detail.into(),
            errors: Vec::new(),
            challenge: None,
        }
    }

    /// With a `WWW-Authenticate` challenge.
    #[must_use]
    pub fn with_challenge(mut self, challenge: String) -> Self {
        self.challenge = Some(challenge);
        self
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, detail)
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, detail)
    }

    /// 422 with one error per invalid field.
    pub fn invalid(errors: Vec<FieldError>) -> Self {
        let detail = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            detail,
            errors,
            challenge: None,
        }
    }

    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::invalid(vec![FieldError {
            field: field.into(),
            message: message.into(),
        }])
    }

    /// An unexpected failure: logged in full, answered opaquely.
    pub fn internal(error: &dyn std::fmt::Display) -> Self {
        tracing::error!(%error, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; see the service log",
        )
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, detail)
    }
}

impl From<sqlx::Error> for Problem {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                tracing::error!(%error, "database unavailable");
                Self::unavailable("the database is unavailable; try again")
            }
            _ => Self::internal(&error),
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    r#type: &'static str,
    title: &'a str,
    status: u16,
    detail: &'a str,
    #[serde(skip_serializing_if = "<[FieldError]>::is_empty")]
    errors: &'a [FieldError],
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = Body {
            r#type: "about:blank",
            title: self.status.canonical_reason().unwrap_or("Error"),
            status: self.status.as_u16(),
            detail: &self.detail,
            errors: &self.errors,
        };
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            json,
        )
            .into_response();
        if let Some(challenge) = self.challenge {
            // A challenge that is no header value still says "Bearer".
            let value = axum::http::HeaderValue::from_str(&challenge).unwrap_or_else(|_| {
                tracing::error!(challenge, "a WWW-Authenticate challenge is no header value");
                axum::http::HeaderValue::from_static("Bearer realm=\"shop\"")
            });
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }
}

/// A JSON body; rejections become problems (415 wrong content type, 413 too
/// large, 400 malformed JSON, 422 a field of the wrong type, missing or unknown).
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_problem(&rejection)),
        }
    }
}

fn json_problem(rejection: &JsonRejection) -> Problem {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected a body with Content-Type: application/json",
        ),
        JsonRejection::JsonSyntaxError(e) => {
            Problem::bad_request(format!("malformed JSON: {}", source_text(e)))
        }
        JsonRejection::JsonDataError(e) => {
            // "items[0].quantity: invalid value: integer `-1`, expected u32 at line 1 column 40"
            let text = source_text(e);
            match text.split_once(": ") {
                Some((path, message)) if !path.contains(' ') && path != "." => {
                    Problem::field(path, message)
                }
                _ => Problem::field("body", text),
            }
        }
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
        }
        other => Problem::new(other.status(), other.body_text()),
    }
}

/// The innermost error's text (serde's message with the path), not axum's prefix.
fn source_text(error: &dyn std::error::Error) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

/// Path parameters; a rejection is a 400 naming the parameter.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        refuse_nul("path", parts.uri.path())?;
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| Self(v))
            .map_err(|e: PathRejection| {
                Problem::bad_request(format!("invalid path: {}", e.body_text()))
            })
    }
}

/// Query parameters; a rejection is a 400 saying which parameter is wrong.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        refuse_nul("query", parts.uri.query().unwrap_or_default())?;
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| Self(v))
            .map_err(|e: QueryRejection| {
                Problem::bad_request(format!("invalid query: {}", source_text(&e)))
            })
    }
}

/// A NUL character (`%00`) can be in no text PostgreSQL stores or compares:
/// refused up front with a 400, not failed in the database with a 500.
fn refuse_nul(part: &str, raw: &str) -> Result<(), Problem> {
    if raw.contains("%00") {
        return Err(Problem::bad_request(format!(
            "invalid {part}: must not contain NUL characters (%00)"
        )));
    }
    Ok(())
}

/// A UUID taken from the path, e.g. `path_uuid("order id", raw)`; anything else
/// is a 400 quoting (the start of) what came.
pub fn path_uuid(what: &str, raw: &str) -> Result<uuid::Uuid, Problem> {
    uuid::Uuid::parse_str(raw).map_err(|_| {
        Problem::bad_request(format!(
            "{what} '{}' is not a UUID",
            raw.chars().take(64).collect::<String>()
        ))
    })
}

/// Answers unknown routes with a problem instead of an empty 404.
pub async fn not_found() -> Problem {
    Problem::not_found("no such resource")
}
