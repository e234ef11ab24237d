//! Server-side deploy operations and their event logs, so a deploy outlives the process
//! that started it: what was asked, its release, how far the rollout got, how it ended.
//!
//! A running deploy is held by one control plane at a time through a lease in its row
//! (`lease_owner`, `lease_expires_at` in Unix milliseconds): taken and renewed with a
//! compare-and-set in one statement, so control planes sharing one database never run
//! the same deploy, and one whose holder stopped renewing is taken over once it expires.

use super::db::{DbResult, Row};
use super::{RELEASE_COLUMNS, ReleaseRow, Store, StoreResult, now_rfc3339, release_from_row};

/// One deploy operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeployRow {
    pub id: String,
    pub app_id: String,
    /// `running`, `complete` or `failed`.
    pub status: String,
    /// The deploy request as the client sent it (JSON).
    pub request: String,
    /// Who started it (the token's name).
    pub user: String,
    /// Empty until the deploy has made its release.
    pub release_id: String,
    /// The rollout's own record of how far it got (JSON, owned by `deploy`).
    pub progress: String,
    pub created_at: String,
    pub updated_at: String,
    /// The control plane running it (empty when none holds it).
    pub lease_owner: String,
    /// Until when (Unix milliseconds) `lease_owner` holds it unless renewed.
    pub lease_expires_at: i64,
}

const COLUMNS: &str = "id, app_id, status, request, created_by, release_id, progress, created_at, updated_at, lease_owner, lease_expires_at";

fn from_row(row: &Row) -> DbResult<DeployRow> {
    Ok(DeployRow {
        id: row.text(0)?,
        app_id: row.text(1)?,
        status: row.text(2)?,
        request: row.text(3)?,
        user: row.text(4)?,
        release_id: row.text(5)?,
        progress: row.text(6)?,
        created_at: row.text(7)?,
        updated_at: row.text(8)?,
        lease_owner: row.text(9)?,
        lease_expires_at: row.int(10)?,
    })
}

impl Store {
    pub fn insert_deploy(&self, deploy: &DeployRow) -> StoreResult<()> {
        self.execute(
            &format!("INSERT INTO deploy_operations({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"),
            &[
                (&deploy.id).into(),
                (&deploy.app_id).into(),
                (&deploy.status).into(),
                (&deploy.request).into(),
                (&deploy.user).into(),
                (&deploy.release_id).into(),
                (&deploy.progress).into(),
                (&deploy.created_at).into(),
                (&deploy.updated_at).into(),
                (&deploy.lease_owner).into(),
                deploy.lease_expires_at.into(),
            ],
        )
    }

    /// Takes the lease of a running deploy for `owner` until `expires_at` (Unix ms) if
    /// nobody holds it, `owner` already does, or its holder's lease ended before `now`.
    /// One compare-and-set: of several claimers at once, exactly one gets it.
    pub fn claim_deploy(
        &self,
        id: &str,
        owner: &str,
        now: i64,
        expires_at: i64,
    ) -> StoreResult<bool> {
        self.tx(|c| {
            c.execute(
                "UPDATE deploy_operations SET lease_owner = $2, lease_expires_at = $3 \
                 WHERE id = $1 AND status = 'running' \
                 AND (lease_owner = '' OR lease_owner = $2 OR lease_expires_at < $4)",
                &[id.into(), owner.into(), expires_at.into(), now.into()],
            )
        })
        .map(|changed| changed == 1)
    }

    /// Extends `owner`'s lease of a running deploy to `expires_at`; false when `owner`
    /// no longer holds it (another control plane took it over, or it ended).
    pub fn renew_deploy_lease(&self, id: &str, owner: &str, expires_at: i64) -> StoreResult<bool> {
        self.tx(|c| {
            c.execute(
                "UPDATE deploy_operations SET lease_expires_at = $3 \
                 WHERE id = $1 AND status = 'running' AND lease_owner = $2",
                &[id.into(), owner.into(), expires_at.into()],
            )
        })
        .map(|changed| changed == 1)
    }

