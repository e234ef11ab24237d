//! Addresses: 6PN networks and machine addresses (computed at placement from the network,
//! host and machine numbers, see `aloft_api::sixpn`), and the addresses an app is given:
//! public (dedicated v4/v6, shared v4) and Flycast (`private_v6`). Its own tables
//! (`networks`, `host_numbers`, `address_counters`, `ip_assignments`, created with the
//! store's schema), queried through the store's interface so they work on SQLite and
//! PostgreSQL alike; the `ip_assignments` routes follow fly-go's `flaps` client.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use aloft_api::internal::CatalogIp;
use aloft_api::sixpn;
use axum::extract::{Path, State};
use axum::routing::{delete, get};
use axum::{Json, Router};
use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::ControlPlane;
use crate::api::{ErrorAnswers, JsonBody};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::store::{AppRow, Conn, DbError, Store, StoreResult, now_rfc3339};

/// The name of an org's own network (`network` of apps created without `--network`).
pub const DEFAULT_NETWORK: &str = "default";

/// Settings keys for public address pools (`aloft server` sets them).
pub const SETTING_SHARED_V4: &str = "ips.shared_v4";
pub const SETTING_PUBLIC_V4_POOL: &str = "ips.public_v4_pool";
pub const SETTING_PUBLIC_V6_POOL: &str = "ips.public_v6_pool";

/// Documentation ranges until an operator configures real ones.
const DEFAULT_SHARED_V4: &str = "127.0.0.1";
const DEFAULT_PUBLIC_V4_POOL: &str = "198.51.100.0/24";
const DEFAULT_PUBLIC_V6_POOL: &str = "2001:db8:a10f::/48";

fn db_u32(value: i64, what: &str) -> Result<u32, DbError> {
    u32::try_from(value).map_err(|_| DbError::Corrupt(format!("{what} {value} is out of range")))
}

fn network_name(name: &str) -> &str {
    if name.is_empty() {
        DEFAULT_NETWORK
    } else {
        name
    }
}

fn find_network_in(c: &mut dyn Conn, org_id: &str, name: &str) -> Result<Option<u32>, DbError> {
    c.query_one(
        "SELECT id FROM networks WHERE org_id = $1 AND name = $2",
        &[org_id.into(), name.into()],
    )?
    .map(|r| db_u32(r.int(0)?, "network id"))
    .transpose()
}

/// The network number of `(org, name)` inside a transaction, assigned on first use and
/// never reused. Looked up before inserting, so PostgreSQL's sequence is only advanced
/// when a network is new.
pub fn network_id_in(c: &mut dyn Conn, org_id: &str, name: &str) -> Result<u32, DbError> {
    let name = network_name(name);
    if let Some(id) = find_network_in(c, org_id, name)? {
        return Ok(id);
    }
    c.execute(
        "INSERT INTO networks(org_id, name, created_at) VALUES ($1, $2, $3) ON CONFLICT (org_id, name) DO NOTHING",
        &[org_id.into(), name.into(), now_rfc3339().into()],
    )?;
    find_network_in(c, org_id, name)?
        .ok_or_else(|| DbError::Corrupt(format!("network {name} of org {org_id} vanished")))
}

/// The network number of `(org, name)`, assigned on first use and never reused.
pub fn network_id(store: &Store, org_id: &str, name: &str) -> StoreResult<u32> {
    if let Some(id) = find_network(store, org_id, network_name(name))? {
        return Ok(id);
    }
    store.tx(|c| network_id_in(c, org_id, name))
}

/// The network number of `(org, name)` if it exists.
pub fn find_network(store: &Store, org_id: &str, name: &str) -> StoreResult<Option<u32>> {
    store.read(|c| find_network_in(c, org_id, name))
}

/// The number of a host in 6PN addresses (1, 2, ...; 0 is the service block).
pub fn host_number_in(c: &mut dyn Conn, host_id: &str) -> Result<u32, DbError> {
    let lookup = |c: &mut dyn Conn| -> Result<Option<u32>, DbError> {
        c.query_one(
            "SELECT number FROM host_numbers WHERE host_id = $1",
            &[host_id.into()],
        )?
        .map(|r| db_u32(r.int(0)?, "host number"))
        .transpose()
    };
    if let Some(number) = lookup(c)? {
        return Ok(number);
    }
    // `WHERE true` keeps SQLite from reading ON CONFLICT as part of the SELECT.
    c.execute(
        "INSERT INTO host_numbers(host_id, number) SELECT $1, COALESCE(MAX(number), 0) + 1 FROM host_numbers WHERE true ON CONFLICT (host_id) DO NOTHING",
        &[host_id.into()],
    )?;
    lookup(c)?.ok_or_else(|| DbError::Corrupt(format!("host number of {host_id} vanished")))
}

