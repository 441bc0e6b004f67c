//! The embedded CA's plain-HTTP listener (`--ca-listen`). It publishes the CA certificates now;
//! the CA-bridge issue adds CMP, OCSP and the CRL behind the same listener.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::App;

fn answer(app: &App, path: &str) -> (StatusCode, Vec<u8>) {
    let chain = &app.chain_pem;
    match path {
        "/ca/root.pem" => chain
            .last()
            .map(|pem| (StatusCode::OK, pem.clone().into_bytes()))
            .unwrap_or((StatusCode::NOT_FOUND, Vec::new())),
        "/ca/issuing.pem" => chain
            .first()
            .map(|pem| (StatusCode::OK, pem.clone().into_bytes()))
            .unwrap_or((StatusCode::NOT_FOUND, Vec::new())),
        "/ca/chain.pem" => (StatusCode::OK, chain.concat().into_bytes()),
        _ => (StatusCode::NOT_FOUND, b"not found\n".to_vec()),
    }
}

/// Serves the CA listener until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            _ = shutdown.changed() => return,
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let (status, body) = answer(&app, request.uri().path());
                let mut response = Response::new(Full::new(Bytes::from(body)));
                *response.status_mut() = status;
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
