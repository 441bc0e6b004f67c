//! HTTP transport for the CA protocols: CMP over HTTP (RFC 6712), OCSP over HTTP (RFC 6960
//! appendix A) and CRL fetches. Plain HTTP is what these protocols use: every message carries
//! its own protection or signature, which the callers check.

use std::time::Duration;

use crate::CaError;

/// The content type of CMP messages (RFC 6712 section 3.4).
pub const CMP_CONTENT_TYPE: &str = "application/pkixcmp";
/// The content type of OCSP requests (RFC 6960 appendix A.1).
pub const OCSP_REQUEST_CONTENT_TYPE: &str = "application/ocsp-request";
/// The content type of OCSP responses (RFC 6960 appendix A.2).
pub const OCSP_RESPONSE_CONTENT_TYPE: &str = "application/ocsp-response";
/// The content type of a CRL (RFC 2585 section 4.2).
pub const CRL_CONTENT_TYPE: &str = "application/pkix-crl";

/// The largest response body accepted (a CRL of a large CA is well below this).
const MAX_BODY: usize = 16 * 1024 * 1024;

/// An HTTP client with a per-request time limit. Cheap to clone.
#[derive(Debug, Clone)]
pub struct HttpTransport {
    client: reqwest::Client,
}

impl HttpTransport {
    /// A client whose requests fail after `timeout` (connect plus answer).
    pub fn new(timeout: Duration) -> Result<HttpTransport, CaError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| CaError::Internal(format!("HTTP client: {e}")))?;
        Ok(HttpTransport { client })
    }

    /// POSTs `body` with `content_type` and returns the response body, which must carry
    /// `expect_type`.
    pub async fn post(
        &self,
        url: &str,
        content_type: &str,
        body: Vec<u8>,
        expect_type: &str,
    ) -> Result<Vec<u8>, CaError> {
        let request = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body);
        finish(url, request, expect_type).await
    }

    /// GETs `url` and returns the response body, which must carry `expect_type`.
    pub async fn get(&self, url: &str, expect_type: &str) -> Result<Vec<u8>, CaError> {
        finish(url, self.client.get(url), expect_type).await
    }
}

async fn finish(
    url: &str,
    request: reqwest::RequestBuilder,
    expect_type: &str,
) -> Result<Vec<u8>, CaError> {
    let failed = |why: String| CaError::Transport {
        url: url.to_owned(),
        why,
    };
    let response = request.send().await.map_err(|e| failed(describe(&e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(failed(format!("HTTP status {status}")));
    }
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    if content_type != expect_type {
        return Err(CaError::Protocol(format!(
            "{url} answered with content type {content_type:?}, expected {expect_type}"
        )));
    }
    if response
        .content_length()
        .is_some_and(|n| n > MAX_BODY as u64)
    {
        return Err(failed("response too large".into()));
    }
    let body = response.bytes().await.map_err(|e| failed(describe(&e)))?;
    if body.len() > MAX_BODY {
        return Err(failed("response too large".into()));
    }
    Ok(body.to_vec())
}

/// A one-line reason without the URL (the caller adds it).
fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "timed out".into()
    } else if error.is_connect() {
        "connection failed".into()
    } else {
        let mut text = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            text = format!("{text}: {cause}");
            source = cause.source();
        }
        text
    }
}
