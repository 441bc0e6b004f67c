//! What the embedded CA offers its OCSP responder and CRL issuer.
