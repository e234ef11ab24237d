//! The store suite: the same checks against every backend. PostgreSQL runs when
//! `ALOFT_TEST_POSTGRES_URL` names a server (scripts/test.sh starts one and sets it).

use super::*;

fn org() -> OrgRow {
    OrgRow {
        id: "o1".into(),
        slug: "personal".into(),
        name: "Personal".into(),
        created_at: now_rfc3339(),
    }
}

fn app_row() -> AppRow {
    AppRow {
        id: "a1".into(),
        name: "hello".into(),
        org_id: "o1".into(),
        org_slug: "personal".into(),
        network: "default".into(),
        status: "pending".into(),
        created_at: now_rfc3339(),
    }
}

fn machine(id: &str, app: &AppRow, region: &str) -> MachineRow {
    let mut config = MachineConfig {
        image: "img".into(),
        ..Default::default()
    };
    config
        .metadata
        .insert("fly_process_group".into(), "web".into());
    MachineRow {
        id: id.into(),
        app_id: app.id.clone(),
        app_name: app.name.clone(),
        name: format!("name-{id}"),
        region: region.into(),
        host_id: "h1".into(),
        state: MachineState::Created,
        instance_id: format!("v1-{id}"),
        config,
        private_ip: None,
        private_ipv4: None,
        created_at: now_rfc3339(),
        updated_at: now_rfc3339(),
        cordoned: false,
        recent_events: vec![event("launch", "created")],
    }
}

fn event(kind: &str, status: &str) -> MachineEvent {
    MachineEvent {
        id: ulid::Ulid::new().to_string(),
        kind: kind.into(),
        status: status.into(),
        source: "user".into(),
        timestamp: now_millis(),
        request: None,
    }
}

