//! Apps, organisations and errors.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Organization {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    pub name: String,
    pub slug: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct App {
    pub id: String,
    pub name: String,
    pub status: String,
    pub organization: Organization,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Where the platform's proxy serves the app (an Aloft addition: the proxy's port
    /// need not be 80).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ListApp {
    pub id: String,
    pub name: String,
    pub machine_count: u64,
    #[serde(default)]
    pub network: serde_json::Value,
    /// Aloft extension, as `fly apps list` shows: the owning org's slug.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<Organization>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_deploy: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ListAppsResponse {
    pub total_apps: u64,
    pub apps: Vec<ListApp>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateAppRequest {
    /// fly-go's flaps client (flyctl 0.4) sends it as `name`.
    #[serde(alias = "name")]
    pub app_name: String,
    #[serde(default)]
    pub org_slug: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_subdomains: Option<bool>,
}

/// The body of every error response: `{"error": "..."}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorResponse {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::CreateAppRequest;

    #[test]
    fn create_app_takes_the_name_as_flaps_clients_send_it() {
        let ours: CreateAppRequest =
            serde_json::from_str(r#"{"app_name":"a","org_slug":"personal"}"#).unwrap();
        let flyctls: CreateAppRequest = serde_json::from_str(
            r#"{"name":"a","org_slug":"personal","network":"","app_role_id":""}"#,
        )
        .unwrap();
        assert_eq!(ours.app_name, "a");
        assert_eq!(flyctls.app_name, "a");
        assert_eq!(flyctls.org_slug, "personal");
    }
}
