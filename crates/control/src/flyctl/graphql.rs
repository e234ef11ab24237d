//! `POST /graphql`: a GraphQL request (query, operationName, variables) run against
//! [`super::schema`], answered with a standard GraphQL response (`data`, `errors`) and
//! status 200, bad queries included; only a body that is not a GraphQL request is a 400.
//!
//! A query Aloft cannot answer (a field, argument or type of Fly's schema that Aloft
//! does not implement) fails validation with an error naming it; the log says which
//! operation sent it (flyctl's genqlient operations are named, fly-go's are anonymous,
//! so the query itself is logged too) and which client.

use std::sync::Arc;

use axum::Json;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};

use super::schema::{Auth, FlySchema, RequestHost};
use crate::ControlPlane;
use crate::auth::authenticate;

/// How much of an anonymous query the log shows.
const LOGGED_QUERY_CHARS: usize = 600;

pub async fn serve(
    schema: FlySchema,
    plane: Arc<ControlPlane>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request: async_graphql::Request = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({
                    "data": null,
                    "errors": [{"message": format!("invalid GraphQL request body: {err}")}],
                })),
            )
                .into_response();
        }
    };
    let operation = request
        .operation_name
        .clone()
        .unwrap_or_else(|| "(anonymous)".to_string());
    let query = compact(&request.query);
    let client = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("unknown")
        .to_string();
    let auth = authenticate(
        &plane.store,
        &plane.token_keys,
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
        chrono::Utc::now().timestamp(),
    );
    // Image references name Aloft's registry by the host clients reach the API at.
    let host = RequestHost(
        headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
    );
    let response = schema
        .execute(request.data(plane).data(Auth(auth)).data(host))
        .await;
    if response.errors.is_empty() {
        tracing::debug!(operation = %operation, client = %client, "GraphQL request");
    } else {
        let messages = response
            .errors
            .iter()
            .map(|e| e.message.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        // Errors with no path are the query's own (parse, validation: a field, argument
        // or type Aloft does not have); errors with one are answers (app not found...).
        if response.errors.iter().any(|e| e.path.is_empty()) {
            tracing::warn!(
                operation = %operation,
                client = %client,
                query = %query,
                errors = %messages,
                "GraphQL query Aloft cannot answer"
            );
        } else {
            tracing::info!(
                operation = %operation,
                client = %client,
                errors = %messages,
                "GraphQL request answered with errors"
            );
        }
    }
    Json(response).into_response()
}

/// The query on one line, whitespace runs collapsed, cut to [`LOGGED_QUERY_CHARS`].
fn compact(query: &str) -> String {
    let mut out = String::new();
    for word in query.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
        if out.len() > LOGGED_QUERY_CHARS {
            let mut end = LOGGED_QUERY_CHARS;
            while !out.is_char_boundary(end) {
                end -= 1;
            }
            out.truncate(end);
            out.push('…');
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::compact;

    #[test]
    fn requests_without_variables_parse() {
        // fly-go's client sends `"variables": null` for a query without any.
        for body in [
            r#"{"query":"{ organizations { nodes { slug } } }","variables":null}"#,
            r#"{"query":"{ organizations { nodes { slug } } }"}"#,
        ] {
            let request: async_graphql::Request = serde_json::from_str(body).unwrap();
            assert!(request.query.contains("organizations"));
        }
    }

    #[test]
    fn queries_are_logged_on_one_line() {
        assert_eq!(
            compact("query ($a: String!) {\n\t app(name: $a) {\n  id\n }\n}"),
            "query ($a: String!) { app(name: $a) { id } }"
        );
        let long = "x ".repeat(1000);
        assert!(compact(&long).chars().count() <= super::LOGGED_QUERY_CHARS + 1);
    }
}
