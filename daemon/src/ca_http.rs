//! The embedded CA's plain-HTTP listener (`--ca-listen`). It publishes the CA certificates now;
//! the CA-bridge issue adds CMP, OCSP and the CRL behind the same listener.

use hyper::StatusCode;

/// The answer to `GET path`, given the chain (issuing CA first, root last) in PEM.
pub(crate) fn answer(chain: &[String], path: &str) -> (StatusCode, &'static str, Vec<u8>) {
    const PEM: &str = "application/x-pem-file";
    let found = match path {
        "/ca/root.pem" => chain.last().cloned(),
        "/ca/issuing.pem" => chain.first().cloned(),
        "/ca/chain.pem" => Some(chain.concat()),
        _ => None,
    };
    match found {
        Some(pem) => (StatusCode::OK, PEM, pem.into_bytes()),
        None => (StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
    }
}
