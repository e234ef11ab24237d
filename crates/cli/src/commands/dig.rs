//! `aloft dig [TYPE] NAME -a APP`: asks the private-network resolver as a machine of the
//! app would, through the app network's own DNS address (`fdaa:<network>::3`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use aloft_control::ips::PrivateNetwork;
use anyhow::Context;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::settings::ApiArgs;

#[derive(clap::Args, Debug)]
pub struct DigArgs {
    /// The record type (AAAA, TXT, A, CNAME, ...), or the name when no type is given.
    #[arg(value_name = "TYPE")]
    first: String,
    /// The name to look up.
    #[arg(value_name = "NAME")]
    name: Option<String>,
    #[arg(short = 'a', long = "app")]
    app: Option<String>,
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// Print only the answers' values.
    #[arg(short = 's', long)]
    short: bool,
    /// Ask this server (`address:port`) instead of the app network's resolver.
    #[arg(long, hide = true)]
    server: Option<SocketAddr>,
}

/// The resolver of the app's private network, as the API names it.
pub async fn network_resolver(
    api: &ApiArgs,
    app: &str,
) -> anyhow::Result<(PrivateNetwork, SocketAddr)> {
    let client = api.client()?;
    let network: PrivateNetwork = client
        .get(&format!(
            "/v1/apps/{}/private_network",
            aloft_client::encode_component(app)
        ))
        .await?;
    let address: Ipv6Addr = network.dns.parse().with_context(|| {
        format!(
            "the API named {:?} as the app network's resolver",
            network.dns
        )
    })?;
    Ok((network, SocketAddr::new(IpAddr::V6(address), 53)))
}

fn record_type(text: &str) -> anyhow::Result<RecordType> {
    let upper = text.to_ascii_uppercase();
    let upper = upper.trim_end_matches("-NATIVE");
    upper
        .parse::<RecordType>()
        .ok()
        .filter(|t| !matches!(t, RecordType::Unknown(_)))
        .ok_or_else(|| anyhow::anyhow!("unknown record type {text:?}: use AAAA, TXT, A, CNAME, MX, NS, SRV or another DNS type"))
}

/// One query, over UDP and again over TCP when the answer was truncated.
pub async fn query(server: SocketAddr, name: &str, kind: RecordType) -> anyhow::Result<Message> {
    let fqdn = if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    };
    let name =
        Name::from_ascii(&fqdn).with_context(|| format!("{name:?} is not a valid DNS name"))?;
    let id: u16 = rand_id();
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(name, kind));
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    message.edns = Some(edns);
    let bytes = message.to_vec().context("encoding the query")?;
    let answer = tokio::time::timeout(Duration::from_secs(5), udp(server, id, &bytes))
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {server} within 5s"))??;
    if !answer.metadata.truncation {
        return Ok(answer);
    }
    tokio::time::timeout(Duration::from_secs(5), tcp(server, id, &bytes))
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {server} over TCP within 5s"))?
}

fn rand_id() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (nanos ^ std::process::id()) as u16
}

async fn udp(server: SocketAddr, id: u16, query: &[u8]) -> anyhow::Result<Message> {
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(local)
        .await
        .context("opening a UDP socket")?;
    socket
        .connect(server)
        .await
        .with_context(|| format!("cannot reach the resolver at {server}"))?;
    socket
        .send(query)
        .await
        .with_context(|| format!("cannot reach the resolver at {server}"))?;
    let mut buffer = vec![0u8; 65_535];
    loop {
        let n = socket
            .recv(&mut buffer)
            .await
            .with_context(|| format!("no answer from the resolver at {server}"))?;
        if let Ok(answer) = Message::from_vec(&buffer[..n])
            && answer.metadata.id == id
        {
            return Ok(answer);
        }
    }
}

async fn tcp(server: SocketAddr, id: u16, query: &[u8]) -> anyhow::Result<Message> {
    let mut stream = tokio::net::TcpStream::connect(server)
        .await
        .with_context(|| format!("cannot reach the resolver at {server}"))?;
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let length = stream.read_u16().await?;
    let mut buffer = vec![0u8; usize::from(length)];
    stream.read_exact(&mut buffer).await?;
    let answer = Message::from_vec(&buffer).context("reading the resolver's answer")?;
    anyhow::ensure!(
        answer.metadata.id == id,
        "the resolver's answer does not match the query"
    );
    Ok(answer)
}

/// A record's value as dig prints it (TXT strings quoted).
pub fn value(record: &Record) -> String {
    match &record.data {
        RData::TXT(txt) => txt
            .txt_data
            .iter()
            .map(|chunk| {
                format!(
                    "\"{}\"",
                    String::from_utf8_lossy(chunk).replace('"', "\\\"")
                )
            })
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    }
}

/// The status as dig names it.
pub fn status_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => format!("{other:?}").to_ascii_uppercase(),
    }
}

fn print_full(answer: &Message) {
    let m = &answer.metadata;
    println!(
        ";; ->>HEADER<<- opcode: QUERY, status: {}, id: {}",
        status_name(m.response_code),
        m.id
    );
    let mut flags = vec!["qr"];
    if m.authoritative {
        flags.push("aa");
    }
    if m.truncation {
        flags.push("tc");
    }
    if m.recursion_desired {
        flags.push("rd");
    }
    if m.recursion_available {
        flags.push("ra");
    }
    println!(
        ";; flags: {}; QUERY: {}, ANSWER: {}, AUTHORITY: {}, ADDITIONAL: {}",
        flags.join(" "),
        answer.queries.len(),
        answer.answers.len(),
        answer.authorities.len(),
        answer.additionals.len()
    );
    println!("\n;; QUESTION SECTION:");
    for query in &answer.queries {
        println!(";{}\t\tIN\t {}", query.name(), query.query_type());
    }
    for (title, records) in [
        ("ANSWER", &answer.answers),
        ("AUTHORITY", &answer.authorities),
        ("ADDITIONAL", &answer.additionals),
    ] {
        if records.is_empty() {
            continue;
        }
        println!("\n;; {title} SECTION:");
        for record in records {
            println!(
                "{}\t{}\tIN\t{}\t{}",
                record.name,
                record.ttl,
                record.record_type(),
                value(record)
            );
        }
    }
}

pub async fn run(api: &ApiArgs, args: DigArgs) -> anyhow::Result<()> {
    let (kind, name) = match &args.name {
        Some(name) => (record_type(&args.first)?, name.clone()),
        None => (RecordType::AAAA, args.first.clone()),
    };
    let app = crate::app_name(args.app.clone(), args.config.as_deref())?;
    let server = match args.server {
        Some(server) => server,
        None => network_resolver(api, &app).await?.1,
    };
    let answer = query(server, &name, kind).await?;
    if args.short {
        for record in &answer.answers {
            println!("{}", value(record));
        }
    } else {
        print_full(&answer);
    }
    Ok(())
}
