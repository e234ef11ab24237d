//! The part of Fly's GraphQL schema (fly-go's `schema.graphql`) that flyctl's app
//! commands query, with Fly's type, field and argument names, answered from the store:
//! organizations, apps (with their releases, addresses and current config) and the
//! image-update check. Errors carry Fly's texts and `extensions.code` ("Could not find
//! App", `NOT_FOUND`), which flyctl reacts to. Mutations are not offered: the commands
//! covered change state through the Machines API.

use std::sync::Arc;

use async_graphql::{
    Context, EmptyMutation, EmptySubscription, Enum, Error, ErrorExtensions, ID, Json, Object,
    Result, Schema, SimpleObject,
};
use http::StatusCode;
use sha2::{Digest, Sha256};

use crate::ControlPlane;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::store::{AppRow, OrgRow, ReleaseRow};

pub type FlySchema = Schema<Query, EmptyMutation, EmptySubscription>;

/// Who is asking: the request's token, checked before the query runs; resolvers that
/// read state need it to be valid.
pub struct Auth(pub Result<Caller, ApiError>);

/// The `Host` the request came to (`host:port`): the name clients give Aloft's registry
/// in image references, as `aloft deploy` and flyctl tag them.
pub struct RequestHost(pub String);

/// Deeper queries than this are refused (flyctl's deepest is about 6 levels).
const MAX_DEPTH: usize = 16;

pub fn build_schema() -> FlySchema {
    Schema::build(Query, EmptyMutation, EmptySubscription)
        .limit_depth(MAX_DEPTH)
        .finish()
}

fn coded(message: impl Into<String>, code: &'static str) -> Error {
    Error::new(message).extend_with(|_, ext| ext.set("code", code))
}

/// An API error as a GraphQL error, with the `extensions.code` Fly gives its kind.
fn from_api(err: ApiError) -> Error {
    let code = match err.status {
        StatusCode::NOT_FOUND => "NOT_FOUND",
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => "UNAUTHORIZED",
        StatusCode::BAD_REQUEST => "INVALID_ARGUMENTS",
        StatusCode::UNPROCESSABLE_ENTITY | StatusCode::CONFLICT => "UNPROCESSABLE",
        StatusCode::SERVICE_UNAVAILABLE => "SERVICE_UNAVAILABLE",
        _ => "SERVER_ERROR",
    };
    coded(err.message, code)
}

fn store_error(err: crate::store::StoreError) -> Error {
    from_api(err.into())
}

fn plane<'a>(ctx: &Context<'a>) -> Result<&'a Arc<ControlPlane>> {
    ctx.data::<Arc<ControlPlane>>()
}

fn caller<'a>(ctx: &Context<'a>) -> Result<&'a Caller> {
    match &ctx.data::<Auth>()?.0 {
        Ok(caller) => Ok(caller),
        Err(err) => Err(coded(
            format!("You must be authenticated to view this: {}", err.message),
            "UNAUTHORIZED",
        )),
    }
}

/// A stable positive number from a text id (Fly's `internalNumericId`s are numbers;
/// Aloft's ids are random text).
pub(super) fn numeric_id(id: &str) -> i32 {
    let digest = Sha256::digest(id.as_bytes());
    let n = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) & 0x7fff_ffff;
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The orgs the caller may see, by slug.
fn visible_orgs(plane: &ControlPlane, caller: &Caller) -> Result<Vec<OrgRow>> {
    Ok(plane
        .store
        .list_orgs()
        .map_err(store_error)?
        .into_iter()
        .filter(|org| caller.in_org(&org.id))
        .collect())
}

fn app_not_found() -> Error {
    coded("Could not find App", "NOT_FOUND")
}

