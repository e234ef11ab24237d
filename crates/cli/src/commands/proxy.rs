//! `aloft proxy LOCAL[:REMOTE] [HOST] -a APP`: forwards a local port to an address in the
//! app's private network (`<app>.internal` by default), resolving names with the app
//! network's resolver on every connection.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context;
use hickory_proto::rr::{RData, RecordType};

use crate::commands::dig::{network_resolver, query};
use crate::settings::ApiArgs;

#[derive(clap::Args, Debug)]
pub struct ProxyArgs {
    /// `LOCAL:REMOTE` ports, or one port for both.
    #[arg(value_name = "LOCAL:REMOTE")]
    ports: String,
    /// Where to connect in the private network: a 6PN address or a name (default `<app>.internal`).
    #[arg(value_name = "HOST")]
    host: Option<String>,
    #[arg(short = 'a', long = "app")]
    app: Option<String>,
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// Local address to listen on.
    #[arg(short = 'b', long = "bind-addr", default_value = "127.0.0.1")]
    bind_addr: IpAddr,
    /// Print nothing once listening.
    #[arg(short = 'q', long)]
    quiet: bool,
}

fn parse_ports(text: &str) -> anyhow::Result<(u16, u16)> {
    let parse = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| anyhow::anyhow!("{p:?} is not a port: use LOCAL:REMOTE, e.g. 5432:5432"))
    };
    match text.split_once(':') {
        Some((local, remote)) => Ok((parse(local)?, parse(remote)?)),
        None => {
            let port = parse(text)?;
            Ok((port, port))
        }
    }
}

async fn resolve(resolver: SocketAddr, host: &str) -> anyhow::Result<IpAddr> {
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = literal.parse::<IpAddr>() {
        return Ok(ip);
    }
    let answer = query(resolver, host, RecordType::AAAA).await?;
    answer
        .answers
        .iter()
        .find_map(|r| match &r.data {
            RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
            _ => None,
        })
        .ok_or_else(|| {
            anyhow::anyhow!("{host} has no address in the app's network (no started machines?)")
        })
}

pub async fn run(api: &ApiArgs, args: ProxyArgs) -> anyhow::Result<()> {
    let (local, remote) = parse_ports(&args.ports)?;
    let app = crate::app_name(args.app.clone(), args.config.as_deref())?;
    let (_, resolver) = network_resolver(api, &app).await?;
    let host = args
        .host
        .clone()
        .unwrap_or_else(|| format!("{app}.internal"));
    let listener = tokio::net::TcpListener::bind((args.bind_addr, local))
        .await
        .with_context(|| format!("cannot listen on {}:{local}", args.bind_addr))?;
    if !args.quiet {
        println!("Proxying local port {local} to remote [{host}]:{remote}");
    }
    loop {
        let (mut client, peer) = listener.accept().await.context("accepting a connection")?;
        let host = host.clone();
        tokio::spawn(async move {
            let target = match resolve(resolver, &host).await {
                Ok(ip) => SocketAddr::new(ip, remote),
                Err(err) => {
                    eprintln!("{peer}: {err:#}");
                    return;
                }
            };
            match tokio::net::TcpStream::connect(target).await {
                Ok(mut upstream) => {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
                Err(err) => eprintln!("{peer}: cannot connect to {target}: {err}"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_local_remote_or_one() {
        assert_eq!(parse_ports("5432:15432").unwrap(), (5432, 15432));
        assert_eq!(parse_ports("8080").unwrap(), (8080, 8080));
        assert!(
            parse_ports("x:1")
                .unwrap_err()
                .to_string()
                .contains("LOCAL:REMOTE")
        );
    }
}
