//! Looks at a machine's port from its own host, as a health check does: a `tcp` check
//! passes when the port accepts a connection, an `http` one when a request gets a 2xx.
//! The control plane asks for this during deploys (`POST /v1/machines/{id}/probe`), since
//! only the machine's host reaches its address.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use aloft_api::internal::{ProbeOutcome as Probe, ProbeRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Looks at `request.port` of the machine at `ip` from this host.
pub async fn probe(ip: IpAddr, request: &ProbeRequest) -> Probe {
    let check = request;
    let timeout = check
        .check
        .timeout
        .map(|t| t.to_std())
        .filter(|t| !t.is_zero())
        .unwrap_or(Duration::from_secs(2))
        .min(Duration::from_secs(10));
    let addr = SocketAddr::new(ip, check.port);
    let connected = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await;
    let mut stream = match connected {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => return Probe::NoAnswer(format!("connecting to {addr}: {err}")),
        Err(_) => {
            return Probe::NoAnswer(format!("connecting to {addr}: timed out after {timeout:?}"));
        }
    };
    let is_http = check.check.check_type == "http"
        && check.check.protocol.as_deref().unwrap_or("http") == "http";
    if !is_http {
        return Probe::Passing;
    }
    let method = check
        .check
        .method
        .clone()
        .unwrap_or_else(|| "GET".into())
        .to_uppercase();
    let path = check
        .check
        .path
        .clone()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".into());
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: Consul Health Check\r\nConnection: close\r\n"
    );
    for header in &check.check.headers {
        for value in &header.values {
            request.push_str(&format!("{}: {value}\r\n", header.name));
        }
    }
    request.push_str("Content-Length: 0\r\n\r\n");
    let exchange = async {
        stream.write_all(request.as_bytes()).await?;
        let mut buffer = vec![0u8; 512];
        let mut read = 0;
        while read < buffer.len() {
            let n = stream.read(&mut buffer[read..]).await?;
            if n == 0 {
                break;
            }
            read += n;
            if buffer[..read].windows(2).any(|w| w == b"\r\n") {
                break;
            }
        }
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buffer[..read]).into_owned())
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(answer)) => {
            let status_line = answer.lines().next().unwrap_or_default().to_string();
            let code = status_line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok());
            match code {
                Some(code) if (200..300).contains(&code) => Probe::Passing,
                Some(_) => Probe::Answered(format!("{method} {path}: {status_line}")),
                None => Probe::Answered(format!(
                    "{method} {path}: not an HTTP answer: {status_line:?}"
                )),
            }
        }
        Ok(Err(err)) => Probe::NoAnswer(format!("{method} {path}: {err}")),
        Err(_) => Probe::NoAnswer(format!("{method} {path}: no answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aloft_api::MachineCheck;

    #[tokio::test]
    async fn probes_tell_answers_from_silence() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let mut buffer = [0u8; 1024];
                let n = socket.read(&mut buffer).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buffer[..n]).to_string();
                let answer = if request.starts_with("GET /ok ") {
                    "HTTP/1.1 200 OK\r\n\r\n"
                } else {
                    "HTTP/1.1 500 Internal Server Error\r\n\r\n"
                };
                let _ = socket.write_all(answer.as_bytes()).await;
            }
        });
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let check = |path: &str| ProbeRequest {
            check: MachineCheck {
                check_type: "http".into(),
                path: Some(path.into()),
                ..Default::default()
            },
            port,
        };
        assert_eq!(probe(ip, &check("/ok")).await, Probe::Passing);
        assert!(
            matches!(probe(ip, &check("/broken")).await, Probe::Answered(ref o) if o.contains("500"))
        );
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let tcp = ProbeRequest {
            check: MachineCheck {
                check_type: "tcp".into(),
                ..Default::default()
            },
            port: closed,
        };
        assert!(matches!(probe(ip, &tcp).await, Probe::NoAnswer(_)));
    }
}
