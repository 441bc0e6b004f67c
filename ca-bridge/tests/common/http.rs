//! A loopback HTTP/1.1 server for the interop tests: `openssl cmp` and `openssl ocsp` as
//! clients reach the embedded CA's protocol handlers through it. (The daemon serves the same
//! handlers on its own `--ca-listen` listener.)

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// What a handler answers: HTTP status, content type, body.
pub type Answer = (u16, String, Vec<u8>);
type Handler = Arc<
    dyn Fn(String, String, Vec<u8>) -> Pin<Box<dyn Future<Output = Answer> + Send>> + Send + Sync,
>;

/// A running server; dropped, it stops accepting.
pub struct TestServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// `http://127.0.0.1:PORT` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `handler(method, path_and_query, body)` on 127.0.0.1 and an ephemeral port.
pub async fn serve<F, Fut>(handler: F) -> TestServer
where
    F: Fn(String, String, Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Answer> + Send + 'static,
{
    let handler: Handler = Arc::new(move |m, p, b| Box::pin(handler(m, p, b)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = Arc::clone(&handler);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let handler = Arc::clone(&handler);
                    async move {
                        let method = request.method().to_string();
                        let path = request
                            .uri()
                            .path_and_query()
                            .map(|p| p.to_string())
                            .unwrap_or_default();
                        let body = request.into_body().collect().await?.to_bytes().to_vec();
                        let (status, content_type, body) = handler(method, path, body).await;
                        let response = Response::builder()
                            .status(status)
                            .header("content-type", content_type)
                            .body(Full::new(Bytes::from(body)))
                            .unwrap();
                        Ok::<_, hyper::Error>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    TestServer { addr, task }
}
