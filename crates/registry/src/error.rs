//! The registry's error type and its distribution-spec JSON rendering.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

/// Errors of the registry server, its storage and the pull client.
///
/// The server renders each as a distribution-spec error body
/// (`{"errors":[{"code":..,"message":..,"detail":..}]}`) with the spec's status code.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("blob unknown to registry: {0}")]
    BlobUnknown(String),
    #[error("blob upload invalid: {0}")]
    BlobUploadInvalid(String),
    #[error("requested range not satisfiable: {0}")]
    RangeInvalid(String),
    #[error("blob upload unknown to registry")]
    BlobUploadUnknown,
    #[error("provided digest did not match uploaded content: {0}")]
    DigestInvalid(String),
    #[error("manifest references a blob unknown to the registry: {0}")]
    ManifestBlobUnknown(String),
    #[error("manifest invalid: {0}")]
    ManifestInvalid(String),
    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),
    #[error("invalid repository name: {0}")]
    NameInvalid(String),
    #[error("repository name not known to registry: {0}")]
    NameUnknown(String),
    #[error("invalid tag: {0}")]
    TagInvalid(String),
    #[error("content too large: {0}")]
    TooLarge(String),
    #[error("provided length did not match content length: {0}")]
    SizeInvalid(String),
    #[error("authentication required")]
    Unauthorized,
    #[error("requested access to the resource is denied")]
    Denied,
    #[error("the operation is unsupported: {0}")]
    Unsupported(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("no such endpoint: {0}")]
    EndpointUnknown(String),
    #[error("too many requests")]
    TooManyRequests,
    /// An error response from a remote registry (pull client, pull-through).
    #[error("registry returned {status} {code}: {message}")]
    Remote {
        status: u16,
        code: String,
        message: String,
    },
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("upstream registry: {0}")]
    Upstream(String),
    /// The pull client would not connect (an address its egress policy does not allow, a
    /// redirect to another origin over plain http).
    #[error("{0}")]
    Refused(String),
    #[error("http: {0}")]
    Http(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

impl RegistryError {
    /// The distribution-spec error code.
    pub fn code(&self) -> &str {
        match self {
            RegistryError::BlobUnknown(_) => "BLOB_UNKNOWN",
            RegistryError::BlobUploadInvalid(_) | RegistryError::RangeInvalid(_) => {
                "BLOB_UPLOAD_INVALID"
            }
            RegistryError::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            RegistryError::DigestInvalid(_) | RegistryError::DigestMismatch { .. } => {
                "DIGEST_INVALID"
            }
            RegistryError::ManifestBlobUnknown(_) => "MANIFEST_BLOB_UNKNOWN",
            RegistryError::ManifestInvalid(_) | RegistryError::TagInvalid(_) => "MANIFEST_INVALID",
            RegistryError::ManifestUnknown(_) => "MANIFEST_UNKNOWN",
            RegistryError::NameInvalid(_) => "NAME_INVALID",
            RegistryError::NameUnknown(_) => "NAME_UNKNOWN",
            RegistryError::TooLarge(_) | RegistryError::SizeInvalid(_) => "SIZE_INVALID",
            RegistryError::Unauthorized => "UNAUTHORIZED",
            RegistryError::Denied => "DENIED",
            RegistryError::Unsupported(_)
            | RegistryError::EndpointUnknown(_)
            | RegistryError::BadRequest(_) => "UNSUPPORTED",
            RegistryError::TooManyRequests => "TOOMANYREQUESTS",
            RegistryError::Remote { code, .. } => code,
            RegistryError::Upstream(_)
            | RegistryError::Refused(_)
            | RegistryError::Http(_)
            | RegistryError::Config(_)
            | RegistryError::Io(_)
            | RegistryError::Internal(_) => "UNKNOWN",
        }
    }

    /// The HTTP status the server answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            RegistryError::BlobUnknown(_)
            | RegistryError::BlobUploadUnknown
            | RegistryError::ManifestUnknown(_)
            | RegistryError::NameUnknown(_)
            | RegistryError::EndpointUnknown(_) => StatusCode::NOT_FOUND,
            RegistryError::RangeInvalid(_) => StatusCode::RANGE_NOT_SATISFIABLE,
            RegistryError::BlobUploadInvalid(_)
            | RegistryError::DigestInvalid(_)
            | RegistryError::DigestMismatch { .. }
            | RegistryError::ManifestBlobUnknown(_)
            | RegistryError::ManifestInvalid(_)
            | RegistryError::NameInvalid(_)
            | RegistryError::TagInvalid(_)
            | RegistryError::SizeInvalid(_)
            | RegistryError::BadRequest(_) => StatusCode::BAD_REQUEST,
            RegistryError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            RegistryError::Unauthorized => StatusCode::UNAUTHORIZED,
            RegistryError::Denied => StatusCode::FORBIDDEN,
            RegistryError::Unsupported(_) => StatusCode::METHOD_NOT_ALLOWED,
            RegistryError::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            RegistryError::Remote { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            RegistryError::Upstream(_) | RegistryError::Refused(_) | RegistryError::Http(_) => {
                StatusCode::BAD_GATEWAY
            }
            RegistryError::Config(_) | RegistryError::Io(_) | RegistryError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// Whether this error means "the thing does not exist" (404-ish).
    pub fn is_not_found(&self) -> bool {
        self.status() == StatusCode::NOT_FOUND
    }

    fn detail(&self) -> serde_json::Value {
        match self {
            RegistryError::BlobUnknown(d)
            | RegistryError::ManifestBlobUnknown(d)
            | RegistryError::ManifestUnknown(d)
            | RegistryError::NameUnknown(d)
            | RegistryError::NameInvalid(d) => serde_json::json!(d),
            RegistryError::DigestMismatch { expected, actual } => {
                serde_json::json!({"expected": expected, "actual": actual})
            }
            _ => serde_json::Value::Null,
        }
    }
}

/// Builds the JSON error body of the distribution spec.
pub(crate) fn error_body(err: &RegistryError) -> String {
    let message = match err {
        // Never leak file system paths or internals to clients.
        RegistryError::Io(_) | RegistryError::Internal(_) | RegistryError::Config(_) => {
            "internal server error".to_string()
        }
        other => other.to_string(),
    };
    let mut entry = serde_json::json!({"code": err.code(), "message": message});
    let detail = err.detail();
    if !detail.is_null() {
        entry["detail"] = detail;
    }
    serde_json::json!({ "errors": [entry] }).to_string()
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "registry request failed");
        } else {
            tracing::debug!(error = %self, "registry request rejected");
        }
        let mut resp = (status, error_body(&self)).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"aloft\""),
            );
        }
        resp
    }
}
