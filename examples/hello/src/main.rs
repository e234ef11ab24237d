//! The example app: answers `GET /` with JSON of its environment and of the request
//! headers it received, so the platform's env vars and proxy headers can be seen (and
//! tested). Listens on `[::]:$PORT` and `0.0.0.0:$PORT` (default 8080); std only, one
//! thread per connection.

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

fn respond(stream: &mut impl Write, request: &Request) -> std::io::Result<()> {
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
    // Head and body go out in one write: a second small write would wait for the peer's
    // delayed ACK (Nagle's algorithm), 40 ms a request.
    let mut answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
        body.len()
    );
    if request.method != "HEAD" {
        answer.push_str(&body);
    }
    stream.write_all(answer.as_bytes())?;
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

/// Listens on `[::]` (IPv6, so the machine's 6PN address answers, and IPv4 too where the
/// socket is dual-stack) and on `0.0.0.0` where IPv4 needs its own socket.
fn listeners(port: u16) -> Vec<TcpListener> {
    let mut listeners = Vec::new();
    match TcpListener::bind(("::", port)) {
        Ok(listener) => listeners.push(listener),
        Err(err) => eprintln!("hello: cannot listen on [::]:{port}: {err}"),
    }
    // Fails with "address in use" when the IPv6 socket already takes IPv4.
    if let Ok(listener) = TcpListener::bind(("0.0.0.0", port)) {
        listeners.push(listener);
    }
    listeners
}

fn main() {
    let port = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(8080);
    let listeners = listeners(port);
    if listeners.is_empty() {
        eprintln!("hello: cannot listen on port {port}");
        std::process::exit(1);
    }
    println!("hello: listening on [::]:{port} and 0.0.0.0:{port}");
    let accepting: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let _ = stream.set_nodelay(true);
                    std::thread::spawn(move || serve(stream));
                }
            })
        })
        .collect();
    for thread in accepting {
        let _ = thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the writes made to it: each is a send(2) on a socket.
    #[derive(Default)]
    struct Writes {
        calls: usize,
        bytes: Vec<u8>,
    }

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.calls += 1;
            self.bytes.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn listens_on_ipv6_and_ipv4() {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let _listening = listeners(port);
        for address in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
            TcpStream::connect(&address).unwrap_or_else(|e| panic!("connecting to {address}: {e}"));
        }
    }

    #[test]
    fn answers_head_and_body_in_one_write() {
        let request = Request {
            method: "GET".into(),
            path: "/".into(),
            headers: vec![("Host".into(), "hello".into())],
            keep_alive: true,
        };
        let mut writes = Writes::default();
        respond(&mut writes, &request).unwrap();
        let text = String::from_utf8(writes.bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("\"path\": \"/\""), "{text}");
        assert_eq!(
            writes.calls, 1,
            "a second write waits on Nagle and the peer's delayed ACK (40 ms a request)"
        );
    }
}
