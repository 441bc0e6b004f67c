//! The smartsign daemon: configuration, HTTPS with mutual TLS and role mapping, the HTTP API of
//! API.md, the signing flow, metrics, tracing, start-up and shutdown.
//!
//! It is thin on purpose: it wires `hsm-adapter`, `cert-lifecycle`, `ca-bridge` and `audit-log`
//! together. The rules live in `cert-lifecycle`, the formats in `ca-bridge`, the PKCS#11 calls in
//! `hsm-adapter`. Its public items are [`main`], which the `smartsignd` binary calls, and
//! [`command`], its command line's definition (for `smartsign-ctl docs`).

#![forbid(unsafe_code)]

mod accounts;
mod admin;
mod api;
mod app;
mod audit_api;
mod audit_ledger;
mod ca;
mod ca_http;
mod ceremony;
mod cli;
mod clock;
mod config;
mod csc;
mod dev;
mod events;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod http;
mod leader;
mod lifecycle;
mod limits;
mod memory;
mod metrics;
mod operations;
mod ports;
mod problem;
mod provisioning;
mod routes;
mod server;
mod signing;
mod sweeps;
mod systemd;
mod tls;
mod unseal;

pub use cli::{command, main};
