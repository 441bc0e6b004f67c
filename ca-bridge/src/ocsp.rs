//! OCSP (RFC 6960) client. Filled by the CA-bridge issue.