pub fn host_number(store: &Store, host_id: &str) -> StoreResult<u32> {
    store.tx(|c| host_number_in(c, host_id))
}

/// The next value of a named counter (1, 2, ...), durable once the transaction commits.
pub fn next_counter_in(c: &mut dyn Conn, name: &str) -> Result<u32, DbError> {
    let row = c
        .query_one(
            "INSERT INTO address_counters(name, value) VALUES ($1, 1)
             ON CONFLICT (name) DO UPDATE SET value = address_counters.value + 1 RETURNING value",
            &[name.into()],
        )?
        .ok_or_else(|| DbError::Corrupt(format!("counter {name} returned nothing")))?;
    db_u32(row.int(0)?, name)
}

fn next_counter(store: &Store, name: &str) -> StoreResult<u32> {
    store.tx(|c| next_counter_in(c, name))
}

/// The 6PN address of a new machine of `app` placed on `host_id`, allocated inside the
/// caller's transaction (the one that stores the machine).
pub fn machine_private_ip_in(
    c: &mut dyn Conn,
    app: &AppRow,
    host_id: &str,
) -> Result<String, DbError> {
    let network = network_id_in(c, &app.org_id, &app.network)?;
    let host = host_number_in(c, host_id)?;
    let machine = next_counter_in(c, "machine")?;
    Ok(sixpn::machine_address(network, host, machine).to_string())
}

/// The 6PN address of a new machine of `app` placed on `host_id`.
pub fn machine_private_ip(store: &Store, app: &AppRow, host_id: &str) -> StoreResult<String> {
    store.tx(|c| machine_private_ip_in(c, app, host_id))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpRow {
    pub address: String,
    pub app_id: String,
    /// `v4`, `shared_v4`, `v6`, `private_v6`.
    pub kind: String,
    pub region: String,
    pub network_id: Option<u32>,
    pub service_name: String,
    pub created_at: String,
}

pub fn app_ips(store: &Store, app_id: &str) -> StoreResult<Vec<IpRow>> {
    store.read(|c| {
        c.query(
            "SELECT address, app_id, type, region, network_id, service_name, created_at FROM ip_assignments
             WHERE app_id = $1 ORDER BY created_at, address",
            &[app_id.into()],
        )?
        .iter()
        .map(|r| {
            Ok(IpRow {
                address: r.text(0)?,
                app_id: r.text(1)?,
                kind: r.text(2)?,
                region: r.text(3)?,
                network_id: r
                    .opt_int(4)?
                    .map(|n| db_u32(n, "network id"))
                    .transpose()?,
                service_name: r.text(5)?,
                created_at: r.text(6)?,
            })
        })
        .collect()
    })
}

/// What the catalog says about an app's networking: its network number and addresses.
pub fn catalog_fields(store: &Store, app: &AppRow) -> StoreResult<(u32, Vec<CatalogIp>)> {
    let network = network_id(store, &app.org_id, &app.network)?;
    let ips = app_ips(store, &app.id)?
        .into_iter()
        .map(|ip| CatalogIp {
            address: ip.address,
            kind: ip.kind,
        })
        .collect();
    Ok((network, ips))
}

fn insert_ip(store: &Store, ip: &IpRow) -> StoreResult<()> {
    store.tx(|c| {
        c.execute(
            "INSERT INTO ip_assignments(address, app_id, type, region, network_id, service_name, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                (&ip.address).into(),
                (&ip.app_id).into(),
                (&ip.kind).into(),
                (&ip.region).into(),
                ip.network_id.map(i64::from).into(),
                (&ip.service_name).into(),
                (&ip.created_at).into(),
            ],
        )
        .map(|_| ())
    })
}

fn delete_ip(store: &Store, app_id: &str, address: &str) -> StoreResult<()> {
    store.tx(|c| {
        c.execute(
            "DELETE FROM ip_assignments WHERE address = $1 AND app_id = $2",
            &[address.into(), app_id.into()],
        )
        .map(|_| ())
    })
}

