//! The distribution API over real HTTP on 127.0.0.1.

mod common;

use aloft_registry::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, GcOptions, OCI_INDEX, OCI_MANIFEST};
use bytes::Bytes;
use common::{Http, TestRegistry, sha256};
use http::{Method, StatusCode};
use sha2::Digest as _;
use std::time::Duration;

const API_VERSION: &str = "registry/2.0";

#[tokio::test]
async fn base_endpoint_and_auth_challenge() {
    let r = TestRegistry::start().await;
    let h = Http::new(&r.url());

    let resp = h.get("/v2/", None).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        resp.header("www-authenticate"),
        Some("Basic realm=\"aloft\"")
    );
    assert_eq!(
        resp.header("docker-distribution-api-version"),
        Some(API_VERSION)
    );
    assert_eq!(resp.error_code(), "UNAUTHORIZED");

    let resp = h.get("/v2/", Some("bogus")).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);

    let resp = h.get("/v2/", Some("tok-a")).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.json(), serde_json::json!({}));
    assert_eq!(
        resp.header("docker-distribution-api-version"),
        Some(API_VERSION)
    );
    let resp = h.get("/v2", Some("tok-a")).await;
    assert_eq!(resp.status, StatusCode::OK);

    // HTTP Basic: any user name, the token as password.
    let basic = format!("Basic {}", b64("someone:tok-a"));
    let resp = h
        .send(
            Method::GET,
            "/v2/",
            None,
            &[("authorization", &basic)],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::OK);

    // Token endpoint.
    let resp = h
        .send(
            Method::GET,
            "/v2/token?service=aloft&scope=repository%3Aapp-a%3Apull%2Cpush",
            None,
            &[("authorization", &basic)],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.json()["token"], "tok-a");
    assert_eq!(resp.json()["access_token"], "tok-a");
    let resp = h.get("/v2/token?scope=repository:app-a:pull", None).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);

    // Unknown endpoints and methods.
    let resp = h.get("/v2/app-a/nothing", Some("tok-a")).await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert_eq!(resp.error_code(), "UNSUPPORTED");
    let resp = h
        .send(
            Method::POST,
            "/v2/app-a/tags/list",
            Some("tok-a"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::METHOD_NOT_ALLOWED);
    let resp = h.get("/v2/Bad_Name/tags/list", Some("admin")).await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert_eq!(resp.error_code(), "NAME_INVALID");
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test]
async fn monolithic_upload_head_get_and_range() {
    let r = TestRegistry::start().await;
    let h = Http::new(&r.url());
    let data = b"hello, layer".to_vec();
    let d = h.push_blob("app-a", "tok-a", &data).await;

    let head = h.head(&format!("/v2/app-a/blobs/{d}"), Some("tok-a")).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header("content-length"), Some("12"));
    assert_eq!(head.header("docker-content-digest"), Some(d.as_str()));
    assert!(head.body.is_empty());

    let get = h
        .get(&format!("/v2/app-a/blobs/{d}"), Some("reader-a"))
        .await;
    assert_eq!(get.status, StatusCode::OK);
    assert_eq!(&get.body[..], &data[..]);
    assert_eq!(get.header("docker-content-digest"), Some(d.as_str()));

    let part = h
        .send(
            Method::GET,
            &format!("/v2/app-a/blobs/{d}"),
            Some("tok-a"),
            &[("range", "bytes=7-11")],
            Bytes::new(),
        )
        .await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(&part.body[..], b"layer");
    assert_eq!(part.header("content-range"), Some("bytes 7-11/12"));

    // The blob is not visible in another repository.
    let other = h.head(&format!("/v2/app-c/blobs/{d}"), Some("admin")).await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    let other = h.get(&format!("/v2/app-c/blobs/{d}"), Some("admin")).await;
    assert_eq!(other.error_code(), "BLOB_UNKNOWN");

    // Wrong digest: rejected, and nothing is stored.
    let wrong = sha256(b"something else");
    let resp = h
        .send(
            Method::POST,
            &format!("/v2/app-a/blobs/uploads/?digest={wrong}"),
            Some("tok-a"),
            &[],
            Bytes::from_static(b"actual content"),
        )
        .await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert_eq!(resp.error_code(), "DIGEST_INVALID");
    let resp = h
        .head(&format!("/v2/app-a/blobs/{wrong}"), Some("tok-a"))
        .await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    let actual = sha256(b"actual content");
    let resp = h
        .head(&format!("/v2/app-a/blobs/{actual}"), Some("tok-a"))
        .await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert_eq!(
        count_files(&r.root().join("uploads")),
        0,
        "failed upload removed"
    );
    assert_eq!(count_files(&r.root().join("tmp")), 0);

    // Invalid digest syntax.
    let resp = h
        .send(
            Method::POST,
            "/v2/app-a/blobs/uploads/?digest=sha256:xyz",
            Some("tok-a"),
            &[],
            Bytes::from_static(b"x"),
        )
        .await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert_eq!(resp.error_code(), "DIGEST_INVALID");
}

