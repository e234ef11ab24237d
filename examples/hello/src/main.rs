//! The example app: answers `GET /` with JSON of its environment and of the request
//! headers it received, so the platform's env vars and proxy headers can be seen (and
//! tested). Listens on `0.0.0.0:$PORT` (default 8080); std only, one thread per connection.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

const MAX_HEAD_BYTES: usize = 64 * 1024;

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    keep_alive: bool,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    let mut total = reader.read_line(&mut line).ok()?;
    if total == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let version = parts.next().unwrap_or("HTTP/1.0").to_string();
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        let read = reader.read_line(&mut header).ok()?;
        total += read;
        if read == 0 || total > MAX_HEAD_BYTES {
            return None;
        }
        let header = header.trim_end_matches(['\r', '\n']);
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    let connection = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .map(|(_, v)| v.to_ascii_lowercase());
    let keep_alive = match connection.as_deref() {
        Some("close") => false,
        Some("keep-alive") => true,
        _ => version == "HTTP/1.1",
    };
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if length > 0 {
        let mut body = vec![0u8; length.min(1 << 20)];
        std::io::Read::read_exact(reader, &mut body).ok()?;
    }
    Some(Request {
        method,
        path,
        headers,
        keep_alive,
    })
}

fn respond(stream: &mut TcpStream, request: &Request) -> std::io::Result<()> {
    let (status, body) = if request.method == "GET" || request.method == "HEAD" {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, value) in &request.headers {
            headers
                .entry(name.to_ascii_lowercase())
                .or_default()
                .push(value.clone());
        }
        let document = serde_json::json!({
            "method": request.method,
            "path": request.path,
            "env": env,
            "headers": headers,
        });
        (
            "200 OK",
            serde_json::to_string_pretty(&document).unwrap_or_default(),
        )
    } else {
        (
            "405 Method Not Allowed",
            "{\"error\":\"only GET is supported\"}".to_string(),
        )
    };
    let connection = if request.keep_alive {
        "keep-alive"
    } else {
        "close"
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if request.method != "HEAD" {
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()
}

fn serve(stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    while let Some(request) = read_request(&mut reader) {
        if respond(&mut writer, &request).is_err() || !request.keep_alive {
            break;
        }
    }
}

fn main() {
    let port = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(8080);
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("hello: cannot listen on 0.0.0.0:{port}: {err}");
            std::process::exit(1);
        }
    };
    println!("hello: listening on 0.0.0.0:{port}");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || serve(stream));
    }
}