fn setting_or(store: &Store, key: &str, default: &str) -> StoreResult<String> {
    Ok(store
        .setting(key)?
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string()))
}

/// Address `index` of a pool given as `address/len` (index 0 is the pool's own address).
fn pool_address(pool: &str, index: u32) -> Result<IpAddr, String> {
    let (base, len) = pool
        .split_once('/')
        .ok_or_else(|| format!("address pool {pool:?} is not in address/length form"))?;
    let base: IpAddr = base
        .parse()
        .map_err(|_| format!("address pool {pool:?} has an invalid address"))?;
    let len: u32 = len
        .parse()
        .map_err(|_| format!("address pool {pool:?} has an invalid length"))?;
    match base {
        IpAddr::V4(v4) if len <= 32 => {
            let size = 1u64 << (32 - len);
            if u64::from(index) + 1 >= size {
                return Err(format!("address pool {pool} is exhausted"));
            }
            Ok(IpAddr::V4(Ipv4Addr::from(
                u32::from(v4).wrapping_add(index),
            )))
        }
        IpAddr::V6(v6) if len <= 128 => {
            if len > 96 && u64::from(index) >= (1u64 << (128 - len)) {
                return Err(format!("address pool {pool} is exhausted"));
            }
            Ok(IpAddr::V6(Ipv6Addr::from(
                u128::from(v6).wrapping_add(u128::from(index)),
            )))
        }
        _ => Err(format!("address pool {pool:?} has an invalid length")),
    }
}

/// `POST /v1/apps/{app}/ip_assignments` (fly-go's `AssignIPRequest`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, utoipa::ToSchema)]
pub struct AssignIpRequest {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub org_slug: String,
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub service_name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
pub struct IpNetwork {
    /// Empty for an organization's default network.
    pub name: String,
    pub org_slug: String,
}

/// One address of an app (fly-go's `IPAssignment`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
pub struct IpAssignment {
    pub ip: String,
    pub region: String,
    pub service_name: String,
    pub shared: bool,
    pub created_at: String,
    pub egress: bool,
    #[serde(rename = "type")]
    pub kind: String,
    pub network: Option<IpNetwork>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, utoipa::ToSchema)]
pub struct ListIpAssignments {
    pub ips: Vec<IpAssignment>,
}

/// `GET /v1/apps/{app}/private_network`: where the app's machines are.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
pub struct PrivateNetwork {
    pub name: String,
    pub org_slug: String,
    pub network_id: u32,
    /// `fdaa:<network>::/48`.
    pub prefix: String,
    /// The network's DNS server (`fdaa:<network>::3`).
    pub dns: String,
}

pub fn routes() -> Router<Arc<ControlPlane>> {
    Router::new()
        .route("/v1/apps/{app}/ip_assignments", get(list).post(assign))
        .route("/v1/apps/{app}/ip_assignments/{ip}", delete(release))
        .route("/v1/apps/{app}/private_network", get(private_network))
}

type Plane = State<Arc<ControlPlane>>;

fn visible_app(plane: &ControlPlane, caller: &Caller, name: &str) -> ApiResult<AppRow> {
    match plane.store.app(name)? {
        Some(app) if caller.sees_app(&app) => Ok(app),
        _ => Err(ApiError::not_found(format!("app not found: {name}"))),
    }
}

/// The network (name, org) of an address with one.
pub fn network_view(plane: &ControlPlane, network_id: Option<u32>) -> ApiResult<Option<IpNetwork>> {
    let Some(id) = network_id else {
        return Ok(None);
    };
    let row: Option<(String, String)> = plane.store.read(|c| {
        c.query_one(
            "SELECT n.name, o.slug FROM networks n JOIN orgs o ON o.id = n.org_id WHERE n.id = $1",
            &[i64::from(id).into()],
        )?
        .map(|r| Ok((r.text(0)?, r.text(1)?)))
        .transpose()
    })?;
    Ok(row.map(|(name, org_slug)| IpNetwork {
        name: if name == DEFAULT_NETWORK {
            String::new()
        } else {
            name
        },
        org_slug,
    }))
}

fn view(plane: &ControlPlane, ip: &IpRow) -> ApiResult<IpAssignment> {
    Ok(IpAssignment {
        ip: ip.address.clone(),
        region: ip.region.clone(),
        service_name: ip.service_name.clone(),
        shared: ip.kind == "shared_v4",
        created_at: ip.created_at.clone(),
        egress: false,
        kind: ip.kind.clone(),
        network: network_view(plane, ip.network_id)?,
    })
}

