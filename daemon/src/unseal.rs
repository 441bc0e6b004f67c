//! The sealed state and the quorum unseal (`POST /v1/admin/unseal`).
//!
//! Both listeners serve a [`Gate`]. With `hsm.pin_file` the gate opens before they bind, and the
//! daemon behaves as if there were none. With `[hsm.quorum]` they bind first and serve sealed:
//! `/healthz` and `/metrics` answer, `/readyz` is 503 naming `sealed`, an officer may read
//! `GET /v1/admin/status` and give shares, and every other route is 503 `sealed` (after the
//! usual certificate and role checks). When `threshold` distinct configured shares are in, the
//! PIN is rebuilt, the shares are forgotten, and the start-up task ([`crate::server`]) opens the
//! HSM and everything after it; the gate then holds the [`App`] and serves the normal routes.
//!
//! Each share must come from a different officer: a second share from the same client
//! certificate's principal is refused (409 `share_already_given`), so that one person holding
//! several shares cannot unseal alone.
//!
//! Shares are secrets: they are held zeroized, compared by digest, and never logged, audited or
//! echoed; the audit record `admin.unsealed` names the officers who gave them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::http::StatusCode;
use hsm_adapter::quorum::{self, QuorumPolicy, Share};
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{Mutex, mpsc, oneshot};
use zeroize::Zeroizing;

use crate::api::{Ctx, Reply};
use crate::app::App;
use crate::metrics::Metrics;
use crate::problem::ApiError;
use crate::routes::Route;

/// What both listeners serve: the sealed handlers until the daemon is unsealed, then the [`App`].
#[derive(Debug)]
pub(crate) struct Gate {
    app: OnceLock<Arc<App>>,
    sealed: Option<Sealed>,
    pub(crate) metrics: Metrics,
    started: Instant,
}

/// The quorum being gathered.
#[derive(Debug)]
struct Sealed {
    policy: QuorumPolicy,
    /// Held across a whole unseal attempt, so that shares given meanwhile wait for its outcome.
    shares: Mutex<Vec<Given>>,
    /// How many shares are held, readable without waiting for an attempt (`/readyz`).
    received: AtomicUsize,
    attempts: mpsc::Sender<Attempt>,
}

/// A share and the officer who gave it.
#[derive(Debug)]
struct Given {
    share: Share,
    officer: String,
}

/// A rebuilt PIN, handed to the start-up task, which answers whether the daemon is unsealed.
#[derive(Debug)]
pub(crate) struct Attempt {
    pub(crate) pin: SecretString,
    /// The principal names of the officers whose shares rebuilt it, for the audit record.
    pub(crate) officers: Vec<String>,
    pub(crate) outcome: oneshot::Sender<Result<(), String>>,
}

impl Gate {
    /// A gate that is open from the start (`hsm.pin_file`).
    pub(crate) fn open(app: Arc<App>) -> Self {
        Self {
            metrics: app.metrics.clone(),
            started: app.started,
            app: OnceLock::from(app),
            sealed: None,
        }
    }

    /// A sealed gate; rebuilt PINs go to `attempts`.
    pub(crate) fn sealed(
        policy: QuorumPolicy,
        attempts: mpsc::Sender<Attempt>,
        metrics: Metrics,
        started: Instant,
    ) -> Self {
        metrics.sealed.set(1);
        Self {
            app: OnceLock::new(),
            sealed: Some(Sealed {
                policy,
                shares: Mutex::new(Vec::new()),
                received: AtomicUsize::new(0),
                attempts,
            }),
            metrics,
            started,
        }
    }

    /// The running daemon, once unsealed.
    pub(crate) fn app(&self) -> Option<&Arc<App>> {
        self.app.get()
    }

    /// Opens the gate: from now on the normal routes are served.
    pub(crate) fn unseal(&self, app: Arc<App>) {
        // Only the start-up task sets it, once; a second call would be a bug and is ignored.
        let _ = self.app.set(app);
        self.metrics.sealed.set(0);
    }

    /// Answers a request that passed the certificate and role checks while sealed.
    pub(crate) async fn sealed_route(&self, route: &Route, ctx: Ctx) -> Result<Reply, ApiError> {
        match route.template {
            "/v1/admin/status" => Ok(Reply::ok(&self.sealed_status())),
            "/v1/admin/unseal" => self.give_share(ctx).await,
            _ => Err(ApiError::Sealed),
        }
    }