fn count_files(dir: &std::path::Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(Result::ok)
        .map(|e| {
            if e.path().is_dir() {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

#[tokio::test]
async fn chunked_upload_with_ranges() {
    let r = TestRegistry::start().await;
    let h = Http::new(&r.url());
    let start = h
        .send(
            Method::POST,
            "/v2/app-a/blobs/uploads/",
            Some("tok-a"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(start.status, StatusCode::ACCEPTED);
    let loc = start.header("location").expect("location").to_string();
    assert!(loc.starts_with("/v2/app-a/blobs/uploads/"), "{loc}");
    assert_eq!(start.header("range"), Some("0-0"));
    assert!(start.header("docker-upload-uuid").is_some());

    let c1 = h
        .send(
            Method::PATCH,
            &loc,
            Some("tok-a"),
            &[
                ("content-range", "0-4"),
                ("content-type", "application/octet-stream"),
            ],
            Bytes::from_static(b"01234"),
        )
        .await;
    assert_eq!(c1.status, StatusCode::ACCEPTED);
    assert_eq!(c1.header("range"), Some("0-4"));
    let loc = c1.header("location").expect("location").to_string();

    // Out of order.
    let bad = h
        .send(
            Method::PATCH,
            &loc,
            Some("tok-a"),
            &[("content-range", "10-14")],
            Bytes::from_static(b"abcde"),
        )
        .await;
    assert_eq!(bad.status, StatusCode::RANGE_NOT_SATISFIABLE);
    // Range says 5 bytes but 3 sent.
    let bad = h
        .send(
            Method::PATCH,
            &loc,
            Some("tok-a"),
            &[("content-range", "5-9")],
            Bytes::from_static(b"abc"),
        )
        .await;
    assert_eq!(bad.status, StatusCode::RANGE_NOT_SATISFIABLE);

    let status = h.get(&loc, Some("tok-a")).await;
    assert_eq!(status.status, StatusCode::NO_CONTENT);
    assert_eq!(status.header("range"), Some("0-4"));

    // Streamed chunk without Content-Range.
    let c2 = h
        .send(
            Method::PATCH,
            &loc,
            Some("tok-a"),
            &[],
            Bytes::from_static(b"56789"),
        )
        .await;
    assert_eq!(c2.status, StatusCode::ACCEPTED);
    assert_eq!(c2.header("range"), Some("0-9"));

    // Another repository cannot touch this upload.
    let foreign = loc.replace("/v2/app-a/", "/v2/org/app-b/");
    let resp = h.get(&foreign, Some("admin")).await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert_eq!(resp.error_code(), "BLOB_UPLOAD_UNKNOWN");

    // Final chunk with the PUT.
    let all = b"0123456789ABC";
    let d = sha256(all);
    let sep = if loc.contains('?') { '&' } else { '?' };
    let done = h
        .send(
            Method::PUT,
            &format!("{loc}{sep}digest={d}"),
            Some("tok-a"),
            &[("content-range", "10-12")],
            Bytes::from_static(b"ABC"),
        )
        .await;
    assert_eq!(done.status, StatusCode::CREATED, "{:?}", done.body);
    assert_eq!(
        done.header("location"),
        Some(format!("/v2/app-a/blobs/{d}").as_str())
    );
    assert_eq!(done.header("docker-content-digest"), Some(d.as_str()));
    let get = h.get(&format!("/v2/app-a/blobs/{d}"), Some("tok-a")).await;
    assert_eq!(&get.body[..], all);
    // The session is gone.
    let resp = h.get(&loc, Some("tok-a")).await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);

    // POST then PUT with the whole body, sha512.
    let data = b"sha512 content";
    let d512 = format!("sha512:{}", hex::encode(sha2::Sha512::digest(data)));
    let start = h
        .send(
            Method::POST,
            "/v2/app-a/blobs/uploads/",
            Some("tok-a"),
            &[],
            Bytes::new(),
        )
        .await;
    let loc = start.header("location").expect("location").to_string();
    let done = h
        .send(
            Method::PUT,
            &format!("{loc}?digest={d512}"),
            Some("tok-a"),
            &[],
            Bytes::from_static(data),
        )
        .await;
    assert_eq!(done.status, StatusCode::CREATED);
    let head = h
        .head(&format!("/v2/app-a/blobs/{d512}"), Some("tok-a"))
        .await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header("docker-content-digest"), Some(d512.as_str()));

    // PUT without digest.
    let start = h
        .send(
            Method::POST,
            "/v2/app-a/blobs/uploads/",
            Some("tok-a"),
            &[],
            Bytes::new(),
        )
        .await;
    let loc = start.header("location").expect("location").to_string();
    let resp = h
        .send(
            Method::PUT,
            &loc,
            Some("tok-a"),
            &[],
            Bytes::from_static(b"x"),
        )
        .await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert_eq!(resp.error_code(), "DIGEST_INVALID");

    // Cancel.
    let resp = h
        .send(Method::DELETE, &loc, Some("tok-a"), &[], Bytes::new())
        .await;
    assert_eq!(resp.status, StatusCode::NO_CONTENT);
    let resp = h.get(&loc, Some("tok-a")).await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert_eq!(resp.error_code(), "BLOB_UPLOAD_UNKNOWN");
}

#[tokio::test]
async fn manifests_oci_docker_and_index() {
    let r = TestRegistry::start().await;
    let h = Http::new(&r.url());
    let (md, body, cd, lds) = h
        .push_image("org/app-b", "v1", "tok-b", &[b"layer-one", b"layer-two"])
        .await;

    for reference in ["v1", md.as_str()] {
        let get = h
            .send(
                Method::GET,
                &format!("/v2/org/app-b/manifests/{reference}"),
                Some("tok-b"),
                &[("accept", OCI_MANIFEST)],
                Bytes::new(),
            )
            .await;
        assert_eq!(get.status, StatusCode::OK);
        assert_eq!(get.header("content-type"), Some(OCI_MANIFEST));
        assert_eq!(get.header("docker-content-digest"), Some(md.as_str()));
        assert_eq!(&get.body[..], body.as_bytes(), "stored byte for byte");
        let head = h
            .head(
                &format!("/v2/org/app-b/manifests/{reference}"),
                Some("tok-b"),
            )
            .await;
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(
            head.header("content-length"),
            Some(body.len().to_string().as_str())
        );
        assert_eq!(head.header("docker-content-digest"), Some(md.as_str()));
    }
    let missing = h.get("/v2/org/app-b/manifests/v9", Some("tok-b")).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.error_code(), "MANIFEST_UNKNOWN");

    // Docker schema 2, media type returned as stored.
    let docker = format!(
        r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{cd}","size":1}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"{}","size":9}}]}}"#,
        lds[0]
    );
    let dd = h
        .push_manifest("org/app-b", "docker", "tok-b", DOCKER_MANIFEST, &docker)
        .await;
    let get = h.get("/v2/org/app-b/manifests/docker", Some("tok-b")).await;
    assert_eq!(get.header("content-type"), Some(DOCKER_MANIFEST));
    assert_eq!(get.header("docker-content-digest"), Some(dd.as_str()));

    // A manifest list / index over both.
    for (mt, tag) in [(OCI_INDEX, "multi"), (DOCKER_MANIFEST_LIST, "list")] {
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{mt}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{md}","size":{},"platform":{{"architecture":"amd64","os":"linux"}}}},{{"mediaType":"{DOCKER_MANIFEST}","digest":"{dd}","size":{},"platform":{{"architecture":"arm64","os":"linux"}}}}]}}"#,
            body.len(),
            docker.len()
        );
        let id = h.push_manifest("org/app-b", tag, "tok-b", mt, &index).await;
        let get = h
            .get(&format!("/v2/org/app-b/manifests/{id}"), Some("tok-b"))
            .await;
        assert_eq!(get.header("content-type"), Some(mt));
    }

    // References to unknown blobs or manifests.
    let unknown = sha256(b"not pushed");
    let bad = body.replace(&lds[1], &unknown);
    let resp = h
        .send(
            Method::PUT,
            "/v2/org/app-b/manifests/bad",
            Some("tok-b"),
            &[("content-type", OCI_MANIFEST)],
            bad,
        )
        .await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert_eq!(resp.error_code(), "MANIFEST_BLOB_UNKNOWN");
    let bad_index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{unknown}","size":3}}]}}"#
    );
    let resp = h
        .send(
            Method::PUT,
            "/v2/org/app-b/manifests/badidx",
            Some("tok-b"),
            &[("content-type", OCI_INDEX)],
            bad_index,
        )
        .await;
    assert_eq!(resp.error_code(), "MANIFEST_BLOB_UNKNOWN");
    // Blobs of another repository do not count.
    let resp = h
        .send(
            Method::PUT,
            "/v2/app-a/manifests/stolen",
            Some("tok-a"),
            &[("content-type", OCI_MANIFEST)],
            body.clone(),
        )
        .await;
    assert_eq!(resp.error_code(), "MANIFEST_BLOB_UNKNOWN");

    // Push by digest: must match; invalid JSON; invalid tag.
    let resp = h
        .send(
            Method::PUT,
            &format!("/v2/org/app-b/manifests/{unknown}"),
            Some("tok-b"),
            &[("content-type", OCI_MANIFEST)],
            body.clone(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert_eq!(resp.error_code(), "DIGEST_INVALID");
    let resp = h
        .send(
            Method::PUT,
            &format!("/v2/org/app-b/manifests/{md}"),
            Some("tok-b"),
            &[("content-type", OCI_MANIFEST)],
            body.clone(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::CREATED);
    let resp = h
        .send(
            Method::PUT,
            "/v2/org/app-b/manifests/x",
            Some("tok-b"),
            &[("content-type", OCI_MANIFEST)],
            "{not json",
        )
        .await;
    assert_eq!(resp.error_code(), "MANIFEST_INVALID");
    let resp = h
        .send(
            Method::PUT,
            "/v2/org/app-b/manifests/.bad",
            Some("tok-b"),
            &[("content-type", OCI_MANIFEST)],
            body.clone(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    // Too large.
    let huge = vec![b' '; 4 * 1024 * 1024 + 10];
    let resp = h
        .send(
            Method::PUT,
            "/v2/org/app-b/manifests/huge",
            Some("tok-b"),
            &[("content-type", OCI_MANIFEST)],
            huge,
        )
        .await;
    assert_eq!(resp.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(resp.error_code(), "SIZE_INVALID");
}

#[tokio::test]
async fn tags_list_pagination() {
    let r = TestRegistry::start().await;
    let h = Http::new(&r.url());
    let (_, body, _, _) = h.push_image("app-a", "t0", "tok-a", &[b"l"]).await;
    for t in ["t1", "t2", "t3", "t4"] {
        h.push_manifest("app-a", t, "tok-a", OCI_MANIFEST, &body)
            .await;
    }
    let all = h.get("/v2/app-a/tags/list", Some("reader-a")).await;
    assert_eq!(all.status, StatusCode::OK);
    assert_eq!(
        all.json(),
        serde_json::json!({"name": "app-a", "tags": ["t0", "t1", "t2", "t3", "t4"]})
    );
    assert!(all.header("link").is_none());

    let mut seen = Vec::new();
    let mut next = Some("/v2/app-a/tags/list?n=2".to_string());
    let mut pages = 0;
    while let Some(url) = next.take() {
        let page = h.get(&url, Some("tok-a")).await;
        assert_eq!(page.status, StatusCode::OK);
        let tags = page.json()["tags"].as_array().cloned().unwrap_or_default();
        assert!(tags.len() <= 2);
        seen.extend(tags.iter().filter_map(|t| t.as_str().map(str::to_string)));
        if let Some(link) = page.header("link") {
            assert!(link.ends_with("; rel=\"next\""), "{link}");
            let start = link.find('<').expect("<") + 1;
            let end = link.find('>').expect(">");
            next = Some(link[start..end].to_string());
        }
        pages += 1;
        assert!(pages < 10);
    }
    assert_eq!(seen, vec!["t0", "t1", "t2", "t3", "t4"]);
    assert_eq!(pages, 3);

    let page = h
        .get("/v2/app-a/tags/list?n=2&last=t3", Some("tok-a"))
        .await;
    assert_eq!(page.json()["tags"], serde_json::json!(["t4"]));
    let page = h.get("/v2/app-a/tags/list?n=0", Some("tok-a")).await;
    assert_eq!(page.json()["tags"], serde_json::json!([]));

    let unknown = h.get("/v2/app-a/nope/tags/list", Some("tok-a")).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.error_code(), "NAME_UNKNOWN");

    // Library API.
    let digest = sha256(body.as_bytes());
    let by_tag = r.registry.manifest("app-a", "t2").expect("manifest by tag");
    assert_eq!(by_tag, Some((digest.clone(), body.clone().into_bytes())));
    let by_digest = r
        .registry
        .manifest("app-a", &digest)
        .expect("manifest by digest");
    assert_eq!(by_digest, by_tag);
    assert_eq!(
        r.registry.manifest("app-a", "no-such-tag").expect("lookup"),
        None
    );
    let unknown = format!("sha256:{}", "0".repeat(64));
    assert_eq!(
        r.registry.manifest("app-a", &unknown).expect("lookup"),
        None
    );
    assert!(r.registry.manifest("app-a", "bad tag!").is_err());
    let tags = r.registry.list_tags("app-a").expect("list");
    assert_eq!(tags.len(), 5);
    assert!(tags.iter().all(|t| t.digest == sha256(body.as_bytes())));
    r.registry.delete_tag("app-a", "t0").expect("delete tag");
    assert!(r.registry.delete_tag("app-a", "t0").is_err());
    let tags = h.get("/v2/app-a/tags/list", Some("tok-a")).await;
    assert_eq!(
        tags.json()["tags"],
        serde_json::json!(["t1", "t2", "t3", "t4"])
    );

    // Catalog, filtered by what the token may pull.
    h.push_image("org/app-b", "v1", "tok-b", &[b"l"]).await;
    let cat = h.get("/v2/_catalog", Some("tok-a")).await;
    assert_eq!(cat.json()["repositories"], serde_json::json!(["app-a"]));
    let cat = h.get("/v2/_catalog", Some("admin")).await;
    assert_eq!(
        cat.json()["repositories"],
        serde_json::json!(["app-a", "org/app-b"])
    );
}

#[tokio::test]
async fn deletes() {
    let r = TestRegistry::start().await;
    let h = Http::new(&r.url());
    let (md, body, _, lds) = h.push_image("app-a", "v1", "tok-a", &[b"del-layer"]).await;
    h.push_manifest("app-a", "v2", "tok-a", OCI_MANIFEST, &body)
        .await;

    // Delete needs the delete right.
    let resp = h
        .send(
            Method::DELETE,
            &format!("/v2/app-a/manifests/{md}"),
            Some("reader-a"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::FORBIDDEN);
    assert_eq!(resp.error_code(), "DENIED");

    // Delete a tag: the other tag and the manifest stay.
    let resp = h
        .send(
            Method::DELETE,
            "/v2/app-a/manifests/v2",
            Some("tok-a"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::ACCEPTED);
    assert_eq!(
        h.get("/v2/app-a/manifests/v2", Some("tok-a")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        h.get("/v2/app-a/manifests/v1", Some("tok-a")).await.status,
        StatusCode::OK
    );

    // Delete by digest: manifest and its tags go.
    let resp = h
        .send(
            Method::DELETE,
            &format!("/v2/app-a/manifests/{md}"),
            Some("tok-a"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::ACCEPTED);
    let resp = h
        .get(&format!("/v2/app-a/manifests/{md}"), Some("tok-a"))
        .await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert_eq!(resp.error_code(), "MANIFEST_UNKNOWN");
    assert_eq!(
        h.get("/v2/app-a/manifests/v1", Some("tok-a")).await.status,
        StatusCode::NOT_FOUND
    );
    let resp = h
        .send(
            Method::DELETE,
            &format!("/v2/app-a/manifests/{md}"),
            Some("tok-a"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);

    // Blobs.
    let resp = h
        .send(
            Method::DELETE,
            &format!("/v2/app-a/blobs/{}", lds[0]),
            Some("tok-a"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::ACCEPTED);
    let resp = h
        .head(&format!("/v2/app-a/blobs/{}", lds[0]), Some("tok-a"))
        .await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    let resp = h
        .send(
            Method::DELETE,
            &format!("/v2/app-a/blobs/{}", lds[0]),
            Some("tok-a"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert_eq!(resp.error_code(), "BLOB_UNKNOWN");
}

#[tokio::test]
async fn referrers_api() {
    let r = TestRegistry::start().await;
    let h = Http::new(&r.url());
    let (md, body, _, _) = h
        .push_image("app-a", "v1", "tok-a", &[b"subject-layer"])
        .await;
    let empty = h.push_blob("app-a", "tok-a", b"{}").await;
    let sig_blob = h.push_blob("app-a", "tok-a", b"signature").await;
    let mk = |artifact: &str, note: &str| {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"{artifact}","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{empty}","size":2}},"layers":[{{"mediaType":"application/octet-stream","digest":"{sig_blob}","size":9}}],"subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{md}","size":{}}},"annotations":{{"note":"{note}"}}}}"#,
            body.len()
        )
    };
    let sig = mk("application/vnd.example.sig", "one");
    let sbom = mk("application/vnd.example.sbom", "two");
    for m in [&sig, &sbom] {
        let d = sha256(m.as_bytes());
        let resp = h
            .send(
                Method::PUT,
                &format!("/v2/app-a/manifests/{d}"),
                Some("tok-a"),
                &[("content-type", OCI_MANIFEST)],
                m.to_string(),
            )
            .await;
        assert_eq!(resp.status, StatusCode::CREATED);
        assert_eq!(resp.header("oci-subject"), Some(md.as_str()));
    }
    let all = h
        .get(&format!("/v2/app-a/referrers/{md}"), Some("reader-a"))
        .await;
    assert_eq!(all.status, StatusCode::OK);
    assert_eq!(all.header("content-type"), Some(OCI_INDEX));
    let idx = all.json();
    assert_eq!(idx["schemaVersion"], 2);
    let list = idx["manifests"].as_array().cloned().unwrap_or_default();
    assert_eq!(list.len(), 2);
    assert!(all.header("oci-filters-applied").is_none());
    let filtered = h
        .get(
            &format!("/v2/app-a/referrers/{md}?artifactType=application%2Fvnd.example.sbom"),
            Some("tok-a"),
        )
        .await;
    assert_eq!(filtered.header("oci-filters-applied"), Some("artifactType"));
    let list = filtered.json()["manifests"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["digest"], sha256(sbom.as_bytes()));
    assert_eq!(list[0]["artifactType"], "application/vnd.example.sbom");
    assert_eq!(list[0]["mediaType"], OCI_MANIFEST);
    assert_eq!(list[0]["size"], sbom.len());
    assert_eq!(list[0]["annotations"]["note"], "two");

    // Unknown subject: an empty index; bad digest: 400.
    let none = h
        .get(
            &format!("/v2/app-a/referrers/{}", sha256(b"nothing")),
            Some("tok-a"),
        )
        .await;
    assert_eq!(none.status, StatusCode::OK);
    assert_eq!(none.json()["manifests"], serde_json::json!([]));
    let bad = h
        .get("/v2/app-a/referrers/sha256:nothex", Some("tok-a"))
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);

    // Deleting a referrer removes it from the list.
    let resp = h
        .send(
            Method::DELETE,
            &format!("/v2/app-a/manifests/{}", sha256(sig.as_bytes())),
            Some("tok-a"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::ACCEPTED);
    let all = h
        .get(&format!("/v2/app-a/referrers/{md}"), Some("tok-a"))
        .await;
    assert_eq!(all.json()["manifests"].as_array().map(|a| a.len()), Some(1));
}

#[tokio::test]
async fn cross_repository_mount_respects_auth() {
    let r = TestRegistry::start().await;
    let h = Http::new(&r.url());
    let d = h.push_blob("app-a", "tok-a", b"shared base layer").await;

    // tok-b may not read app-a: falls back to a fresh upload session, nothing mounted.
    let resp = h
        .send(
            Method::POST,
            &format!("/v2/org/app-b/blobs/uploads/?mount={d}&from=app-a"),
            Some("tok-b"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::ACCEPTED);
    assert!(
        resp.header("location")
            .is_some_and(|l| l.contains("/blobs/uploads/"))
    );
    let head = h
        .head(&format!("/v2/org/app-b/blobs/{d}"), Some("tok-b"))
        .await;
    assert_eq!(head.status, StatusCode::NOT_FOUND);

    // A token that may read app-a and write app-c mounts it.
    let resp = h
        .send(
            Method::POST,
            &format!("/v2/app-c/blobs/uploads/?mount={d}&from=app-a"),
            Some("admin"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::CREATED);
    assert_eq!(
        resp.header("location"),
        Some(format!("/v2/app-c/blobs/{d}").as_str())
    );
    assert_eq!(resp.header("docker-content-digest"), Some(d.as_str()));
    let get = h.get(&format!("/v2/app-c/blobs/{d}"), Some("admin")).await;
    assert_eq!(&get.body[..], b"shared base layer");

    // Mount of a blob the source does not have: upload session.
    let other = sha256(b"unknown");
    let resp = h
        .send(
            Method::POST,
            &format!("/v2/app-c/blobs/uploads/?mount={other}&from=app-a"),
            Some("admin"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn tokens_are_scoped_to_their_repository() {
    let r = TestRegistry::start().await;
    let h = Http::new(&r.url());
    let (md, _, _, lds) = h
        .push_image("org/app-b", "v1", "tok-b", &[b"b-layer"])
        .await;
    h.push_image("app-a", "v1", "tok-a", &[b"a-layer"]).await;

    // tok-a cannot push to app B.
    let resp = h
        .send(
            Method::POST,
            "/v2/org/app-b/blobs/uploads/",
            Some("tok-a"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::FORBIDDEN);
    assert_eq!(resp.error_code(), "DENIED");
    let resp = h
        .send(
            Method::PUT,
            "/v2/org/app-b/manifests/evil",
            Some("tok-a"),
            &[("content-type", OCI_MANIFEST)],
            "{}",
        )
        .await;
    assert_eq!(resp.status, StatusCode::FORBIDDEN);
    // ... nor pull from it, whether or not the thing exists.
    for path in [
        format!("/v2/org/app-b/manifests/{md}"),
        "/v2/org/app-b/manifests/v1".to_string(),
        "/v2/org/app-b/manifests/nonexistent".to_string(),
        format!("/v2/org/app-b/blobs/{}", lds[0]),
        "/v2/org/app-b/tags/list".to_string(),
        "/v2/org/app-c/tags/list".to_string(),
    ] {
        let resp = h.get(&path, Some("tok-a")).await;
        assert_eq!(resp.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(resp.error_code(), "DENIED");
    }
    // Basic credentials behave the same.
    let basic = format!("Basic {}", b64("x:tok-a"));
    let resp = h
        .send(
            Method::GET,
            "/v2/org/app-b/tags/list",
            None,
            &[("authorization", &basic)],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::FORBIDDEN);
    let resp = h
        .send(
            Method::GET,
            "/v2/app-a/tags/list",
            None,
            &[("authorization", &basic)],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::OK);
    // Without a token: 401 with a challenge.
    let resp = h.get("/v2/app-a/tags/list", None).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        resp.header("www-authenticate"),
        Some("Basic realm=\"aloft\"")
    );
    // A reader cannot push.
    let resp = h
        .send(
            Method::POST,
            "/v2/app-a/blobs/uploads/",
            Some("reader-a"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn garbage_collection() {
    let r = TestRegistry::start().await;
    let h = Http::new(&r.url());
    let shared: &[u8] = b"shared layer";
    let (m1, b1, c1, l1) = h
        .push_image("app-a", "v1", "tok-a", &[b"only-in-v1", shared])
        .await;
    let (m2, b2, c2, l2) = h
        .push_image("app-a", "v2", "tok-a", &[b"only-in-v2", shared])
        .await;
    let (m3, _, c3, l3) = h.push_image("app-a", "v3", "tok-a", &[b"only-in-v3"]).await;
    // An index tagged "multi" over v1's manifest; v1's tag goes away later.
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{m1}","size":{},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
        b1.len()
    );
    let mi = h
        .push_manifest("app-a", "multi", "tok-a", OCI_INDEX, &index)
        .await;
    // A referrer of v2.
    let empty = h.push_blob("app-a", "tok-a", b"{}").await;
    let sig = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"application/x-sig","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{empty}","size":2}},"layers":[],"subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{m2}","size":{}}}}}"#,
        b2.len()
    );
    let ms = sha256(sig.as_bytes());
    h.push_manifest("app-a", &ms, "tok-a", OCI_MANIFEST, &sig)
        .await;
    // An orphan blob nobody references.
    let orphan = h.push_blob("app-a", "tok-a", b"orphan").await;

    // Default options: everything is young, nothing goes.
    let report = r.registry.gc().expect("gc");
    assert_eq!(report.blobs_deleted, 0);
    assert_eq!(report.manifests_deleted, 0);

    let now = GcOptions {
        grace_period: Duration::ZERO,
        ..GcOptions::default()
    };
    let report = r.registry.gc_with(&now).expect("gc");
    assert_eq!(report.manifests_deleted, 0, "{report:?}");
    assert_eq!(report.blobs_deleted, 1, "only the orphan: {report:?}");
    assert_eq!(report.bytes_freed, 6);
    let exists = |d: &str| {
        let path = r.root().join("blobs/sha256").join(&d[7..9]).join(&d[7..]);
        path.is_file()
    };
    assert!(!exists(&orphan));
    for d in [&m1, &m2, &m3, &mi, &ms, &c1, &c2, &c3, &empty] {
        assert!(exists(d), "{d} kept");
    }
    for d in l1.iter().chain(&l2).chain(&l3) {
        assert!(exists(d), "{d} kept");
    }

    // Releases older than the last one: keep v3 (newest), and "multi" by protection.
    std::thread::sleep(Duration::from_millis(20));
    h.push_manifest("app-a", "v3", "tok-a", OCI_MANIFEST, &{
        let g = h.get("/v2/app-a/manifests/v3", Some("tok-a")).await;
        String::from_utf8(g.body.to_vec()).expect("utf8")
    })
    .await;
    let deleted = r
        .registry
        .prune_tags("app-a", 1, &|t| t == "multi")
        .expect("prune");
    assert_eq!(deleted.len(), 2, "{deleted:?}");
    assert!(deleted.contains(&"v1".to_string()) && deleted.contains(&"v2".to_string()));

    let report = r.registry.gc_with(&now).expect("gc");
    // v2 and its referrer go; v1 stays through the index.
    assert_eq!(report.manifests_deleted, 2, "{report:?}");
    assert!(!exists(&m2) && !exists(&ms) && !exists(&c2) && !exists(&l2[0]));
    assert!(exists(&m1) && exists(&c1) && exists(&l1[0]));
    assert!(exists(&l2[1]), "shared layer is still used by v1");
    assert!(!exists(&empty), "only the referrer used it");
    let resp = h
        .get(&format!("/v2/app-a/manifests/{m2}"), Some("tok-a"))
        .await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    let resp = h
        .get(&format!("/v2/app-a/manifests/{m1}"), Some("tok-a"))
        .await;
    assert_eq!(resp.status, StatusCode::OK);
    let resp = h
        .head(&format!("/v2/app-a/blobs/{}", l2[0]), Some("tok-a"))
        .await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);

    // Dropping the index frees v1 too.
    r.registry.delete_tag("app-a", "multi").expect("delete tag");
    let report = r.registry.gc_with(&now).expect("gc");
    assert_eq!(report.manifests_deleted, 2, "{report:?}");
    assert!(!exists(&m1) && !exists(&l1[1]) && !exists(&mi));
    assert!(exists(&m3) && exists(&l3[0]));
    // The registry still serves what is left.
    let resp = h.get("/v2/app-a/manifests/v3", Some("tok-a")).await;
    assert_eq!(resp.status, StatusCode::OK);

    // Stale uploads are removed.
    let start = h
        .send(
            Method::POST,
            "/v2/app-a/blobs/uploads/",
            Some("tok-a"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(start.status, StatusCode::ACCEPTED);
    let report = r
        .registry
        .gc_with(&GcOptions {
            upload_max_age: Duration::ZERO,
            ..now.clone()
        })
        .expect("gc");
    assert_eq!(report.uploads_removed, 1);
    let loc = start.header("location").expect("location").to_string();
    assert_eq!(
        h.get(&loc, Some("tok-a")).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn interrupted_chunk_is_rolled_back_and_uploads_survive_a_restart() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let r = TestRegistry::start().await;
    let h = Http::new(&r.url());
    let start = h
        .send(
            Method::POST,
            "/v2/app-a/blobs/uploads/",
            Some("tok-a"),
            &[],
            Bytes::new(),
        )
        .await;
    let loc = start.header("location").expect("location").to_string();
    let c1 = h
        .send(
            Method::PATCH,
            &loc,
            Some("tok-a"),
            &[("content-range", "0-3")],
            Bytes::from_static(b"AAAA"),
        )
        .await;
    assert_eq!(c1.header("range"), Some("0-3"));

    // A client that dies half-way through a chunk.
    let mut sock = tokio::net::TcpStream::connect(r.addr)
        .await
        .expect("connect");
    let head = format!(
        "PATCH {loc} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-a\r\nContent-Range: 4-103\r\nContent-Length: 100\r\n\r\n"
    );
    sock.write_all(head.as_bytes()).await.expect("write");
    sock.write_all(&[b'X'; 50]).await.expect("write");
    sock.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(100)).await;
    sock.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), sock.read_to_end(&mut rest)).await;
    drop(sock);
    // The partial chunk is gone.
    let mut range = String::new();
    for _ in 0..50 {
        let status = h.get(&loc, Some("tok-a")).await;
        range = status.header("range").unwrap_or_default().to_string();
        if range == "0-3" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(range, "0-3");

    // Restart the registry: the session and its bytes are still there.
    let r = r.restart().await;
    let h = Http::new(&r.url());
    let status = h.get(&loc, Some("tok-a")).await;
    assert_eq!(status.status, StatusCode::NO_CONTENT);
    assert_eq!(status.header("range"), Some("0-3"));
    let c2 = h
        .send(
            Method::PATCH,
            &loc,
            Some("tok-a"),
            &[("content-range", "4-7")],
            Bytes::from_static(b"BBBB"),
        )
        .await;
    assert_eq!(c2.header("range"), Some("0-7"));
    let d = sha256(b"AAAABBBB");
    let done = h
        .send(
            Method::PUT,
            &format!("{loc}?digest={d}"),
            Some("tok-a"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(done.status, StatusCode::CREATED, "{:?}", done.body);
    let get = h.get(&format!("/v2/app-a/blobs/{d}"), Some("tok-a")).await;
    assert_eq!(&get.body[..], b"AAAABBBB");
}
