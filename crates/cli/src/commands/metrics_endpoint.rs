//! The server's Prometheus endpoint (`--metrics-listen`): `/metrics` answers with the
//! agent's machine metrics followed by the proxy's edge and app metrics.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use aloft_agent::Agent;
use aloft_proxy::Proxy;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

/// Serves `/metrics` on `listener` forever.
pub async fn serve(listener: tokio::net::TcpListener, agent: Arc<Agent>, proxy: Arc<Proxy>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "accepting a metrics connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (agent, proxy) = (agent.clone(), proxy.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<_>| {
                let (agent, proxy) = (agent.clone(), proxy.clone());
                async move { Ok::<_, Infallible>(respond(&request, agent, proxy).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond<B>(
    request: &Request<B>,
    agent: Arc<Agent>,
    proxy: Arc<Proxy>,
) -> Response<Full<Bytes>> {
    if request.uri().path() != "/metrics" {
        let mut response = Response::new(Full::new(Bytes::from_static(
            b"not found: metrics are at /metrics\n",
        )));
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    }
    // The agent reads cgroups and /proc: off the runtime's threads.
    let machines = tokio::task::spawn_blocking(move || agent.render_metrics())
        .await
        .unwrap_or_default();
    // The proxy's text ends with `# EOF`, so it goes last.
    let text = machines + &proxy.render_metrics();
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