#[utoipa::path(get, path = "/v1/apps/{app}/ip_assignments", tag = "IPs", operation_id = "IPs_list",
    params(("app" = String, Path)), responses((status = 200, body = ListIpAssignments), ErrorAnswers))]
async fn list(
    State(plane): Plane,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<ListIpAssignments>> {
    let app = visible_app(&plane, &caller, &name)?;
    let ips = app_ips(&plane.store, &app.id)?
        .iter()
        .map(|ip| view(&plane, ip))
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(Json(ListIpAssignments { ips }))
}

#[utoipa::path(post, path = "/v1/apps/{app}/ip_assignments", tag = "IPs", operation_id = "IPs_assign",
    params(("app" = String, Path)), request_body = AssignIpRequest,
    responses((status = 201, body = IpAssignment), (status = 200, description = "The app already had this kind of shared or Flycast address", body = IpAssignment), ErrorAnswers))]
async fn assign(
    State(plane): Plane,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(request): JsonBody<AssignIpRequest>,
) -> ApiResult<(StatusCode, Json<IpAssignment>)> {
    let app = visible_app(&plane, &caller, &name)?;
    caller.require_write()?;
    let store = &plane.store;
    let existing = app_ips(store, &app.id)?;
    let region = if request.region.is_empty() {
        "global".to_string()
    } else {
        request.region.clone()
    };
    let (address, network_id) = match request.kind.as_str() {
        "private_v6" => {
            // Another org's network only for a caller of that org too; one it can't see
            // answers as one that doesn't exist.
            let org = match request.org_slug.as_str() {
                "" => store.org_by_id(&app.org_id)?,
                slug => store
                    .org_by_slug(slug)?
                    .filter(|org| caller.in_org(&org.id)),
            }
            .ok_or_else(|| {
                ApiError::not_found(format!("organization not found: {}", request.org_slug))
            })?;
            let network_name = if request.network.is_empty() {
                if org.id == app.org_id {
                    app.network.clone()
                } else {
                    DEFAULT_NETWORK.to_string()
                }
            } else {
                crate::names::validate_app_name(&request.network)
                    .map_err(|e| ApiError::bad_request(format!("network: {e}")))?;
                request.network.clone()
            };
            let network = network_id(store, &org.id, &network_name)?;
            if let Some(ip) = existing
                .iter()
                .find(|ip| ip.kind == "private_v6" && ip.network_id == Some(network))
            {
                return Ok((StatusCode::OK, Json(view(&plane, ip)?)));
            }
            let k = next_counter(store, &format!("flycast:{network}"))?;
            (
                sixpn::flycast_address(network, k).to_string(),
                Some(network),
            )
        }
        "shared_v4" => {
            if let Some(ip) = existing.iter().find(|ip| ip.kind == "shared_v4") {
                return Ok((StatusCode::OK, Json(view(&plane, ip)?)));
            }
            (
                setting_or(store, SETTING_SHARED_V4, DEFAULT_SHARED_V4)?,
                None,
            )
        }
        "v4" | "v6" => {
            let (key, default) = if request.kind == "v4" {
                (SETTING_PUBLIC_V4_POOL, DEFAULT_PUBLIC_V4_POOL)
            } else {
                (SETTING_PUBLIC_V6_POOL, DEFAULT_PUBLIC_V6_POOL)
            };
            let pool = setting_or(store, key, default)?;
            let index = next_counter(store, &format!("pool:{}", request.kind))?;
            (
                pool_address(&pool, index)
                    .map_err(ApiError::unavailable)?
                    .to_string(),
                None,
            )
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "invalid ip type {other:?}: use one of v4, shared_v4, v6, private_v6"
            )));
        }
    };
    let row = IpRow {
        address,
        app_id: app.id.clone(),
        kind: request.kind.clone(),
        region,
        network_id,
        service_name: request.service_name.clone(),
        created_at: now_rfc3339(),
    };
    insert_ip(store, &row)?;
    plane.catalog.app_changed(&app);
    Ok((StatusCode::CREATED, Json(view(&plane, &row)?)))
}

#[utoipa::path(delete, path = "/v1/apps/{app}/ip_assignments/{ip}", tag = "IPs", operation_id = "IPs_release",
    params(("app" = String, Path), ("ip" = String, Path)), responses((status = 204, description = "Released"), ErrorAnswers))]
