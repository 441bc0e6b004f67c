//! CRL fetching and verification. Filled by the CA-bridge issue.