/// Items `first` at a time after the cursor `after` (an index, as this API's cursors
/// are), with Fly's page info.
fn page<T>(items: Vec<T>, first: Option<i32>, after: Option<&str>) -> (Vec<T>, PageInfo, i32) {
    let total = i32::try_from(items.len()).unwrap_or(i32::MAX);
    let start = after
        .and_then(|cursor| cursor.parse::<usize>().ok())
        .map_or(0, |index| index + 1)
        .min(items.len());
    let count = first.map_or(items.len(), |n| usize::try_from(n).unwrap_or(0));
    let end = start.saturating_add(count).min(items.len());
    let info = PageInfo {
        has_next_page: end < items.len(),
        has_previous_page: start > 0,
        start_cursor: (start < end).then(|| start.to_string()),
        end_cursor: (start < end).then(|| (end - 1).to_string()),
    };
    let items = items.into_iter().skip(start).take(end - start).collect();
    (items, info, total)
}

pub struct Query;

#[Object]
impl Query {
    /// The organizations the token belongs to.
    async fn organizations(
        &self,
        ctx: &Context<'_>,
        admin: Option<bool>,
        after: Option<String>,
        first: Option<i32>,
    ) -> Result<OrganizationConnection> {
        let _ = admin;
        let orgs = visible_orgs(plane(ctx)?, caller(ctx)?)?
            .into_iter()
            .map(Organization)
            .collect();
        let (nodes, page_info, total_count) = page(orgs, first, after.as_deref());
        Ok(OrganizationConnection {
            nodes,
            page_info,
            total_count,
        })
    }

    /// One organization, by slug or id.
    async fn organization(
        &self,
        ctx: &Context<'_>,
        id: Option<ID>,
        name: Option<String>,
        slug: Option<String>,
    ) -> Result<Option<Organization>> {
        let wanted = |org: &OrgRow| {
            id.as_ref().is_some_and(|id| id.as_str() == org.id)
                || slug.as_deref().is_some_and(|s| s == org.slug)
                || name
                    .as_deref()
                    .is_some_and(|n| n == org.slug || n == org.name)
        };
        visible_orgs(plane(ctx)?, caller(ctx)?)?
            .into_iter()
            .find(wanted)
            .map(|org| Some(Organization(org)))
            .ok_or_else(|| coded("Could not find Organization", "NOT_FOUND"))
    }

    /// The apps the token sees, of one organization if `organizationId` says which.
    #[allow(clippy::too_many_arguments)]
    async fn apps(
        &self,
        ctx: &Context<'_>,
        after: Option<String>,
        first: Option<i32>,
        network: Option<String>,
        organization_id: Option<ID>,
        role: Option<String>,
        #[graphql(name = "type")] kind: Option<String>,
    ) -> Result<AppConnection> {
        let _ = kind;
        let plane = plane(ctx)?;
        let caller = caller(ctx)?;
        if role.as_deref().is_some_and(|r| !r.is_empty()) {
            // Aloft has no app roles (postgres_cluster...): no app has one.
            return Ok(AppConnection::default());
        }
        let mut apps: Vec<AppRow> = plane
            .store
            .list_apps(organization_id.as_ref().map(|id| id.as_str()))
            .map_err(store_error)?
            .into_iter()
            .filter(|app| caller.sees_app(app))
            .filter(|app| {
                network
                    .as_deref()
                    .is_none_or(|n| n == app.network || (n.is_empty() && app.network == "default"))
            })
            .collect();
        apps.sort_by(|a, b| a.name.cmp(&b.name));
        let apps = apps.into_iter().map(App).collect();
        let (nodes, page_info, total_count) = page(apps, first, after.as_deref());
        Ok(AppConnection {
            nodes,
            page_info,
            total_count,
        })
    }

    /// One app, by name (Fly's app ids are their names too).
    async fn app(
        &self,
        ctx: &Context<'_>,
        id: Option<String>,
        name: Option<String>,
    ) -> Result<Option<App>> {
        let plane = plane(ctx)?;
        let caller = caller(ctx)?;
        let Some(name) = name.or(id) else {
            return Err(coded("Could not find App", "NOT_FOUND"));
        };
        match plane.store.app(&name).map_err(store_error)? {
            Some(app) if caller.sees_app(&app) => Ok(Some(App(app))),
            _ => Err(app_not_found()),
        }
    }

