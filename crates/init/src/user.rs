//! `/etc/passwd` and `/etc/group` parsing and Docker-compatible resolution of a `User`
//! spec (`name`, `uid`, `name:group`, `uid:gid`), without libc's NSS.

use thiserror::Error;

/// Highest id Docker accepts for a numeric user or group that has no entry.
const MAX_ID: u64 = i32::MAX as u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// Who the main process runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (only when the spec names no group, as Docker does).
    pub groups: Vec<u32>,
    pub home: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum UserError {
    #[error("unable to find user {0}: no matching entries in passwd file")]
    NoSuchUser(String),
    #[error("unable to find group {0}: no matching entries in group file")]
    NoSuchGroup(String),
    #[error("user or group id out of range: {0}")]
    OutOfRange(String),
}

/// Splits a colon-separated database line, skipping blanks, comments and NIS `+`/`-` lines.
fn fields(line: &str) -> Option<Vec<&str>> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty()
        || line.starts_with('#')
        || line.starts_with('+')
        || line.starts_with('-')
    {
        return None;
    }
    Some(line.split(':').collect())
}

/// Parses `/etc/passwd` content. Malformed lines are skipped.
pub fn parse_passwd(content: &str) -> Vec<PasswdEntry> {
    content
        .lines()
        .filter_map(fields)
        .filter_map(|f| {
            let name = f.first()?.trim();
            if name.is_empty() {
                return None;
            }
            Some(PasswdEntry {
                name: name.to_string(),
                uid: f.get(2)?.trim().parse().ok()?,
                gid: f.get(3)?.trim().parse().ok()?,
                home: f.get(5).map(|s| s.to_string()).unwrap_or_default(),
                shell: f.get(6).map(|s| s.to_string()).unwrap_or_default(),
            })
        })
        .collect()
}

