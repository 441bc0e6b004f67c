//! Certificate status before signing: local state, OCSP with a cache, CRL fallback. Filled by the CA-bridge issue.