    /// The platform's regions (those with hosts) and the one answering this request
    /// (the control plane's own).
    async fn platform(&self, ctx: &Context<'_>) -> Result<FlyPlatform> {
        let _ = caller(ctx)?;
        let plane = plane(ctx)?;
        let regions = crate::scale::region_list(plane)
            .map_err(from_api)?
            .into_iter()
            .map(|r| {
                let known = aloft_api::regions::find(&r.code);
                Region {
                    name: r.name,
                    code: r.code,
                    latitude: known.map(|k| k.latitude),
                    longitude: known.map(|k| k.longitude),
                    gateway_available: known.is_some_and(|k| k.gateway),
                    requires_paid_plan: false,
                    deprecated: known.is_some_and(|k| k.deprecated),
                    process_group: None,
                }
            })
            .collect();
        Ok(FlyPlatform {
            regions,
            request_region: Some(plane.config.region.clone()),
        })
    }

    /// Fly's image-update check (`fly status`, `fly image update`) knows Fly's own
    /// images; Aloft tracks no image versions, so every repository is unknown, which
    /// flyctl takes as "nothing to update".
    async fn latest_image_details(
        &self,
        ctx: &Context<'_>,
        image: String,
        fly_version: Option<String>,
    ) -> Result<ImageVersion> {
        let _ = (caller(ctx)?, fly_version);
        Err(coded(format!("Unknown repository: {image}"), "NOT_FOUND"))
    }
}

/// Fly's `FlyPlatform`.
#[derive(SimpleObject)]
pub struct FlyPlatform {
    regions: Vec<Region>,
    request_region: Option<String>,
}

#[derive(SimpleObject)]
pub struct Region {
    code: String,
    name: String,
    latitude: Option<f64>,
    longitude: Option<f64>,
    gateway_available: bool,
    requires_paid_plan: bool,
    deprecated: bool,
    process_group: Option<String>,
}

#[derive(SimpleObject, Default)]
pub struct PageInfo {
    has_next_page: bool,
    has_previous_page: bool,
    start_cursor: Option<String>,
    end_cursor: Option<String>,
}

#[derive(SimpleObject)]
pub struct OrganizationConnection {
    nodes: Vec<Organization>,
    page_info: PageInfo,
    total_count: i32,
}

#[derive(SimpleObject, Default)]
pub struct AppConnection {
    nodes: Vec<App>,
    page_info: PageInfo,
    total_count: i32,
}

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(rename_items = "UPPERCASE")]
pub enum OrganizationType {
    /// A user's personal organization.
    Personal,
    /// An organization shared between one or more users.
    Shared,
}

pub struct Organization(OrgRow);

#[Object]
impl Organization {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    /// Fly's `BigInt`, which is a JSON string.
    async fn internal_numeric_id(&self) -> String {
        numeric_id(&self.0.id).to_string()
    }
    async fn slug(&self) -> &str {
        &self.0.slug
    }
    async fn raw_slug(&self) -> &str {
        &self.0.slug
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    #[graphql(name = "type")]
    async fn kind(&self) -> OrganizationType {
        if self.0.slug == crate::DEFAULT_ORG {
            OrganizationType::Personal
        } else {
            OrganizationType::Shared
        }
    }
    /// Nothing on a self-hosted platform needs a paid plan.
    async fn paid_plan(&self) -> bool {
        true
    }
    async fn billable(&self) -> bool {
        true
    }
    async fn viewer_role(&self) -> &str {
        "admin"
    }
}

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(name = "PlatformVersionEnum", rename_items = "lowercase")]
pub enum PlatformVersion {
    /// App with only machines.
    Machines,
}

/// Fly's `AppRole` (`postgres_cluster`...): Aloft's apps have none.
#[derive(SimpleObject)]
#[graphql(name = "AppRole")]
pub struct AppRoleView {
    name: String,
}

#[derive(SimpleObject)]
pub struct AppConfig {
    /// The app's fly.toml as JSON, from its current release.
    definition: Json<serde_json::Value>,
}

pub struct App(AppRow);

impl App {
    fn release_rows(&self, ctx: &Context<'_>) -> Result<Vec<ReleaseRow>> {
        plane(ctx)?
            .store
            .releases(&self.0.id, 200)
            .map_err(store_error)
    }