    pub fn deploy(&self, id: &str) -> StoreResult<Option<DeployRow>> {
        self.read(|c| {
            c.query_one(
                &format!("SELECT {COLUMNS} FROM deploy_operations WHERE id = $1"),
                &[id.into()],
            )?
            .map(|r| from_row(&r))
            .transpose()
        })
    }

    /// The app's deploys, newest first.
    pub fn deploys_of_app(&self, app_id: &str, limit: usize) -> StoreResult<Vec<DeployRow>> {
        self.read(|c| {
            c.query(
                &format!("SELECT {COLUMNS} FROM deploy_operations WHERE app_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2"),
                &[app_id.into(), (limit as i64).into()],
            )?
            .iter()
            .map(from_row)
            .collect()
        })
    }

    /// Deploys that have not ended, oldest first.
    pub fn unfinished_deploys(&self) -> StoreResult<Vec<DeployRow>> {
        self.read(|c| {
            c.query(
                &format!("SELECT {COLUMNS} FROM deploy_operations WHERE status = 'running' ORDER BY created_at, id"),
                &[],
            )?
            .iter()
            .map(from_row)
            .collect()
        })
    }

    pub fn set_deploy_release(&self, id: &str, release_id: &str) -> StoreResult<()> {
        self.execute(
            "UPDATE deploy_operations SET release_id = $2, updated_at = $3 WHERE id = $1",
            &[id.into(), release_id.into(), now_rfc3339().into()],
        )
    }

    pub fn set_deploy_progress(&self, id: &str, progress: &str) -> StoreResult<()> {
        self.execute(
            "UPDATE deploy_operations SET progress = $2, updated_at = $3 WHERE id = $1",
            &[id.into(), progress.into(), now_rfc3339().into()],
        )
    }

    pub fn set_deploy_status(&self, id: &str, status: &str) -> StoreResult<()> {
        self.execute(
            "UPDATE deploy_operations SET status = $2, updated_at = $3 WHERE id = $1",
            &[id.into(), status.into(), now_rfc3339().into()],
        )
    }

    /// Appends one event (JSON) to a deploy's log; `seq` counts from 0.
    pub fn append_deploy_event(&self, id: &str, seq: u64, event: &str) -> StoreResult<()> {
        self.execute(
            "INSERT INTO deploy_events(deploy_id, seq, event) VALUES ($1, $2, $3)",
            &[id.into(), seq.into(), event.into()],
        )
    }

    /// A deploy's events (JSON), in order.
    pub fn deploy_events(&self, id: &str) -> StoreResult<Vec<String>> {
        self.read(|c| {
            c.query(
                "SELECT event FROM deploy_events WHERE deploy_id = $1 ORDER BY seq",
                &[id.into()],
            )?
            .iter()
            .map(|r| r.text(0))
            .collect()
        })
    }

    /// A deploy's events (JSON) from number `seq` on, in order.
    pub fn deploy_events_since(&self, id: &str, seq: u64) -> StoreResult<Vec<String>> {
        self.read(|c| {
            c.query(
                "SELECT event FROM deploy_events WHERE deploy_id = $1 AND seq >= $2 ORDER BY seq",
                &[id.into(), seq.into()],
            )?
            .iter()
            .map(|r| r.text(0))
            .collect()
        })
    }

    /// Forgets the app's finished deploys but the newest `keep`.
    pub fn prune_deploys(&self, app_id: &str, keep: usize) -> StoreResult<()> {
        let old = "SELECT id FROM deploy_operations WHERE app_id = $1 AND status != 'running' AND id NOT IN (SELECT id FROM deploy_operations WHERE app_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2)";
        self.tx(|c| {
            let params = [app_id.into(), (keep as i64).into()];
            c.execute(
                &format!("DELETE FROM deploy_events WHERE deploy_id IN ({old})"),
                &params,
            )?;
            c.execute(
                &format!("DELETE FROM deploy_operations WHERE id IN ({old})"),
                &params,
            )?;
            Ok(())
        })
    }

    pub fn release(&self, id: &str) -> StoreResult<Option<ReleaseRow>> {
        self.read(|c| {
            c.query_one(
                &format!("SELECT {RELEASE_COLUMNS} FROM releases WHERE id = $1"),
                &[id.into()],
            )?
            .map(|r| release_from_row(&r))
            .transpose()
        })
    }
}
