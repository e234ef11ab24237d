//! Manifest media types, descriptors, and the parsing the registry needs
//! (references to blobs and child manifests, `subject`, `artifactType`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::RegistryError;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// Largest manifest the registry accepts (the spec's recommended minimum limit).
pub const MAX_MANIFEST_SIZE: usize = 4 * 1024 * 1024;

/// The Accept header value clients send to get any supported manifest type.
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Whether a media type is an index / manifest list.
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// A content descriptor (OCI image-spec), as found in manifests and indexes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// The platform of an index entry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    #[serde(rename = "os.features", default, skip_serializing_if = "Vec::is_empty")]
    pub os_features: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<u32>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
    annotations: Option<BTreeMap<String, String>>,
}

/// What the registry keeps from a manifest.
#[derive(Debug, Clone)]
pub struct ParsedManifest {
    pub media_type: String,
    pub artifact_type: Option<String>,
    pub config: Option<Descriptor>,
    pub layers: Vec<Descriptor>,
    pub manifests: Vec<Descriptor>,
    pub subject: Option<Descriptor>,
    pub annotations: Option<BTreeMap<String, String>>,
}

impl ParsedManifest {
    pub fn is_index(&self) -> bool {
        is_index(&self.media_type) || (self.config.is_none() && !self.manifests.is_empty())
    }

    /// `artifactType` for the referrers API: the field, or else the config's media type
    /// for image manifests.
    pub fn effective_artifact_type(&self) -> Option<String> {
        self.artifact_type.clone().or_else(|| {
            if self.is_index() {
                None
            } else {
                self.config.as_ref().map(|c| c.media_type.clone())
            }
        })
    }
}

/// Parses a manifest body. `content_type` is the request's Content-Type (may be empty).
pub fn parse_manifest(content_type: &str, body: &[u8]) -> Result<ParsedManifest, RegistryError> {
    let raw: RawManifest = serde_json::from_slice(body)
        .map_err(|e| RegistryError::ManifestInvalid(format!("not a JSON manifest: {e}")))?;
    let content_type = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    if content_type == DOCKER_SCHEMA1 || content_type == DOCKER_SCHEMA1_SIGNED {
        return Err(RegistryError::ManifestInvalid(
            "Docker schema 1 manifests are not supported".into(),
        ));
    }
    if raw.schema_version != Some(2) {
        return Err(RegistryError::ManifestInvalid(
            "schemaVersion must be 2".into(),
        ));
    }
    let body_type = raw.media_type.clone().unwrap_or_default();
    let generic = content_type.is_empty()
        || content_type == "application/json"
        || content_type == "application/octet-stream";
    let media_type = if !generic {
        if !body_type.is_empty() && body_type != content_type {
            return Err(RegistryError::ManifestInvalid(format!(
                "mediaType {body_type:?} does not match Content-Type {content_type:?}"
            )));
        }
        content_type
    } else if !body_type.is_empty() {
        body_type
    } else if raw.manifests.is_some() {
        OCI_INDEX.to_string()
    } else {
        OCI_MANIFEST.to_string()
    };
    let parsed = ParsedManifest {
        media_type,
        artifact_type: raw.artifact_type,
        config: raw.config,
        layers: raw.layers.unwrap_or_default(),
        manifests: raw.manifests.unwrap_or_default(),
        subject: raw.subject,
        annotations: raw.annotations,
    };
    if is_index(&parsed.media_type) {
        if parsed.config.is_some() || !parsed.layers.is_empty() {
            return Err(RegistryError::ManifestInvalid(
                "an index has no config or layers".into(),
            ));
        }
    } else if parsed.manifests.is_empty() && parsed.config.is_none() {
        return Err(RegistryError::ManifestInvalid(
            "an image manifest needs a config".into(),
        ));
    }
    // Every referenced digest must be valid.
    for d in parsed
        .config
        .iter()
        .chain(parsed.layers.iter())
        .chain(parsed.manifests.iter())
        .chain(parsed.subject.iter())
    {
        d.digest.parse::<crate::Digest>().map_err(|_| {
            RegistryError::ManifestInvalid(format!("invalid digest {:?} in manifest", d.digest))
        })?;
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn media_type_from_header_or_body() {
        let body = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D}","size":0}},"layers":[]}}"#
        );
        let m = parse_manifest(OCI_MANIFEST, body.as_bytes()).expect("parse");
        assert_eq!(m.media_type, OCI_MANIFEST);
        assert_eq!(
            m.effective_artifact_type().as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
        let m = parse_manifest("", body.as_bytes()).expect("parse");
        assert_eq!(m.media_type, OCI_MANIFEST);
        let body2 = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"x","digest":"{D}","size":0}},"layers":[]}}"#
        );
        let m = parse_manifest("application/json", body2.as_bytes()).expect("parse");
        assert_eq!(m.media_type, DOCKER_MANIFEST);
        assert!(parse_manifest(OCI_MANIFEST, body2.as_bytes()).is_err());
        assert!(parse_manifest(OCI_MANIFEST, b"{").is_err());
        assert!(parse_manifest(OCI_MANIFEST, br#"{"schemaVersion":1}"#).is_err());
        let bad = r#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:zz","size":0},"layers":[]}"#;
        assert!(parse_manifest(OCI_MANIFEST, bad.as_bytes()).is_err());
    }

    #[test]
    fn index() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        let m = parse_manifest(OCI_INDEX, body.as_bytes()).expect("parse");
        assert!(m.is_index());
        assert_eq!(m.manifests.len(), 1);
        assert_eq!(
            m.manifests[0].platform.as_ref().map(|p| p.os.as_str()),
            Some("linux")
        );
    }
}