    /// Fly's current release: the latest complete one, else the latest.
    fn current_release_row(&self, ctx: &Context<'_>) -> Result<Option<ReleaseRow>> {
        let releases = self.release_rows(ctx)?;
        let complete = releases.iter().find(|r| r.status == "complete").cloned();
        Ok(complete.or_else(|| releases.into_iter().next()))
    }
}

#[Object]
impl App {
    /// Fly's app ids are the app names.
    async fn id(&self) -> ID {
        ID(self.0.name.clone())
    }
    async fn internal_numeric_id(&self) -> i32 {
        numeric_id(&self.0.id)
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    async fn status(&self) -> &str {
        &self.0.status
    }
    async fn deployed(&self) -> bool {
        self.0.status == "deployed"
    }
    async fn hostname(&self, ctx: &Context<'_>) -> Result<String> {
        Ok(format!(
            "{}.{}",
            self.0.name,
            plane(ctx)?.config.base_domain
        ))
    }
    async fn cname_target(&self, ctx: &Context<'_>) -> Result<String> {
        Ok(format!(
            "{}.{}",
            self.0.name,
            plane(ctx)?.config.base_domain
        ))
    }
    async fn app_url(&self, ctx: &Context<'_>) -> Result<String> {
        Ok(plane(ctx)?.app_url(&self.0.name))
    }
    async fn created_at(&self) -> &str {
        &self.0.created_at
    }
    /// The latest release's version (0 before the first).
    async fn version(&self, ctx: &Context<'_>) -> Result<i32> {
        Ok(self
            .release_rows(ctx)?
            .first()
            .map_or(0, |r| i32::try_from(r.version).unwrap_or(i32::MAX)))
    }
    /// The app's custom network; null on its organization's default one.
    async fn network(&self) -> Option<&str> {
        Some(self.0.network.as_str()).filter(|n| !n.is_empty() && *n != "default")
    }
    async fn network_id(&self, ctx: &Context<'_>) -> Result<Option<i32>> {
        let id = crate::ips::find_network(&plane(ctx)?.store, &self.0.org_id, &self.0.network)
            .map_err(store_error)?;
        Ok(id.and_then(|n| i32::try_from(n).ok()))
    }
    async fn platform_version(&self) -> PlatformVersion {
        PlatformVersion::Machines
    }
    async fn organization(&self, ctx: &Context<'_>) -> Result<Organization> {
        plane(ctx)?
            .store
            .org_by_id(&self.0.org_id)
            .map_err(store_error)?
            .map(Organization)
            .ok_or_else(|| coded("Could not find Organization", "NOT_FOUND"))
    }
    async fn role(&self) -> Option<AppRoleView> {
        None
    }
    async fn current_release(&self, ctx: &Context<'_>) -> Result<Option<Release>> {
        Ok(self.current_release_row(ctx)?.map(Release))
    }
    async fn current_release_unprocessed(&self, ctx: &Context<'_>) -> Result<Option<Release>> {
        Ok(self.current_release_row(ctx)?.map(Release))
    }
    async fn releases_unprocessed(
        &self,
        ctx: &Context<'_>,
        after: Option<String>,
        first: Option<i32>,
        status: Option<String>,
    ) -> Result<ReleaseConnection> {
        let releases = self
            .release_rows(ctx)?
            .into_iter()
            .filter(|r| {
                status
                    .as_deref()
                    .is_none_or(|s| s.is_empty() || s == r.status)
            })
            .map(Release)
            .collect();
        let (nodes, page_info, total_count) = page(releases, first, after.as_deref());
        Ok(ReleaseConnection {
            nodes,
            page_info,
            total_count,
        })
    }
    async fn releases(
        &self,
        ctx: &Context<'_>,
        after: Option<String>,
        first: Option<i32>,
    ) -> Result<ReleaseConnection> {
        let releases = self.release_rows(ctx)?.into_iter().map(Release).collect();
        let (nodes, page_info, total_count) = page(releases, first, after.as_deref());
        Ok(ReleaseConnection {
            nodes,
            page_info,
            total_count,
        })
    }
    /// The current release's config, `{}` before the first deploy.
    async fn config(&self, ctx: &Context<'_>) -> Result<AppConfig> {
        let definition = self
            .current_release_row(ctx)?
            .and_then(|r| serde_json::from_str(&r.config).ok())
            .unwrap_or_else(|| serde_json::json!({}));
        Ok(AppConfig {
            definition: Json(definition),
        })
    }
    /// An image reference resolved for a deploy (`fly deploy --image`, `fly machine run`):
    /// one in Aloft's registry answers with its manifest, digest and size, or null when
    /// the registry has no such tag or digest; one elsewhere is passed through unresolved
    /// (the host's agent pulls it when a machine starts).
    async fn image(
        &self,
        ctx: &Context<'_>,
        #[graphql(name = "ref")] reference: String,
    ) -> Result<Option<Image>> {
        let plane = plane(ctx)?;
        let parsed = ImageVersion::parse(&reference);
        let request_host = ctx
            .data::<RequestHost>()
            .map(|h| h.0.as_str())
            .unwrap_or("");
        let ours = parsed.registry == plane.registry_host()
            || (!request_host.is_empty() && parsed.registry == request_host);
        if !ours {
            return Ok(Some(Image {
                parts: parsed,
                reference: reference.clone(),
                digest: String::new(),
                size: 0,
                manifest: serde_json::json!({}),
            }));
        }
        let wanted = if !parsed.digest.is_empty() {
            parsed.digest.clone()
        } else if !parsed.tag.is_empty() {
            parsed.tag.clone()
        } else {
            "latest".to_string()
        };
        let found = plane
            .registry
            .manifest(&parsed.repository, &wanted)
            .map_err(|err| coded(format!("image {reference}: {err}"), "INVALID_ARGUMENTS"))?;
        let Some((digest, body)) = found else {
            return Ok(None);
        };
        let manifest: serde_json::Value = serde_json::from_slice(&body).map_err(|err| {
            coded(
                format!("image {reference}: the registry's manifest is not JSON: {err}"),
                "SERVER_ERROR",
            )
        })?;
        let size_of = |d: &serde_json::Value| d["size"].as_u64().unwrap_or(0);
        let size = size_of(&manifest["config"])
            + manifest["layers"]
                .as_array()
                .map_or(0, |layers| layers.iter().map(size_of).sum());
        let name = format!("{}/{}", parsed.registry, parsed.repository);
        let reference = if parsed.tag.is_empty() {
            format!("{name}@{digest}")
        } else {
            format!("{name}:{}", parsed.tag)
        };
        Ok(Some(Image {
            parts: parsed,
            reference,
            digest,
            size,
            manifest,
        }))
    }
    async fn image_details(&self, ctx: &Context<'_>) -> Result<Option<ImageVersion>> {
        Ok(self
            .current_release_row(ctx)?
            .map(|r| ImageVersion::parse(&r.image)))
    }
    /// The app's own addresses; its shared IPv4 is `sharedIpAddress`, as on Fly.
    async fn ip_addresses(
        &self,
        ctx: &Context<'_>,
        after: Option<String>,
        first: Option<i32>,
    ) -> Result<IpAddressConnection> {
        let plane = plane(ctx)?;
        let ips = crate::ips::app_ips(&plane.store, &self.0.id)
            .map_err(store_error)?
            .into_iter()
            .filter(|ip| ip.kind != "shared_v4")
            .map(|ip| {
                let network = crate::ips::network_view(plane, ip.network_id).map_err(from_api)?;
                Ok(IpAddress { ip, network })
            })
            .collect::<Result<Vec<_>>>()?;
        let (nodes, page_info, total_count) = page(ips, first, after.as_deref());
        Ok(IpAddressConnection {
            nodes,
            page_info,
            total_count,
        })
    }
    async fn shared_ip_address(&self, ctx: &Context<'_>) -> Result<Option<String>> {
        Ok(crate::ips::app_ips(&plane(ctx)?.store, &self.0.id)
            .map_err(store_error)?
            .into_iter()
            .find(|ip| ip.kind == "shared_v4")
            .map(|ip| ip.address))
    }
    /// Aloft has no app-scoped egress addresses: machines leave through their host.
    async fn egress_ip_addresses(&self) -> EgressIpAddressConnection {
        EgressIpAddressConnection {
            nodes: Vec::new(),
            page_info: PageInfo::default(),
            total_count: 0,
        }
    }
}

#[derive(SimpleObject)]
pub struct ReleaseConnection {
    nodes: Vec<Release>,
    page_info: PageInfo,
    total_count: i32,
}

#[derive(SimpleObject)]
pub struct User {
    id: ID,
    name: String,
    email: String,
}

pub struct Release(ReleaseRow);

#[Object]
impl Release {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    async fn version(&self) -> i32 {
        i32::try_from(self.0.version).unwrap_or(i32::MAX)
    }
    /// `running`, `complete`, `failed`, `interrupted`.
    async fn status(&self) -> &str {
        &self.0.status
    }
    async fn description(&self) -> &str {
        &self.0.description
    }
    async fn reason(&self) -> &str {
        "deploy"
    }
    async fn stable(&self) -> bool {
        self.0.status == "complete"
    }
    async fn in_progress(&self) -> bool {
        self.0.status == "running"
    }
    async fn evaluation_id(&self) -> Option<&str> {
        None
    }
    async fn image_ref(&self) -> &str {
        &self.0.image
    }
    async fn created_at(&self) -> &str {
        &self.0.created_at
    }
    async fn updated_at(&self) -> &str {
        &self.0.created_at
    }
    /// Who made the release: the name of the token used.
    async fn user(&self) -> User {
        User {
            id: ID(self.0.user.clone()),
            name: self.0.user.clone(),
            email: self.0.user.clone(),
        }
    }
    /// The release's fly.toml as JSON.
    async fn config_definition(&self) -> Option<Json<serde_json::Value>> {
        serde_json::from_str(&self.0.config).ok().map(Json)
    }
}

#[derive(SimpleObject, Clone, Default, PartialEq, Eq, Debug)]
pub struct ImageVersion {
    registry: String,
    repository: String,
    tag: String,
    digest: String,
    version: Option<String>,
}

impl ImageVersion {
    /// `registry/repository:tag@digest`, each part optional.
    fn parse(image: &str) -> Self {
        let (name, digest) = image.split_once('@').unwrap_or((image, ""));
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first, rest)
            }
            _ => ("", name),
        };
        let (repository, tag) = match path.rfind(':') {
            Some(i) if !path[i..].contains('/') => (&path[..i], &path[i + 1..]),
            _ => (path, ""),
        };
        Self {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag: tag.to_string(),
            digest: digest.to_string(),
            version: None,
        }
    }
}

