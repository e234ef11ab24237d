//! What init is told to run in a machine: the command (Docker's entrypoint/cmd rules under
//! the machine config's `init`), the environment (image, `[env]`, platform variables),
//! hostname, /etc/hosts, DNS and files.
//!
//! Secrets (issue #8) join the environment here, from the spec, at start time only: the
//! result goes to init over a pipe and is never written to disk.

use std::collections::BTreeMap;

use aloft_api::internal::{InitConfig, MachineSpec};

use crate::images::PreparedImage;
use crate::network::MachineLink;

/// What init runs, with which environment: the machine config's init section over the
/// image's entrypoint and cmd (Docker's rules), and the platform's variables.
pub fn init_config(
    spec: &MachineSpec,
    image: &PreparedImage,
    link: &MachineLink,
    public_ip: Option<std::net::IpAddr>,
) -> Result<InitConfig, String> {
    let init = spec.config.init.clone().unwrap_or_default();
    let argv = if !init.exec.is_empty() {
        init.exec.clone()
    } else {
        let entrypoint = if init.entrypoint.is_empty() {
            image.run.entrypoint.clone().unwrap_or_default()
        } else {
            init.entrypoint.clone()
        };
        let cmd = if !init.cmd.is_empty() {
            init.cmd.clone()
        } else if init.entrypoint.is_empty() {
            image.run.cmd.clone().unwrap_or_default()
        } else {
            Vec::new()
        };
        entrypoint.into_iter().chain(cmd).collect()
    };
    if argv.is_empty() {
        return Err(format!(
            "image {} has no command to run: it sets no entrypoint or cmd, and the machine config gives none",
            image.reference
        ));
    }
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for pair in image.run.env.clone().unwrap_or_default() {
        if let Some((key, value)) = pair.split_once('=') {
            env.insert(key.to_string(), value.to_string());
        }
    }
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    for (key, value) in &spec.config.env {
        env.insert(key.clone(), value.clone());
    }
    let group = spec.config.process_group().unwrap_or("app").to_string();
    let memory = spec
        .config
        .guest
        .as_ref()
        .map(|g| g.memory_mb)
        .filter(|m| *m > 0)
        .unwrap_or(256);
    let platform = [
        ("FLY_APP_NAME", spec.app.clone()),
        ("FLY_MACHINE_ID", spec.id.clone()),
        ("FLY_ALLOC_ID", spec.id.clone()),
        ("FLY_REGION", spec.region.clone()),
        ("FLY_IMAGE_REF", spec.config.image.clone()),
        ("FLY_MACHINE_VERSION", spec.instance_id.clone()),
        ("FLY_PROCESS_GROUP", group),
        ("FLY_VM_MEMORY_MB", memory.to_string()),
        ("FLY_PRIVATE_IPV4", link.machine_address.to_string()),
    ];
    for (key, value) in platform {
        env.insert(key.to_string(), value);
    }
    // Outbound traffic leaves through the host (masqueraded): its address is the machine's.
    if let Some(ip) = public_ip {
        env.insert("FLY_PUBLIC_IP".into(), ip.to_string());
    }
    // UDP services bind `fly-global-services`: the address the proxy delivers UDP to.
    let mut etc_hosts = vec![
        (link.machine_address.to_string(), spec.id.clone()),
        (
            link.machine_address.to_string(),
            "fly-global-services".into(),
        ),
    ];
    if let Some(ip) = spec.private_ip.as_ref().filter(|ip| !ip.is_empty()) {
        env.insert("FLY_PRIVATE_IP".into(), ip.clone());
        etc_hosts.push((ip.clone(), "fly-local-6pn".into()));
    }
    // The config's own nameservers, else the platform's resolver for `.internal` names
    // (recursive for everything else) when the machine is on the private network.
    let mut nameservers = spec
        .config
        .dns
        .as_ref()
        .map(|d| d.nameservers.clone())
        .unwrap_or_default();
    if nameservers.is_empty() && link.private_ip.is_some() {
        nameservers.push(aloft_api::sixpn::DNS.to_string());
    }
    let files = spec
        .config
        .files
        .iter()
        .filter_map(|f| {
            f.raw_value
                .as_ref()
                .map(|raw| aloft_api::internal::InitFile {
                    path: f.guest_path.clone(),
                    content: raw.clone(),
                    mode: f.mode,
                })
        })
        .collect();
    Ok(InitConfig {
        argv,
        env,
        user: image.run.user.clone().unwrap_or_default(),
        workdir: image.run.working_dir.clone().unwrap_or_default(),
        hostname: spec.id.clone(),
        etc_hosts,
        nameservers,
        files,
        mount_standard_filesystems: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::RunConfig;

    fn image(entrypoint: Option<Vec<&str>>, cmd: Option<Vec<&str>>) -> PreparedImage {
        PreparedImage {
            reference: "r".into(),
            digest: "d".into(),
            layers: vec![],
            run: RunConfig {
                entrypoint: entrypoint.map(|v| v.into_iter().map(String::from).collect()),
                cmd: cmd.map(|v| v.into_iter().map(String::from).collect()),
                env: Some(vec!["PATH=/bin".into(), "A=image".into()]),
                ..Default::default()
            },
        }
    }

    fn spec() -> MachineSpec {
        let mut spec = MachineSpec {
            id: "0123456789abcd".into(),
            app: "hello".into(),
            region: "local".into(),
            instance_id: "v1".into(),
            ..Default::default()
        };
        spec.config.env.insert("A".into(), "config".into());
        spec.config
            .metadata
            .insert("fly_process_group".into(), "web".into());
        spec
    }

    #[test]
    fn command_follows_docker_rules() {
        let link = MachineLink::for_machine("0123456789abcd", 0).unwrap();
        let mut s = spec();
        let i = init_config(&s, &image(Some(vec!["/ep"]), Some(vec!["a"])), &link, None).unwrap();
        assert_eq!(i.argv, vec!["/ep", "a"]);
        s.config.init = Some(aloft_api::MachineInit {
            cmd: vec!["b".into()],
            ..Default::default()
        });
        assert_eq!(
            init_config(&s, &image(Some(vec!["/ep"]), Some(vec!["a"])), &link, None)
                .unwrap()
                .argv,
            vec!["/ep", "b"]
        );
        s.config.init = Some(aloft_api::MachineInit {
            entrypoint: vec!["/other".into()],
            ..Default::default()
        });
        assert_eq!(
            init_config(&s, &image(Some(vec!["/ep"]), Some(vec!["a"])), &link, None)
                .unwrap()
                .argv,
            vec!["/other"]
        );
        s.config.init = Some(aloft_api::MachineInit {
            exec: vec!["/x".into()],
            ..Default::default()
        });
        assert_eq!(
            init_config(&s, &image(Some(vec!["/ep"]), Some(vec!["a"])), &link, None)
                .unwrap()
                .argv,
            vec!["/x"]
        );
        assert!(
            init_config(&spec(), &image(None, None), &link, None)
                .unwrap_err()
                .contains("no command")
        );
    }

    #[test]
    fn env_layers_image_config_and_platform() {
        let link = MachineLink::for_machine("0123456789abcd", 0).unwrap();
        let i = init_config(&spec(), &image(None, Some(vec!["/bin/app"])), &link, None).unwrap();
        assert_eq!(i.env["A"], "config");
        assert_eq!(i.env["PATH"], "/bin");
        assert_eq!(i.env["FLY_APP_NAME"], "hello");
        assert_eq!(i.env["FLY_MACHINE_ID"], "0123456789abcd");
        assert_eq!(i.env["FLY_ALLOC_ID"], "0123456789abcd");
        assert_eq!(i.env["FLY_PROCESS_GROUP"], "web");
        assert_eq!(i.env["FLY_MACHINE_VERSION"], "v1");
        assert_eq!(i.env["FLY_VM_MEMORY_MB"], "256");
        assert_eq!(i.hostname, "0123456789abcd");
        assert!(
            !i.env.contains_key("FLY_PUBLIC_IP"),
            "no route out, no public address"
        );
        let address = link.machine_address.to_string();
        assert!(
            i.etc_hosts
                .contains(&(address.clone(), "fly-global-services".to_string())),
            "{:?}",
            i.etc_hosts
        );
        let public: std::net::IpAddr = "2001:db8::7".parse().unwrap();
        let routed = init_config(
            &spec(),
            &image(None, Some(vec!["/bin/app"])),
            &link,
            Some(public),
        )
        .unwrap();
        assert_eq!(routed.env["FLY_PUBLIC_IP"], "2001:db8::7");
        assert!(
            !i.env.contains_key("FLY_PRIVATE_IP"),
            "no 6PN address, no variable"
        );
        assert!(i.nameservers.is_empty());
    }

    #[test]
    fn six_pn_address_reaches_env_hosts_and_resolver() {
        let mut s = spec();
        s.private_ip = Some("fdaa:0:1:0:1:0:7:2".into());
        let link = MachineLink::for_machine("0123456789abcd", 0)
            .unwrap()
            .with_private_ip(s.private_ip.as_deref());
        let i = init_config(&s, &image(None, Some(vec!["/bin/app"])), &link, None).unwrap();
        assert_eq!(i.env["FLY_PRIVATE_IP"], "fdaa:0:1:0:1:0:7:2");
        assert!(i.etc_hosts.contains(&(
            "fdaa:0:1:0:1:0:7:2".to_string(),
            "fly-local-6pn".to_string()
        )));
        assert_eq!(i.nameservers, vec!["fdaa::3".to_string()]);
        s.config.dns = Some(aloft_api::DnsConfig {
            nameservers: vec!["1.1.1.1".into()],
            ..Default::default()
        });
        let own = init_config(&s, &image(None, Some(vec!["/bin/app"])), &link, None).unwrap();
        assert_eq!(
            own.nameservers,
            vec!["1.1.1.1".to_string()],
            "the config's nameservers win"
        );
    }
}