async fn release(
    State(plane): Plane,
    caller: Caller,
    Path((name, ip)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let app = visible_app(&plane, &caller, &name)?;
    caller.require_write()?;
    let wanted: IpAddr = ip
        .parse()
        .map_err(|_| ApiError::bad_request(format!("{ip} is not an IP address")))?;
    let stored = app_ips(&plane.store, &app.id)?;
    let Some(row) = stored
        .iter()
        .find(|row| row.address.parse::<IpAddr>().ok() == Some(wanted))
    else {
        return Err(ApiError::not_found(format!(
            "ip address {ip} not found on app {}",
            app.name
        )));
    };
    delete_ip(&plane.store, &app.id, &row.address)?;
    plane.catalog.app_changed(&app);
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/apps/{app}/private_network", tag = "IPs", operation_id = "IPs_private_network",
    params(("app" = String, Path)), responses((status = 200, body = PrivateNetwork), ErrorAnswers))]
async fn private_network(
    State(plane): Plane,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<PrivateNetwork>> {
    let app = visible_app(&plane, &caller, &name)?;
    let id = network_id(&plane.store, &app.org_id, &app.network)?;
    Ok(Json(PrivateNetwork {
        name: app.network.clone(),
        org_slug: app.org_slug.clone(),
        network_id: id,
        prefix: sixpn::network_cidr(id),
        dns: sixpn::network_dns(id).to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::OrgRow;

    fn store() -> (Store, AppRow) {
        let store = Store::open_in_memory().unwrap();
        store
            .create_org(&OrgRow {
                id: "o1".into(),
                slug: "personal".into(),
                name: "P".into(),
                created_at: now_rfc3339(),
            })
            .unwrap();
        store
            .create_org(&OrgRow {
                id: "o2".into(),
                slug: "other".into(),
                name: "O".into(),
                created_at: now_rfc3339(),
            })
            .unwrap();
        let app = AppRow {
            id: "a1".into(),
            name: "api".into(),
            org_id: "o1".into(),
            org_slug: "personal".into(),
            network: "default".into(),
            status: "pending".into(),
            created_at: now_rfc3339(),
        };
        store.create_app(&app).unwrap();
        (store, app)
    }

    #[test]
    fn networks_are_per_org_and_name_and_stable() {
        let (store, _) = store();
        let a = network_id(&store, "o1", "default").unwrap();
        let b = network_id(&store, "o2", "default").unwrap();
        let c = network_id(&store, "o1", "blue").unwrap();
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(network_id(&store, "o1", "default").unwrap(), a);
        assert_eq!(
            network_id(&store, "o1", "").unwrap(),
            a,
            "empty means the default network"
        );
        assert_eq!(find_network(&store, "o2", "blue").unwrap(), None);
    }

    #[test]
    fn machine_addresses_embed_network_host_and_a_fresh_machine_number() {
        let (store, app) = store();
        let first: Ipv6Addr = machine_private_ip(&store, &app, "host-a")
            .unwrap()
            .parse()
            .unwrap();
        let second: Ipv6Addr = machine_private_ip(&store, &app, "host-b")
            .unwrap()
            .parse()
            .unwrap();
        let third: Ipv6Addr = machine_private_ip(&store, &app, "host-a")
            .unwrap()
            .parse()
            .unwrap();
        let network = network_id(&store, "o1", "default").unwrap();
        let p1 = sixpn::parts(&first).unwrap();
        let p2 = sixpn::parts(&second).unwrap();
        let p3 = sixpn::parts(&third).unwrap();
        assert_eq!((p1.network, p2.network), (network, network));
        assert_eq!(p1.host, p3.host);
        assert_ne!(p1.host, p2.host);
        assert!(p1.host > 0, "host 0 is the service block");
        assert!(p1.machine != p2.machine && p2.machine != p3.machine && p1.machine != p3.machine);
        assert_eq!(first.segments()[7], 2);
    }

    #[test]
    fn pools_hand_out_addresses_in_order() {
        assert_eq!(
            pool_address("198.51.100.0/24", 1).unwrap().to_string(),
            "198.51.100.1"
        );
        assert!(pool_address("198.51.100.0/24", 255).is_err());
        assert_eq!(
            pool_address("2001:db8::/48", 0x10).unwrap().to_string(),
            "2001:db8::10"
        );
        assert!(pool_address("nonsense", 1).is_err());
    }
}
