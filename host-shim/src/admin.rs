//! The admin listener, as Envoy's: `GET /stats/prometheus` (the plugin's metrics and host-shim's
//! own), `GET /ready` (200 `LIVE` once every worker has a running VM), `GET /` (an index).

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::body::{self, Body};
use crate::shared::SharedState;

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<SharedState>,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let shared = shared.clone();
                let ready = ready.clone();
                async move { Ok::<_, Infallible>(route(req, &shared, &*ready)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(req: Request<Incoming>, shared: &SharedState, ready: &dyn Fn() -> bool) -> Response<Body> {
    let text = |status: StatusCode, ctype: &'static str, body: String| {
        let mut r = Response::new(body::full(body));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(ctype),
        );
        r
    };
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/stats/prometheus") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            shared.prometheus_text(&[]),
        ),
        ("GET", "/ready") => {
            if ready() {
                text(StatusCode::OK, "text/plain", "LIVE\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "PRE_INITIALIZING\n".into())
            }
        }
        ("GET", "/") => text(
            StatusCode::OK,
            "text/plain",
            "host-shim admin\n  /stats/prometheus  metrics (plugin and host)\n  /ready             readiness\n".into(),
        ),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}