/// Parses `/etc/group` content. Malformed lines are skipped.
pub fn parse_group(content: &str) -> Vec<GroupEntry> {
    content
        .lines()
        .filter_map(fields)
        .filter_map(|f| {
            let name = f.first()?.trim();
            if name.is_empty() {
                return None;
            }
            let members = f
                .get(3)
                .map(|list| {
                    list.split(',')
                        .map(str::trim)
                        .filter(|m| !m.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            Some(GroupEntry {
                name: name.to_string(),
                gid: f.get(2)?.trim().parse().ok()?,
                members,
            })
        })
        .collect()
}

fn parse_id(s: &str) -> Option<Result<u32, UserError>> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(match s.parse::<u64>() {
        Ok(n) if n <= MAX_ID => Ok(n as u32),
        _ => Err(UserError::OutOfRange(s.to_string())),
    })
}

/// Resolves a `User` spec the way Docker (runc's `GetExecUser`) does.
///
/// `passwd` and `group` are the file contents, `None` when the file does not exist.
/// A numeric user is always a uid; a numeric group is always a gid. A name must exist.
/// Supplementary groups come from `/etc/group` only when the spec names no group.
pub fn resolve_user(
    spec: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<ExecUser, UserError> {
    let (user_arg, group_arg) = match spec.split_once(':') {
        Some((u, g)) => (u, g),
        None => (spec, ""),
    };
    let uid_arg = parse_id(user_arg).transpose()?;
    let gid_arg = parse_id(group_arg).transpose()?;

    let users = passwd.map(parse_passwd).unwrap_or_default();
    let found = users.iter().find(|u| match (user_arg, uid_arg) {
        ("", _) => u.uid == 0,
        (_, Some(uid)) => u.uid == uid,
        (name, None) => u.name == name,
    });

    let mut user = ExecUser {
        uid: 0,
        gid: 0,
        groups: Vec::new(),
        home: "/".to_string(),
    };
    let mut matched_name = None;
    match found {
        Some(entry) => {
            matched_name = Some(entry.name.as_str());
            user.uid = entry.uid;
            user.gid = entry.gid;
            if !entry.home.is_empty() {
                user.home = entry.home.clone();
            }
        }
        None if user_arg.is_empty() => {}
        None => match uid_arg {
            Some(uid) => user.uid = uid,
            None => return Err(UserError::NoSuchUser(user_arg.to_string())),
        },
    }

    if group_arg.is_empty() && matched_name.is_none() {
        return Ok(user);
    }
    let groups = group.map(parse_group).unwrap_or_default();
    if group_arg.is_empty() {
        if let Some(name) = matched_name {
            for g in groups
                .iter()
                .filter(|g| g.members.iter().any(|m| m == name))
            {
                if !user.groups.contains(&g.gid) {
                    user.groups.push(g.gid);
                }
            }
        }
        return Ok(user);
    }
    let found = groups.iter().find(|g| match gid_arg {
        Some(gid) => g.gid == gid,
        None => g.name == group_arg,
    });
    user.gid = match (found, gid_arg) {
        (Some(g), _) => g.gid,
        (None, Some(gid)) => gid,
        (None, None) => return Err(UserError::NoSuchGroup(group_arg.to_string())),
    };
    Ok(user)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
# a comment
+nisuser

broken:x:notanumber:1::/:
app:x:1000:1000:App User,,,:/home/app:/bin/sh
nohome:x:1001:1001::
";
    const GROUP: &str = "\
root:x:0:
daemon:x:1:
wheel:x:10:app,other
docker:x:999: app
app:x:1000:
staff:x:50:
";

    #[test]
    fn parses_passwd() {
        let users = parse_passwd(PASSWD);
        assert_eq!(users.len(), 4);
        assert_eq!(
            users[2],
            PasswdEntry {
                name: "app".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/app".into(),
                shell: "/bin/sh".into()
            }
        );
        assert_eq!(users[3].home, "");
    }

    #[test]
    fn parses_group() {
        let groups = parse_group(GROUP);
        assert_eq!(groups.len(), 6);
        assert_eq!(groups[2].members, vec!["app", "other"]);
        assert_eq!(groups[3].members, vec!["app"]);
        assert!(groups[0].members.is_empty());
    }

    fn resolve(spec: &str) -> Result<ExecUser, UserError> {
        resolve_user(spec, Some(PASSWD), Some(GROUP))
    }

    #[test]
    fn empty_is_root() {
        let u = resolve("").unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (0, 0, "/root"));
        assert!(u.groups.is_empty());
        let u = resolve_user("", None, None).unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (0, 0, "/"));
    }

    #[test]
    fn by_name_with_supplementary_groups() {
        let u = resolve("app").unwrap();
        assert_eq!(
            u,
            ExecUser {
                uid: 1000,
                gid: 1000,
                groups: vec![10, 999],
                home: "/home/app".into()
            }
        );
    }

    #[test]
    fn by_uid_in_passwd_gets_its_groups() {
        let u = resolve("1000").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.groups, vec![10, 999]);
    }

    #[test]
    fn unknown_uid_is_allowed() {
        let u = resolve("4242").unwrap();
        assert_eq!(
            u,
            ExecUser {
                uid: 4242,
                gid: 0,
                groups: vec![],
                home: "/".into()
            }
        );
        let u = resolve_user("4242", None, None).unwrap();
        assert_eq!(u.uid, 4242);
    }

    #[test]
    fn unknown_name_is_an_error() {
        assert_eq!(
            resolve("nobody"),
            Err(UserError::NoSuchUser("nobody".into()))
        );
        assert_eq!(
            resolve_user("app", None, None),
            Err(UserError::NoSuchUser("app".into()))
        );
        assert_eq!(
            resolve("nobody").unwrap_err().to_string(),
            "unable to find user nobody: no matching entries in passwd file"
        );
    }

    #[test]
    fn explicit_group_drops_supplementary_groups() {
        let u = resolve("app:staff").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 50));
        assert!(u.groups.is_empty());
        let u = resolve("app:7777").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 7777));
        let u = resolve("1000:10").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 10));
        let u = resolve("5000:6000").unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (5000, 6000, "/"));
        let u = resolve(":staff").unwrap();
        assert_eq!((u.uid, u.gid), (0, 50));
    }

    #[test]
    fn unknown_group_name_is_an_error() {
        assert_eq!(
            resolve("app:nogroup"),
            Err(UserError::NoSuchGroup("nogroup".into()))
        );
        assert_eq!(
            resolve_user("5:staff", None, None),
            Err(UserError::NoSuchGroup("staff".into()))
        );
    }

    #[test]
    fn numeric_user_is_never_a_name() {
        let passwd = "1000:x:5:5::/five:\nreal:x:1000:7::/real:\n";
        let u = resolve_user("1000", Some(passwd), None).unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (1000, 7, "/real"));
    }

    #[test]
    fn out_of_range_ids() {
        assert_eq!(
            resolve("99999999999"),
            Err(UserError::OutOfRange("99999999999".into()))
        );
        assert_eq!(
            resolve("app:4294967295"),
            Err(UserError::OutOfRange("4294967295".into()))
        );
    }

    #[test]
    fn home_defaults_to_slash() {
        let u = resolve("nohome").unwrap();
        assert_eq!((u.uid, u.home.as_str()), (1001, "/"));
    }
}
