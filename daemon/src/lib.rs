//! The smartsign daemon: configuration, HTTPS with mutual TLS and role mapping, the HTTP API of
//! API.md, the signing flow, metrics, tracing, start-up and shutdown.
//!
//! It is thin on purpose: it wires `hsm-adapter`, `cert-lifecycle`, `ca-bridge` and `audit-log`
//! together and holds no rule of its own. The daemon issue fills it.

#![forbid(unsafe_code)]