/// Fly's `Image`: an image reference resolved against the registry.
pub struct Image {
    parts: ImageVersion,
    reference: String,
    digest: String,
    /// The compressed size: the config's and layers' sizes in the manifest.
    size: u64,
    manifest: serde_json::Value,
}

#[Object]
impl Image {
    /// The digest identifies the image; an unresolved one, its reference.
    async fn id(&self) -> ID {
        if self.digest.is_empty() {
            ID(self.reference.clone())
        } else {
            ID(self.digest.clone())
        }
    }
    async fn digest(&self) -> &str {
        &self.digest
    }
    #[graphql(name = "ref")]
    async fn reference(&self) -> &str {
        &self.reference
    }
    async fn absolute_ref(&self) -> String {
        if self.digest.is_empty() {
            self.reference.clone()
        } else {
            format!(
                "{}@{}",
                self.reference.split('@').next().unwrap_or_default(),
                self.digest
            )
        }
    }
    async fn registry(&self) -> &str {
        &self.parts.registry
    }
    async fn repository(&self) -> &str {
        &self.parts.repository
    }
    async fn tag(&self) -> Option<&str> {
        Some(self.parts.tag.as_str()).filter(|t| !t.is_empty())
    }
    async fn label(&self) -> &str {
        &self.parts.tag
    }
    /// Fly's deprecated `Int` size.
    async fn compressed_size(&self) -> i32 {
        i32::try_from(self.size).unwrap_or(i32::MAX)
    }
    /// Fly's `BigInt`, which is a JSON string.
    async fn compressed_size_full(&self) -> String {
        self.size.to_string()
    }
    async fn manifest(&self) -> Json<serde_json::Value> {
        Json(self.manifest.clone())
    }
}

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(name = "IPAddressType", rename_items = "snake_case")]
pub enum IpAddressType {
    V4,
    V6,
    PrivateV6,
    SharedV4,
}