/// Every check, against one backend.
pub fn suite(store: &Store) {
    store.create_org(&org()).unwrap();
    assert!(matches!(
        store.create_org(&org()),
        Err(StoreError::Conflict(_))
    ));
    let app = app_row();
    store.create_app(&app).unwrap();
    let err = store
        .create_app(&AppRow {
            id: "a2".into(),
            ..app.clone()
        })
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict(ref m) if m == "app hello already exists"),
        "{err}"
    );
    assert_eq!(store.app("hello").unwrap().unwrap().org_slug, "personal");
    assert!(store.app("nope").unwrap().is_none());
    assert_eq!(store.list_apps(Some("o1")).unwrap().len(), 1);
    assert_eq!(store.list_apps(None).unwrap().len(), 1);

    // settings
    assert_eq!(store.setting("k").unwrap(), None);
    store.set_setting("k", "v1").unwrap();
    store.set_setting("k", "v2").unwrap();
    assert_eq!(store.setting("k").unwrap().as_deref(), Some("v2"));

    // tokens
    let token = TokenRow {
        id: "t1".into(),
        org_id: "o1".into(),
        kind: "user".into(),
        name: "admin".into(),
        key: vec![0, 1, 2, 255],
        created_at: now_rfc3339(),
        revoked: false,
        expires_at: Some(42),
        apps: vec!["hello".into()],
    };
    store.insert_token(&token).unwrap();
    assert_eq!(store.token("t1").unwrap().unwrap(), token);
    assert_eq!(store.token_org_ids("t1").unwrap(), vec!["o1".to_string()]);
    let second = OrgRow {
        id: "o2".into(),
        slug: "acme".into(),
        name: "Acme".into(),
        created_at: now_rfc3339(),
    };
    store.create_org_for(&second, Some("t1")).unwrap();
    assert_eq!(
        store.token_org_ids("t1").unwrap(),
        vec!["o1".to_string(), "o2".to_string()]
    );
    store.add_token_org("t1", "o2").unwrap();
    assert_eq!(store.token_org_ids("t1").unwrap().len(), 2);
    assert_eq!(
        store.token_keys().unwrap(),
        vec![("t1".to_string(), vec![0, 1, 2, 255])]
    );
    assert!(!store.set_token_key("t1", b"not the key", b"x").unwrap());
    assert!(
        store
            .set_token_key("t1", &[0, 1, 2, 255], b"sealed")
            .unwrap()
    );
    assert_eq!(store.token("t1").unwrap().unwrap().key, b"sealed".to_vec());
    assert!(store.revoke_token("t1").unwrap());
    assert!(store.token("t1").unwrap().unwrap().revoked);
    assert_eq!(store.list_tokens("o1").unwrap().len(), 1);

    // machines: round trip, transitions, filters, versions, metadata
    let m1 = machine("m1", &app, "iad");
    store.insert_machine(&m1).unwrap();
    store.insert_machine(&machine("m2", &app, "fra")).unwrap();
    let loaded = store.machine("m1").unwrap().unwrap();
    assert_eq!(loaded, m1);
    assert_eq!(loaded.process_group(), Some("web"));

    let moved = store
        .transition(
            "m1",
            &[MachineState::Created, MachineState::Stopped],
            MachineState::Starting,
            Some(&event("start", "starting")),
        )
        .unwrap();
    assert_eq!(moved.unwrap().state, MachineState::Created);
    assert!(
        store
            .transition("m1", &[MachineState::Created], MachineState::Starting, None)
            .unwrap()
            .is_none(),
        "a machine no longer in `from` is not moved"
    );
    let loaded = store.machine("m1").unwrap().unwrap();
    assert_eq!(loaded.state, MachineState::Starting);
    assert_eq!(
        loaded
            .recent_events
            .iter()
            .map(|e| e.kind.as_str())
            .collect::<Vec<_>>(),
        vec!["start", "launch"]
    );
    assert_eq!(store.events("m1", 10).unwrap().len(), 2);

    assert!(
        store
            .apply_agent_status(
                "m1",
                5,
                MachineState::Started,
                Some("172.19.0.2"),
                Some(&event("start", "started"))
            )
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .apply_agent_status("m1", 4, MachineState::Stopped, None, None)
            .unwrap()
            .is_none(),
        "older reports are ignored"
    );
    let loaded = store.machine("m1").unwrap().unwrap();
    assert_eq!(loaded.state, MachineState::Started);
    assert_eq!(loaded.private_ipv4.as_deref(), Some("172.19.0.2"));

    let by_region = store
        .list_machines_filtered(
            &app.id,
            &MachineFilter {
                region: Some("fra".into()),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        by_region.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        vec!["m2"]
    );
    assert!(
        store
            .set_machine_metadata("m2", "role", Some("primary"))
            .unwrap()
    );
    let by_meta = store
        .list_machines_filtered(
            &app.id,
            &MachineFilter {
                metadata: vec![("role".into(), "primary".into())],
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        by_meta.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        vec!["m2"]
    );
    assert!(store.set_machine_metadata("m2", "role", None).unwrap());
    assert!(
        !store
            .machine("m2")
            .unwrap()
            .unwrap()
            .config
            .metadata
            .contains_key("role")
    );

    let mut config = m1.config.clone();
    config.image = "img:2".into();
    store
        .update_machine_config(
            "m1",
            "v2-m1",
            &config,
            MachineState::Replacing,
            Some(&event("update", "replacing")),
        )
        .unwrap();
    let versions = store.machine_versions("m1").unwrap();
    assert_eq!(versions.len(), 2);
    assert!(
        versions
            .iter()
            .any(|v| v.version == "v2-m1" && v.config.image == "img:2")
    );
    assert_eq!(store.machine("m1").unwrap().unwrap().instance_id, "v2-m1");

    assert!(store.set_machine_cordoned("m1", true).unwrap());
    assert!(
        !store.set_machine_cordoned("m1", true).unwrap(),
        "cordoning a cordoned machine changes nothing"
    );
    let loaded = store.machine("m1").unwrap().unwrap();
    assert!(loaded.cordoned);
    assert_eq!(store.count_machines(&app.id).unwrap(), 2);
    assert_eq!(store.machine_counts().unwrap().get("a1"), Some(&2));

    store
        .set_machine_state("m2", MachineState::Destroyed)
        .unwrap();
    assert_eq!(store.list_machines(&app.id, false).unwrap().len(), 1);
    assert_eq!(store.list_machines(&app.id, true).unwrap().len(), 2);
    assert_eq!(store.all_live_machines().unwrap().len(), 1);

    // leases
    let now = 1_000;
    let wanted = LeaseRow {
        machine_id: "m1".into(),
        nonce: "n1".into(),
        owner: "me".into(),
        description: "deploy".into(),
        expires_at: now + 30,
        version: "v".into(),
    };
    assert_eq!(store.acquire_lease(&wanted, None, now).unwrap().nonce, "n1");
    let other = LeaseRow {
        nonce: "n2".into(),
        owner: "you".into(),
        ..wanted.clone()
    };
    assert!(
        matches!(
            store.acquire_lease(&other, None, now),
            Err(StoreError::Conflict(_))
        ),
        "a held lease refuses another taker"
    );
    let refreshed = store
        .acquire_lease(
            &LeaseRow {
                expires_at: now + 60,
                ..other.clone()
            },
            Some("n1"),
            now,
        )
        .unwrap();
    assert_eq!(
        (refreshed.nonce.as_str(), refreshed.expires_at),
        ("n1", now + 60),
        "the holder refreshes, keeping its nonce"
    );
    assert!(matches!(
        store.release_lease("m1", "wrong", now),
        Err(StoreError::Conflict(_))
    ));
    let taken_over = store.acquire_lease(&other, None, now + 61).unwrap();
    assert_eq!(taken_over.nonce, "n2", "an expired lease can be taken");
    assert!(store.release_lease("m1", "n2", now + 61).unwrap());
    assert!(!store.release_lease("m1", "n2", now + 61).unwrap());
    assert!(store.lease("m1").unwrap().is_none());

    // releases
    assert_eq!(
        store
            .create_release(&app.id, "r1", "img", "{}", "first", "admin")
            .unwrap()
            .version,
        1
    );
    assert_eq!(
        store
            .create_release(&app.id, "r2", "img", "{}", "second", "admin")
            .unwrap()
            .version,
        2
    );
    store.set_release_status("r2", "complete").unwrap();
    let list = store.releases(&app.id, 10).unwrap();
    assert_eq!(
        list.iter().map(|r| r.version).collect::<Vec<_>>(),
        vec![2, 1]
    );
    assert_eq!(list[0].status, "complete");
    assert_eq!(list[0].user, "admin");
    assert_eq!(
        store
            .interrupt_running_releases("cp-a", now_millis())
            .unwrap(),
        1
    );
    assert_eq!(
        store.releases(&app.id, 10).unwrap()[1].status,
        "interrupted"
    );
    assert!(store.latest_release_times().unwrap().contains_key("a1"));

    // hosts
    store
        .upsert_host(&HostRow {
            id: "h1".into(),
            region: "local".into(),
            agent_url: "http://x".into(),
            last_seen: now_rfc3339(),
            cpus: 4,
            memory_mb: 8192,
            cordoned: false,
        })
        .unwrap();
    store
        .upsert_host(&HostRow {
            id: "h1".into(),
            region: "iad".into(),
            agent_url: "http://y".into(),
            last_seen: now_rfc3339(),
            cpus: 8,
            memory_mb: 16384,
            cordoned: false,
        })
        .unwrap();
    assert_eq!(store.hosts().unwrap()[0].region, "iad");
    assert_eq!(store.hosts().unwrap()[0].cpus, 8);
    assert_eq!(store.hosts().unwrap()[0].memory_mb, 16384);
    assert!(store.set_host_cordoned("h1", true).unwrap());
    assert!(!store.set_host_cordoned("nope", true).unwrap());
    assert!(store.host("h1").unwrap().unwrap().cordoned);
    assert!(store.touch_host("h1", "2030-01-01T00:00:00Z").unwrap());
    assert!(!store.touch_host("nope", "2030-01-01T00:00:00Z").unwrap());
    let h1 = store.host("h1").unwrap().unwrap();
    assert_eq!(h1.last_seen, "2030-01-01T00:00:00Z");
    assert!(h1.cordoned, "a heartbeat keeps the cordon");
    store.upsert_host(&h1).unwrap();
    assert!(
        store.host("h1").unwrap().unwrap().cordoned,
        "registering again keeps the cordon"
    );
    assert!(store.set_host_cordoned("h1", false).unwrap());
    assert!(store.volumes_on_host("h1").unwrap().is_empty());
    assert!(store.advance_host_event_seq("h1", 1).unwrap());
    assert!(!store.advance_host_event_seq("h1", 1).unwrap());
    assert!(store.advance_host_event_seq("h1", 2).unwrap());

    // volumes, certificates
    let volume = VolumeRow {
        id: "vol_1".into(),
        app_id: app.id.clone(),
        name: "data".into(),
        region: "iad".into(),
        zone: "z1".into(),
        size_gb: 3,
        state: "created".into(),
        encrypted: true,
        fstype: "ext4".into(),
        snapshot_retention: 5,
        auto_backup_enabled: true,
        attached_machine_id: None,
        created_at: now_rfc3339(),
        host_id: "h1".into(),
    };
    store.insert_volume(&volume).unwrap();
    store
        .update_volume(&VolumeRow {
            size_gb: 10,
            ..volume.clone()
        })
        .unwrap();
    assert_eq!(store.volume("vol_1").unwrap().unwrap().size_gb, 10);
    assert_eq!(store.list_volumes(&app.id, false).unwrap().len(), 1);
    store
        .insert_snapshot(&SnapshotRow {
            id: "vs_1".into(),
            volume_id: "vol_1".into(),
            size: 1,
            digest: "d".into(),
            status: "created".into(),
            retention_days: 5,
            created_at: now_rfc3339(),
        })
        .unwrap();
    assert_eq!(store.snapshots("vol_1").unwrap().len(), 1);

    let cert = CertificateRow {
        app_id: app.id.clone(),
        hostname: "www.example.com".into(),
        source: "acme".into(),
        status: "pending".into(),
        created_at: now_rfc3339(),
    };
    store.insert_certificate(&cert).unwrap();
    assert!(matches!(
        store.insert_certificate(&cert),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.certificates(Some(&app.id)).unwrap(), vec![cert]);

    // deploy operations: recorded, advanced, listed, ended, with their event log
    let deploy = DeployRow {
        id: "d1".into(),
        app_id: app.id.clone(),
        status: "running".into(),
        request: r#"{"image":"img"}"#.into(),
        user: "admin".into(),
        release_id: String::new(),
        progress: "{}".into(),
        created_at: now_rfc3339(),
        updated_at: now_rfc3339(),
        lease_owner: "cp-a".into(),
        lease_expires_at: 1,
    };
    store.insert_deploy(&deploy).unwrap();
    assert!(matches!(
        store.insert_deploy(&deploy),
        Err(StoreError::Conflict(_))
    ));
    let release = store
        .create_release(&app.id, "r-deploy", "img", "{}", "deploy", "admin")
        .unwrap();
    store.set_deploy_release("d1", &release.id).unwrap();
    store
        .set_deploy_progress("d1", r#"{"done":["m1"]}"#)
        .unwrap();
    for (seq, event) in ["{\"type\":\"started\"}", "{\"type\":\"progress\"}"]
        .iter()
        .enumerate()
    {
        store.append_deploy_event("d1", seq as u64, event).unwrap();
    }
    let stored = store.deploy("d1").unwrap().unwrap();
    assert_eq!(stored.release_id, "r-deploy");
    assert_eq!(stored.progress, r#"{"done":["m1"]}"#);
    assert_eq!(
        store.release("r-deploy").unwrap().unwrap().version,
        release.version
    );
    assert!(store.release("nope").unwrap().is_none());
    assert_eq!(
        store
            .unfinished_deploys()
            .unwrap()
            .iter()
            .map(|d| d.id.as_str())
            .collect::<Vec<_>>(),
        vec!["d1"]
    );
    assert_eq!(
        store.deploy_events("d1").unwrap(),
        vec!["{\"type\":\"started\"}", "{\"type\":\"progress\"}"]
    );
    store.set_deploy_status("d1", "complete").unwrap();
    assert!(store.unfinished_deploys().unwrap().is_empty());
    assert_eq!(store.deploys_of_app(&app.id, 10).unwrap().len(), 1);
    assert!(store.deploy("nope").unwrap().is_none());
    let newer = DeployRow {
        id: "d2".into(),
        status: "running".into(),
        created_at: "9999-01-01T00:00:00Z".into(),
        ..deploy.clone()
    };
    store.insert_deploy(&newer).unwrap();
    store.prune_deploys(&app.id, 1).unwrap();
    assert!(store.deploy("d1").unwrap().is_none(), "finished and older");
    assert!(store.deploy_events("d1").unwrap().is_empty());
    assert!(store.deploy("d2").unwrap().is_some());
    store.prune_deploys(&app.id, 0).unwrap();
    assert!(
        store.deploy("d2").unwrap().is_some(),
        "running ones are kept"
    );
    deploy_leases(store, &app);

    // deleting an app removes everything of it
    store.delete_app(&app.id).unwrap();
    assert!(store.app("hello").unwrap().is_none());
    assert!(store.deploy("d1").unwrap().is_none());
    assert!(store.deploy_events("d1").unwrap().is_empty());
    assert!(store.machine("m1").unwrap().is_none());
    assert!(store.certificates(None).unwrap().is_empty());
    assert!(store.volume("vol_1").unwrap().is_none());
}

#[test]
fn sqlite_in_memory_passes_the_suite() {
    suite(&Store::open_in_memory().unwrap());
}

#[test]
fn sqlite_file_passes_the_suite_and_keeps_data_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.db");
    suite(&Store::open(&path).unwrap());
    let reopened = Store::open(&path).unwrap();
    assert_eq!(reopened.org_by_slug("acme").unwrap().unwrap().name, "Acme");
}

#[test]
fn postgres_passes_the_suite() {
    let Some(url) = std::env::var("ALOFT_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        aloft_testkit::skip(
            "the PostgreSQL store suite: ALOFT_TEST_POSTGRES_URL is not set (scripts/test.sh starts PostgreSQL and sets it)",
        );
        return;
    };
    let database = format!("aloft_store_test_{}_{}", std::process::id(), now_millis());
    let mut admin = ::postgres::Client::connect(&url, ::postgres::NoTls)
        .expect("connecting to ALOFT_TEST_POSTGRES_URL");
    admin
        .batch_execute(&format!("CREATE DATABASE {database}"))
        .expect("creating the test database");
    let test_url = format!("{url} dbname={database}");
    let result = std::panic::catch_unwind(|| {
        let store = Store::open_postgres(&test_url).expect("opening the store on PostgreSQL");
        assert_eq!(store.backend(), BackendKind::Postgres);
        suite(&store);
        drop(store);
        // The schema and migrations are idempotent.
        Store::open_postgres(&test_url).expect("reopening");
    });
    std::thread::sleep(std::time::Duration::from_millis(100));
    let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"));
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn urls_and_libpq_keyword_strings_are_postgres_and_everything_else_a_sqlite_path() {
    for postgres in [
        "postgresql://aloft@db/aloft",
        "postgres:///aloft?host=/run/postgresql",
        "host=/var/run/postgresql user=root dbname=aloft",
        "  dbname=aloft",
        "port = 5433 host=db",
        "service=aloft",
    ] {
        assert_eq!(
            database_location(postgres),
            DatabaseLocation::Postgres(postgres),
            "{postgres:?}"
        );
    }
    for sqlite in [
        "/var/lib/aloft/control.db",
        "control.db",
        "/data/a=b/control.db",
        "hosts=1.db",
        "host.db",
        "mydb=x",
        "",
    ] {
        assert_eq!(
            database_location(sqlite),
            DatabaseLocation::Sqlite(Path::new(sqlite)),
            "{sqlite:?}"
        );
    }
}

/// A database of its own on ALOFT_TEST_POSTGRES_URL's server, dropped afterwards.
fn with_test_database(prefix: &str, test: impl FnOnce(&str) + std::panic::UnwindSafe) {
    let Some(url) = std::env::var("ALOFT_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        eprintln!(
            "skipping: ALOFT_TEST_POSTGRES_URL is not set (scripts/test.sh starts PostgreSQL and sets it)"
        );
        return;
    };
    let database = format!("{prefix}_{}_{}", std::process::id(), now_millis());
    let mut admin = ::postgres::Client::connect(&url, ::postgres::NoTls)
        .expect("connecting to ALOFT_TEST_POSTGRES_URL");
    admin
        .batch_execute(&format!("CREATE DATABASE {database}"))
        .expect("creating the test database");
    let test_url = format!("{url} dbname={database}");
    let result = std::panic::catch_unwind(|| test(&test_url));
    let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"));
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// The server calls the store from its async handlers: opening and using PostgreSQL there
/// must neither panic (the synchronous client's own runtime nested in the server's) nor
/// stall the runtime's other tasks while a query runs.
#[test]
fn postgres_works_from_inside_the_servers_runtime() {
    with_test_database("aloft_store_runtime", |url| {
        for flavor in ["multi_thread", "current_thread"] {
            let runtime = match flavor {
                "multi_thread" => tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build(),
                _ => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build(),
            }
            .expect("a runtime");
            runtime.block_on(async {
                let store = Store::open_url(url).expect("opening PostgreSQL inside tokio");
                assert_eq!(store.backend(), BackendKind::Postgres);
                let org = OrgRow {
                    id: format!("o-{flavor}"),
                    slug: flavor.replace('_', "-"),
                    ..org()
                };
                let slug = org.slug.clone();
                let handle = tokio::spawn(async move {
                    store.create_org(&org).expect("a write from a task");
                    store.org_by_slug(&slug).expect("a read from a task")
                });
                let found = handle.await.expect("the task");
                assert_eq!(
                    found.map(|o| o.name),
                    Some("Personal".to_string()),
                    "{flavor}"
                );
            });
        }
    });
}

/// Deploy leases: of control planes claiming one deploy at once exactly one holds it; the
/// holder renews it and takes it again after its own restart; another takes it over only
/// once it has expired; a finished deploy is nobody's to take.
fn deploy_leases(store: &Store, app: &AppRow) {
    let base = DeployRow {
        id: "lease-1".into(),
        app_id: app.id.clone(),
        status: "running".into(),
        request: "{}".into(),
        user: "admin".into(),
        release_id: String::new(),
        progress: "{}".into(),
        created_at: now_rfc3339(),
        updated_at: now_rfc3339(),
        lease_owner: String::new(),
        lease_expires_at: 0,
    };
    store.insert_deploy(&base).unwrap();
    let now = now_millis();
    let ttl = 30_000;
    // Releases left running by the checks above are settled first.
    store.interrupt_running_releases("cp-setup", now).unwrap();

    // Several claimers at the same moment, each with its own connection: one wins.
    let claimers: Vec<String> = (0..6).map(|i| format!("cp-{i}")).collect();
    let barrier = std::sync::Barrier::new(claimers.len());
    let won: Vec<bool> = std::thread::scope(|scope| {
        let handles: Vec<_> = claimers
            .iter()
            .map(|owner| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    store
                        .claim_deploy("lease-1", owner, now, now + ttl)
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        won.iter().filter(|w| **w).count(),
        1,
        "exactly one claimer holds the deploy: {won:?}"
    );
    let holder = claimers[won.iter().position(|w| *w).unwrap()].clone();
    let other = claimers.iter().find(|c| **c != holder).unwrap().clone();
    let row = store.deploy("lease-1").unwrap().unwrap();
    assert_eq!(row.lease_owner, holder);
    assert_eq!(row.lease_expires_at, now + ttl);

    // While the lease runs, nobody else gets it, and only the holder renews it.
    assert!(
        !store
            .claim_deploy("lease-1", &other, now + ttl - 1, now + 2 * ttl)
            .unwrap()
    );
    assert!(
        !store
            .renew_deploy_lease("lease-1", &other, now + 2 * ttl)
            .unwrap()
    );
    assert!(
        store
            .renew_deploy_lease("lease-1", &holder, now + 2 * ttl)
            .unwrap()
    );
    assert!(
        !store
            .claim_deploy("lease-1", &other, now + ttl + 1, now + 3 * ttl)
            .unwrap(),
        "the renewal extended the lease"
    );
    // The holder, restarted, takes its own deploy again at once.
    assert!(
        store
            .claim_deploy("lease-1", &holder, now, now + 2 * ttl)
            .unwrap()
    );

    // A release whose deploy another control plane holds is not interrupted by one that
    // starts; once that lease has run out, it is.
    let release = store
        .create_release(&app.id, "r-leased", "img", "{}", "deploy", "admin")
        .unwrap();
    store.set_deploy_release("lease-1", &release.id).unwrap();
    assert_eq!(
        store.interrupt_running_releases(&other, now).unwrap(),
        0,
        "{holder} still rolls it out"
    );
    assert_eq!(
        store.release("r-leased").unwrap().unwrap().status,
        "running"
    );
    assert_eq!(
        store.interrupt_running_releases(&holder, now).unwrap(),
        1,
        "the holder itself restarted"
    );
    store.set_release_status("r-leased", "running").unwrap();
    assert_eq!(
        store
            .interrupt_running_releases(&other, now + 2 * ttl + 1)
            .unwrap(),
        1
    );

    // Expired: another control plane takes it over, and the old holder's renewal fails.
    assert!(
        store
            .claim_deploy("lease-1", &other, now + 2 * ttl + 1, now + 3 * ttl)
            .unwrap()
    );
    assert_eq!(store.deploy("lease-1").unwrap().unwrap().lease_owner, other);
    assert!(
        !store
            .renew_deploy_lease("lease-1", &holder, now + 4 * ttl)
            .unwrap()
    );

    // A finished deploy is nobody's to claim or renew.
    store.set_deploy_status("lease-1", "complete").unwrap();
    assert!(
        !store
            .claim_deploy("lease-1", &holder, now + 10 * ttl, now + 11 * ttl)
            .unwrap()
    );
    assert!(
        !store
            .renew_deploy_lease("lease-1", &other, now + 11 * ttl)
            .unwrap()
    );
}
