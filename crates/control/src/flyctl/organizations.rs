//! The organizations flyctl reads through `FLY_UIEX_BASE_URL` (`fly machine run`, `fly
//! deploy` and `fly volumes create` look up the app's org there): `GET
//! /api/v1/organizations` and `GET /api/v1/organizations/{slug}`, in uiex's shape, for the
//! orgs the token may act in.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;

use super::schema::numeric_id;
use crate::ControlPlane;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::store::OrgRow;

/// uiex's `Organization`.
#[derive(Serialize, Debug, PartialEq)]
pub struct UiexOrganization {
    id: String,
    internal_numeric_id: u64,
    slug: String,
    raw_slug: String,
    paid_plan: bool,
    personal: bool,
    billing_status: &'static str,
    provisions_beta_extensions: bool,
    name: String,
    billable: bool,
    remote_builder_image: String,
}

impl UiexOrganization {
    fn new(org: OrgRow) -> Self {
        Self {
            internal_numeric_id: u64::from(numeric_id(&org.id).unsigned_abs()),
            personal: org.slug == crate::DEFAULT_ORG,
            id: org.id,
            raw_slug: org.slug.clone(),
            slug: org.slug,
            // Nothing on a self-hosted platform needs a paid plan or a bill.
            paid_plan: true,
            billing_status: "CURRENT",
            provisions_beta_extensions: false,
            name: org.name,
            billable: true,
            // Aloft builds with its own builder, never one of Fly's images.
            remote_builder_image: String::new(),
        }
    }
}

fn visible(plane: &ControlPlane, caller: &Caller) -> ApiResult<Vec<OrgRow>> {
    Ok(plane
        .store
        .list_orgs()?
        .into_iter()
        .filter(|org| caller.in_org(&org.id))
        .collect())
}

#[derive(Serialize)]
pub struct OrganizationsAnswer {
    organizations: Vec<UiexOrganization>,
}

pub async fn list(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
) -> ApiResult<Json<OrganizationsAnswer>> {
    let organizations = visible(&plane, &caller)?
        .into_iter()
        .map(UiexOrganization::new)
        .collect();
    Ok(Json(OrganizationsAnswer { organizations }))
}

#[derive(Serialize)]
pub struct OrganizationAnswer {
    organization: UiexOrganization,
}

pub async fn show(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
    Path(slug): Path<String>,
) -> ApiResult<Json<OrganizationAnswer>> {
    visible(&plane, &caller)?
        .into_iter()
        .find(|org| org.slug == slug || org.id == slug)
        .map(|org| {
            Json(OrganizationAnswer {
                organization: UiexOrganization::new(org),
            })
        })
        .ok_or_else(|| ApiError::not_found(format!("organization {slug} not found")))
}