#[derive(SimpleObject)]
#[graphql(name = "IPAddressConnection")]
pub struct IpAddressConnection {
    nodes: Vec<IpAddress>,
    page_info: PageInfo,
    total_count: i32,
}

pub struct IpAddress {
    ip: crate::ips::IpRow,
    network: Option<crate::ips::IpNetwork>,
}

#[Object(name = "IPAddress")]
impl IpAddress {
    /// The address itself identifies it.
    async fn id(&self) -> ID {
        ID(self.ip.address.clone())
    }
    async fn address(&self) -> &str {
        &self.ip.address
    }
    #[graphql(name = "type")]
    async fn kind(&self) -> Result<IpAddressType> {
        match self.ip.kind.as_str() {
            "v4" => Ok(IpAddressType::V4),
            "v6" => Ok(IpAddressType::V6),
            "private_v6" => Ok(IpAddressType::PrivateV6),
            "shared_v4" => Ok(IpAddressType::SharedV4),
            other => Err(coded(
                format!("address {} has an unknown type {other}", self.ip.address),
                "SERVER_ERROR",
            )),
        }
    }
    async fn region(&self) -> &str {
        &self.ip.region
    }
    async fn created_at(&self) -> &str {
        &self.ip.created_at
    }
    async fn service_name(&self) -> Option<&str> {
        Some(self.ip.service_name.as_str()).filter(|s| !s.is_empty())
    }
    /// The custom network of a Flycast address; null for public ones.
    async fn network(&self, ctx: &Context<'_>) -> Result<Option<Network>> {
        let Some(network) = &self.network else {
            return Ok(None);
        };
        let org = plane(ctx)?
            .store
            .org_by_slug(&network.org_slug)
            .map_err(store_error)?;
        Ok(Some(Network {
            name: network.name.clone(),
            org,
        }))
    }
}

