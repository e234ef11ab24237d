//! Repository names, tags and the parsing of `/v2/...` paths.
//!
//! Repository names may contain slashes, so the path is parsed from its end: the last
//! segments say which endpoint it is, everything before them is the name.

use crate::RegistryError;

/// Validates a repository name against the distribution spec's grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
pub fn validate_repository(name: &str) -> Result<(), RegistryError> {
    let invalid = || RegistryError::NameInvalid(name.to_string());
    if name.is_empty() || name.len() > 255 {
        return Err(invalid());
    }
    for component in name.split('/') {
        if !valid_component(component) {
            return Err(invalid());
        }
    }
    Ok(())
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__", or one or more "-".
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

/// Validates a tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<(), RegistryError> {
    let b = tag.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&x| x.is_ascii_alphanumeric() || x == b'_' || x == b'.' || x == b'-');
    if ok {
        Ok(())
    } else {
        Err(RegistryError::TagInvalid(tag.to_string()))
    }
}

/// The endpoint a `/v2/...` path names.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`
    Base,
    /// `/v2/token`
    Token,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/tags/list`
    Tags { name: String },
    /// `/v2/<name>/manifests/<reference>`
    Manifest { name: String, reference: String },
    /// `/v2/<name>/blobs/<digest>`
    Blob { name: String, digest: String },
    /// `/v2/<name>/blobs/uploads/`
    UploadStart { name: String },
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload { name: String, id: String },
    /// `/v2/<name>/referrers/<digest>`
    Referrers { name: String, digest: String },
}

/// Parses a request path (without query). Returns `None` for paths that are no endpoint.
pub fn parse_route(path: &str) -> Option<Route> {
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some(Route::Base);
    }
    let rest = rest.strip_prefix('/')?;
    if rest == "token" {
        return Some(Route::Token);
    }
    if rest == "_catalog" {
        return Some(Route::Catalog);
    }
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    let name_of = |k: usize| -> Option<String> {
        if n <= k {
            return None;
        }
        let name = segs[..n - k].join("/");
        if name.is_empty() { None } else { Some(name) }
    };
    if n >= 3 && segs[n - 2] == "tags" && segs[n - 1] == "list" {
        return Some(Route::Tags { name: name_of(2)? });
    }
    if n >= 3 && segs[n - 2] == "manifests" {
        return Some(Route::Manifest {
            name: name_of(2)?,
            reference: segs[n - 1].to_string(),
        });
    }
    if n >= 4 && segs[n - 3] == "blobs" && segs[n - 2] == "uploads" {
        let name = name_of(3)?;
        if segs[n - 1].is_empty() {
            return Some(Route::UploadStart { name });
        }
        return Some(Route::Upload {
            name,
            id: segs[n - 1].to_string(),
        });
    }
    if n >= 3 && segs[n - 2] == "blobs" && segs[n - 1] == "uploads" {
        return Some(Route::UploadStart { name: name_of(2)? });
    }
    if n >= 3 && segs[n - 2] == "blobs" {
        return Some(Route::Blob {
            name: name_of(2)?,
            digest: segs[n - 1].to_string(),
        });
    }
    if n >= 3 && segs[n - 2] == "referrers" {
        return Some(Route::Referrers {
            name: name_of(2)?,
            digest: segs[n - 1].to_string(),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names() {
        for ok in [
            "a",
            "app",
            "a/b/c",
            "my-app",
            "my--app",
            "my_app",
            "my__app",
            "v1.2",
            "org/app-b",
            "library/debian",
        ] {
            assert!(validate_repository(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "A", "a//b", "/a", "a/", "-a", "a-", "a___b", "a..b", "a/_x", "a b", "a/../b",
            "a:b",
        ] {
            assert!(validate_repository(bad).is_err(), "{bad:?}");
        }
        assert!(validate_repository(&"a".repeat(256)).is_err());
    }

    #[test]
    fn tags() {
        assert!(validate_tag("latest").is_ok());
        assert!(validate_tag("_v1.0-rc_1").is_ok());
        assert!(validate_tag(&"a".repeat(128)).is_ok());
        assert!(validate_tag(&"a".repeat(129)).is_err());
        assert!(validate_tag(".hidden").is_err());
        assert!(validate_tag("-x").is_err());
        assert!(validate_tag("a/b").is_err());
        assert!(validate_tag("").is_err());
    }

    #[test]
    fn routes() {
        assert_eq!(parse_route("/v2/"), Some(Route::Base));
        assert_eq!(parse_route("/v2"), Some(Route::Base));
        assert_eq!(parse_route("/v2/token"), Some(Route::Token));
        assert_eq!(parse_route("/v2/_catalog"), Some(Route::Catalog));
        assert_eq!(
            parse_route("/v2/a/b/c/manifests/latest"),
            Some(Route::Manifest {
                name: "a/b/c".into(),
                reference: "latest".into()
            })
        );
        // A repository component named like an endpoint keyword.
        assert_eq!(
            parse_route("/v2/x/blobs/y/manifests/v1"),
            Some(Route::Manifest {
                name: "x/blobs/y".into(),
                reference: "v1".into()
            })
        );
        assert_eq!(
            parse_route("/v2/a/b/tags/list"),
            Some(Route::Tags { name: "a/b".into() })
        );
        assert_eq!(
            parse_route("/v2/a/blobs/uploads/"),
            Some(Route::UploadStart { name: "a".into() })
        );
        assert_eq!(
            parse_route("/v2/a/blobs/uploads"),
            Some(Route::UploadStart { name: "a".into() })
        );
        assert_eq!(
            parse_route("/v2/a/b/blobs/uploads/abc"),
            Some(Route::Upload {
                name: "a/b".into(),
                id: "abc".into()
            })
        );
        assert_eq!(
            parse_route("/v2/a/blobs/sha256:00"),
            Some(Route::Blob {
                name: "a".into(),
                digest: "sha256:00".into()
            })
        );
        assert_eq!(
            parse_route("/v2/a/referrers/sha256:00"),
            Some(Route::Referrers {
                name: "a".into(),
                digest: "sha256:00".into()
            })
        );
        assert_eq!(parse_route("/v2/manifests/x"), None);
        assert_eq!(parse_route("/v2/a/whatever"), None);
        assert_eq!(parse_route("/v3/a/tags/list"), None);
    }
}