    /// `(shares received, threshold)` while sealed.
    pub(crate) fn progress(&self) -> Option<(usize, usize)> {
        match (&self.sealed, self.app()) {
            (Some(sealed), None) => Some((
                sealed.received.load(Ordering::Relaxed),
                sealed.policy.threshold(),
            )),
            _ => None,
        }
    }

    fn sealed_status(&self) -> serde_json::Value {
        let (received, threshold) = self.progress().unwrap_or_default();
        json!({
            "sealed": true,
            "shares_received": received,
            "threshold": threshold,
            "ready": false,
            "uptime_seconds": self.started.elapsed().as_secs(),
        })
    }

    /// `POST /v1/admin/unseal` while sealed.
    async fn give_share(&self, ctx: Ctx) -> Result<Reply, ApiError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            share: String,
        }
        let Some(sealed) = &self.sealed else {
            return Err(ApiError::AlreadyUnsealed);
        };
        let body: Body = ctx.json()?;
        let text = Zeroizing::new(body.share);
        let mut shares = sealed.shares.lock().await;
        // An attempt that finished while this request waited for the lock may have unsealed.
        if self.app().is_some() {
            return Err(ApiError::AlreadyUnsealed);
        }
        let officer = ctx.caller.name.clone();
        let share = sealed.policy.accept(&text).map_err(|error| {
            tracing::warn!(officer = %officer, %error, "unseal share refused");
            ApiError::InvalidShare
        })?;
        let digest = share.digest();
        // Dual control: each share comes from another officer (client certificate). A second,
        // different share from the same officer is refused, and the held ones stay.
        if shares
            .iter()
            .any(|given| given.officer == officer && given.share.digest() != digest)
        {
            tracing::warn!(officer = %officer, "second unseal share from one officer refused");
            return Err(ApiError::ShareAlreadyGiven);
        }
        if shares.iter().any(|given| given.share.digest() == digest) {
            tracing::info!(officer = %officer, "unseal share given again; counted once");
        } else {
            tracing::info!(officer = %officer, index = share.index(), "unseal share accepted");
            shares.push(Given { share, officer });
            sealed.received.store(shares.len(), Ordering::Relaxed);
        }
        let threshold = sealed.policy.threshold();
        if shares.len() < threshold {
            return Ok(Reply::json(
                StatusCode::ACCEPTED,
                &json!({"sealed": true, "shares_received": shares.len(), "threshold": threshold}),
            ));
        }
        // Whatever happens next, these shares are forgotten (zeroized on drop).
        let given = std::mem::take(&mut *shares);
        sealed.received.store(0, Ordering::Relaxed);
        let mut officers: Vec<String> = given.iter().map(|g| g.officer.clone()).collect();
        officers.sort();
        officers.dedup();
        let parts: Vec<Share> = given.into_iter().map(|g| g.share).collect();
        let pin = quorum::combine(&parts).map_err(|error| {
            tracing::error!(%error, "the shares did not rebuild a PIN; they are forgotten");
            ApiError::UnsealFailed(
                "the shares do not rebuild a PIN (shares of different ceremonies?); they were \
                 forgotten: give shares of one ceremony again"
                    .into(),
            )
        })?;
        drop(parts);
        tracing::info!(officers = ?officers, "quorum reached: opening the HSM");
        let (outcome, answer) = oneshot::channel();
        sealed
            .attempts
            .send(Attempt {
                pin,
                officers,
                outcome,
            })
            .await
            .map_err(|_| self.no_attempt())?;
        match answer.await {
            Ok(Ok(())) => Ok(Reply::ok(&json!({"sealed": false}))),
            Ok(Err(error)) => Err(ApiError::UnsealFailed(format!(
                "{error}; the shares were forgotten and the daemon stays sealed: give the shares \
                 again once this is fixed"
            ))),
            Err(_) => Err(self.no_attempt()),
        }
    }

    /// Why the start-up task took no attempt: it unsealed with another one (whose request was
    /// cancelled while it ran), or it is shutting down.
    fn no_attempt(&self) -> ApiError {
        match self.app() {
            Some(_) => ApiError::AlreadyUnsealed,
            None => ApiError::UnsealFailed("the daemon is shutting down".into()),
        }
    }
}

/// `POST /v1/admin/unseal` once unsealed (or with `hsm.pin_file`): nothing to do.
pub(crate) async fn already_unsealed(_app: Arc<App>, _ctx: Ctx) -> Result<Reply, ApiError> {
    Err(ApiError::AlreadyUnsealed)
}