pub struct Network {
    name: String,
    org: Option<OrgRow>,
}

#[Object]
impl Network {
    async fn name(&self) -> &str {
        &self.name
    }
    async fn organization(&self) -> Option<Organization> {
        self.org.clone().map(Organization)
    }
}

#[derive(SimpleObject)]
#[graphql(name = "EgressIPAddress")]
pub struct EgressIpAddress {
    id: ID,
    ip: String,
    version: i32,
    region: String,
    updated_at: String,
}

#[derive(SimpleObject)]
#[graphql(name = "EgressIPAddressConnection")]
pub struct EgressIpAddressConnection {
    nodes: Vec<EgressIpAddress>,
    page_info: PageInfo,
    total_count: i32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_split_like_fly() {
        assert_eq!(
            ImageVersion::parse("127.0.0.1:4280/hello:deployment-01J@sha256:abc"),
            ImageVersion {
                registry: "127.0.0.1:4280".into(),
                repository: "hello".into(),
                tag: "deployment-01J".into(),
                digest: "sha256:abc".into(),
                version: None,
            }
        );
        assert_eq!(ImageVersion::parse("busybox").repository, "busybox");
        assert_eq!(ImageVersion::parse("library/busybox:1").tag, "1");
    }

    #[test]
    fn pages_follow_their_cursors() {
        let (items, info, total) = page(vec![1, 2, 3], Some(2), None);
        assert_eq!((items, total), (vec![1, 2], 3));
        assert!(info.has_next_page);
        let (items, info, _) = page(vec![1, 2, 3], Some(2), info.end_cursor.as_deref());
        assert_eq!(items, vec![3]);
        assert!(!info.has_next_page);
    }
}
