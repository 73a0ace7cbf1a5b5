//! Each service's OpenAPI 3.1 document, built from its code: the routes are
//! registered through `utoipa_axum`'s `OpenApiRouter`, so a route exists in the
//! router exactly when its operation is in the document, and the document is
//! served at `GET /openapi.json` next to the probes (documented here too).
//!
//! Every 4xx and 5xx answer is `application/problem+json` ([`ProblemDetails`]).

use std::sync::Arc;

use axum::{Extension, Json, response::IntoResponse};
use utoipa::{
    ToSchema,
    openapi::{OpenApi, Server, info::LicenseBuilder},
};
use utoipa_axum::{router::OpenApiRouter, routes};

/// The media type of every error answer (RFC 9457).
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An error answer (RFC 9457): what went wrong, and for invalid input which
/// field and why.
#[derive(Debug, ToSchema)]
#[schema(as = Problem)]
pub struct ProblemDetails {
    /// Always `about:blank`: the status says what kind of problem it is.
    pub r#type: String,
    /// The status code's reason phrase, e.g. `Unprocessable Entity`.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What is wrong, in one sentence a client can show.
    pub detail: String,
    /// One entry per invalid field (422 only).
    #[schema(nullable = false)]
    pub errors: Option<Vec<crate::problem::FieldError>>,
}

/// The finished document of service `name`: its info, the operations of its
/// routes and of the probes.
pub fn document(name: &str, description: &str, mut api: OpenApi) -> OpenApi {
    api.info.title = name.to_owned();
    api.info.version = env!("CARGO_PKG_VERSION").to_owned();
    api.info.description = Some(description.to_owned());
    api.info.license = Some(
        LicenseBuilder::new()
            .name("MIT OR Apache-2.0")
            .identifier(Some("MIT OR Apache-2.0"))
            .build(),
    );
    api.info.contact = None;
    // Relative: the document is served by the service it describes.
    api.servers = Some(vec![Server::new("/")]);
    // Operations that need a token say so themselves ([`require_bearer`]);
    // the others need none.
    api.security = Some(Vec::new());
    api
}

/// The name of the bearer-token security scheme.
pub const BEARER: &str = "bearer";

/// Marks every operation of `api` as needing a bearer token (JWT): the
/// security scheme, the requirement, and a 401 answer with its challenge.
pub fn require_bearer(api: &mut OpenApi) {
    use utoipa::openapi::{
        ContentBuilder, Ref, ResponseBuilder, Type,
        header::HeaderBuilder,
        schema::ObjectBuilder,
        security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme},
    };
    let components = api.components.get_or_insert_with(Default::default);
    components.security_schemes.insert(
        BEARER.to_owned(),
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .description(Some(
                    "A JWT (RS256 or ES256) from the issuer the service trusts (AUTH_ISSUER, \
                     AUTH_AUDIENCE); `sub` is the customer, `scope` may hold `stock:write` and `ops`",
                ))
                .build(),
        )
        .into(),
    );
    let unauthorized = ResponseBuilder::new()
        .description("No bearer token, or one that is not valid (expired, wrong issuer or audience, unknown key, bad signature)")
        .content(
            PROBLEM_JSON,
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .header(
            "WWW-Authenticate",
            HeaderBuilder::new()
                .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                .description(Some("`Bearer realm=\"shop\"`, with `error=\"invalid_token\"` for a token that is not valid"))
                .build(),
        )
        .build();
    for item in api.paths.paths.values_mut() {
        let operations = [
            item.get.as_mut(),
            item.put.as_mut(),
            item.post.as_mut(),
            item.delete.as_mut(),
            item.patch.as_mut(),
        ];
        for operation in operations.into_iter().flatten() {
            operation.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
            operation
                .responses
                .responses
                .insert("401".to_owned(), unauthorized.clone().into());
        }
    }
}

/// `GET /openapi.json`, documented: serves the document [`serve`] attaches.
pub fn router<S: Clone + Send + Sync + 'static>() -> OpenApiRouter<S> {
    OpenApiRouter::new().routes(routes!(openapi_json))
}

/// `router` with the document its `/openapi.json` serves.
pub fn serve(router: axum::Router, api: OpenApi) -> axum::Router {
    router.layer(Extension(Arc::new(api)))
}

/// This document: every operation of the service, its schemas and errors.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document of this service", content_type = "application/json"))
)]
async fn openapi_json(Extension(api): Extension<Arc<OpenApi>>) -> impl IntoResponse {
    Json(api.as_ref().clone())
}
