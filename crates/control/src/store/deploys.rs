//! Server-side deploy operations and their event logs, so a deploy outlives the process
//! that started it: what was asked, its release, how far the rollout got, how it ended.

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
}

const COLUMNS: &str =
    "id, app_id, status, request, created_by, release_id, progress, created_at, updated_at";

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
    })
}

impl Store {
    pub fn insert_deploy(&self, deploy: &DeployRow) -> StoreResult<()> {
        self.execute(
            &format!("INSERT INTO deploy_operations({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"),
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
            ],
        )
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
