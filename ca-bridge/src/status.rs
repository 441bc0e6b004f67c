//! Certificate status before signing: OCSP answers from a cache while fresh, OCSP fetched
//! otherwise, and the CRL (cached until its nextUpdate) when OCSP cannot answer. The daemon asks
//! before it creates a signing request and again just before the HSM signs.
//!
//! Freshness is judged on the caller's clock (`now`), never on the system clock: the daemon's
//! development clock can be moved.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use der::Decode;
use x509_cert::certificate::Certificate;
use x509_cert::ext::pkix::name::{DistributionPointName, GeneralName};
use x509_cert::ext::pkix::{AuthorityInfoAccessSyntax, CrlDistributionPoints};

use crate::crl::VerifiedCrl;
use crate::error::CaError;
use crate::ocsp::{OcspAnswer, OcspQuery, OcspStatus};
use crate::transport::HttpTransport;
use crate::verify::{CLOCK_SKEW, serial_hex, verify_issued_by};

/// How fresh a status must be, and where to ask for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusPolicy {
    /// The oldest a "good" answer may be (since its thisUpdate) to be used.
    pub max_age: Duration,
    /// `None` (the default) fails closed: without a fresh status the certificate's status is
    /// unavailable. `Some(g)`: when no fresh answer can be had, the last good OCSP answer is
    /// still accepted for `g` after it stopped being fresh (the earlier of its nextUpdate and
    /// `max_age` after its thisUpdate): a bounded ride-through of a CA outage.
    pub grace: Option<Duration>,
    /// The time limit of each request to the CA.
    pub timeout: Duration,
    /// Replaces the certificate's AIA OCSP URL (development: the listener's real port).
    pub ocsp_url: Option<String>,
    /// Replaces the certificate's CRL distribution point.
    pub crl_url: Option<String>,
    /// Where a check without a cached OCSP answer looks first. [`StatusSource::Ocsp`] (the
    /// default) asks the responder about each certificate and falls back to the CRL;
    /// [`StatusSource::Crl`] reads the issuer's CRL, held in memory while it is fresh, and asks
    /// the responder only when no fresh CRL can be had: its cost does not grow with the number
    /// of certificates checked.
    pub first: StatusSource,
}

impl Default for StatusPolicy {
    /// One hour, fail closed, ten-second requests, the certificates' own URLs.
    fn default() -> StatusPolicy {
        StatusPolicy {
            max_age: Duration::from_secs(3600),
            grace: None,
            timeout: Duration::from_secs(10),
            ocsp_url: None,
            crl_url: None,
            first: StatusSource::Ocsp,
        }
    }
}

/// What the checker reports for metrics (the daemon implements it with prometheus).
pub trait StatusObserver: Send + Sync + 'static {
    /// A status was looked up in the cache: found fresh (`hit`) or not.
    fn cache_lookup(&self, hit: bool);
    /// A request to the CA (`kind` is `"ocsp"` or `"crl"`) took `elapsed` and succeeded or not.
    fn ca_request(&self, kind: &'static str, elapsed: Duration, ok: bool);
    /// The age of the CRL in use (since its thisUpdate).
    fn crl_age(&self, age: Duration);
}

/// Where a good status came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StatusSource {
    /// An OCSP response.
    Ocsp,
    /// The CRL.
    Crl,
}

/// A certificate's status as the checker found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertStatus {
    /// Not revoked.
    Good {
        /// Where the answer came from.
        source: StatusSource,
        /// When the answer was known to be correct.
        this_update: SystemTime,
        /// The answer is older than `max_age` and accepted only under the policy's grace.
        within_grace: bool,
    },
    /// Revoked.
    Revoked {
        /// When.
        revoked_at: SystemTime,
        /// RFC 5280 CRLReason code.
        reason_code: u8,
    },
    /// The CA does not know the certificate.
    Unknown,
}

/// Checks certificates of one issuer. Cheap to clone (the cache is shared).
#[derive(Clone)]
pub struct StatusChecker {
    inner: Arc<Inner>,
}

struct Inner {
    transport: HttpTransport,
    issuer_der: Vec<u8>,
    issuer: Certificate,
    policy: StatusPolicy,
    observer: Arc<dyn StatusObserver>,
    /// OCSP answers by serial.
    answers: Mutex<HashMap<String, Cached>>,
    /// One lock per serial being fetched, so that concurrent checks share one fetch.
    in_flight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The CRL, by its URL.
    crl: tokio::sync::Mutex<Option<(String, Arc<VerifiedCrl>)>>,
}

#[derive(Debug, Clone, Copy)]
struct Cached {
    answer: OcspAnswer,
    refreshing: bool,
}

impl fmt::Debug for StatusChecker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatusChecker")
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

/// The URLs and serial of the certificate being checked.
#[derive(Debug)]
struct Target {
    cert_der: Vec<u8>,
    serial_hex: String,
    ocsp_url: Option<String>,
    crl_url: Option<String>,
}

impl StatusChecker {
    /// A checker for certificates issued by `issuer_der` (DER), asking over `transport`.
    pub fn new(
        transport: HttpTransport,
        issuer_der: Vec<u8>,
        policy: StatusPolicy,
        observer: Arc<dyn StatusObserver>,
    ) -> Result<StatusChecker, CaError> {
        let issuer = Certificate::from_der(&issuer_der)?;
        Ok(StatusChecker {
            inner: Arc::new(Inner {
                transport,
                issuer_der,
                issuer,
                policy,
                observer,
                answers: Mutex::new(HashMap::new()),
                in_flight: Mutex::new(HashMap::new()),
                crl: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// The status of `cert_der` (issued by the issuer) at `now`, the caller's clock. A fresh
    /// cached OCSP answer first (one past half its life is refreshed in the background and
    /// still returned), then OCSP fetched, then the CRL; with [`StatusPolicy::first`] at
    /// [`StatusSource::Crl`], the CRL before OCSP. Without an answer the policy accepts:
    /// [`CaError::StatusUnavailable`]. A certificate the issuer did not sign is
    /// [`CaError::Protection`].
    pub async fn check(&self, cert_der: &[u8], now: SystemTime) -> Result<CertStatus, CaError> {
        let target = self.target(cert_der)?;
        if let Some(status) = self.cached_status(&target, now)? {
            return Ok(status);
        }

        // Single flight: one fetch per serial; the others wait for it and read the cache.
        let gate = {
            let mut in_flight = lock(&self.inner.in_flight)?;
            Arc::clone(in_flight.entry(target.serial_hex.clone()).or_default())
        };
        let guard = gate.lock().await;
        let result = self.fetch_and_decide(&target, now).await;
        drop(guard);
        {
            let mut in_flight = lock(&self.inner.in_flight)?;
            if Arc::strong_count(&gate) <= 2 {
                in_flight.remove(&target.serial_hex);
            }
        }
        result
    }

    /// The cached answer for a serial (hex, any case, leading zeros allowed) when it serves at
    /// `now` without the CA: a revoked answer, or a good one that is fresh and not yet past half
    /// its life. `None` sends the caller to [`StatusChecker::check`], which also refreshes. It
    /// spares the hot path decoding (and verifying) the certificate.
    pub fn cached(&self, serial_hex: &str, now: SystemTime) -> Option<CertStatus> {
        let serial = serial_hex.trim_start_matches('0').to_ascii_lowercase();
        let answer = lock(&self.inner.answers).ok()?.get(&serial)?.answer;
        let status = match answer.status {
            OcspStatus::Revoked { .. } => to_status(&answer, false),
            OcspStatus::Good
                if fresh(&answer, now, self.inner.policy.max_age)
                    && !half_life_passed(&answer, now) =>
            {
                to_status(&answer, false)
            }
            _ => return None,
        };
        self.inner.observer.cache_lookup(true);
        Some(status)
    }

    /// Drops the cached answer for a serial (hex, any case, leading zeros allowed); the daemon
    /// calls it after revoking locally.
    pub fn forget(&self, serial_hex: &str) {
        let serial = serial_hex.trim_start_matches('0').to_ascii_lowercase();
        if let Ok(mut answers) = lock(&self.inner.answers) {
            answers.remove(&serial);
        }
    }

    fn target(&self, cert_der: &[u8]) -> Result<Target, CaError> {
        let cert = Certificate::from_der(cert_der)?;
        verify_issued_by(&cert, &self.inner.issuer)?;
        let policy = &self.inner.policy;
        let ocsp_url = policy.ocsp_url.clone().or_else(|| aia_ocsp_url(&cert));
        let crl_url = policy.crl_url.clone().or_else(|| crl_dp_url(&cert));
        Ok(Target {
            cert_der: cert_der.to_vec(),
            serial_hex: serial_hex(cert.tbs_certificate.serial_number.as_bytes()),
            ocsp_url,
            crl_url,
        })
    }

    /// A cached answer usable at `now`, starting a background refresh past half its life.
    fn cached_status(
        &self,
        target: &Target,
        now: SystemTime,
    ) -> Result<Option<CertStatus>, CaError> {
        let mut answers = lock(&self.inner.answers)?;
        let Some(cached) = answers.get_mut(&target.serial_hex) else {
            self.inner.observer.cache_lookup(false);
            return Ok(None);
        };
        let answer = cached.answer;
        let status = match answer.status {
            OcspStatus::Revoked { .. } => Some(to_status(&answer, false)),
            _ if fresh(&answer, now, self.inner.policy.max_age) => Some(to_status(&answer, false)),
            _ => None,
        };
        self.inner.observer.cache_lookup(status.is_some());
        if status.is_some()
            && answer.status == OcspStatus::Good
            && half_life_passed(&answer, now)
            && !cached.refreshing
        {
            cached.refreshing = true;
            let checker = self.clone();
            let target = Target {
                cert_der: target.cert_der.clone(),
                serial_hex: target.serial_hex.clone(),
                ocsp_url: target.ocsp_url.clone(),
                crl_url: None,
            };
            tokio::spawn(async move {
                let fetched = checker.fetch_ocsp(&target, now).await;
                if let Ok(mut answers) = lock(&checker.inner.answers)
                    && let Some(cached) = answers.get_mut(&target.serial_hex)
                {
                    cached.refreshing = false;
                }
                if let Err(e) = fetched {
                    tracing::warn!(serial = %target.serial_hex, error = %e,
                        "background OCSP refresh failed");
                }
            });
        }
        Ok(status)
    }

    async fn fetch_and_decide(
        &self,
        target: &Target,
        now: SystemTime,
    ) -> Result<CertStatus, CaError> {
        // Another check may have fetched while this one waited.
        if let Some(cached) = lock(&self.inner.answers)?.get(&target.serial_hex) {
            let answer = cached.answer;
            if matches!(answer.status, OcspStatus::Revoked { .. })
                || fresh(&answer, now, self.inner.policy.max_age)
            {
                return Ok(to_status(&answer, false));
            }
        }
        let crl_first_error = if self.inner.policy.first == StatusSource::Crl {
            match self.crl_status(target, now).await {
                Ok(status) => return Ok(status),
                Err(e) => Some(e.to_string()),
            }
        } else {
            None
        };
        let ocsp_error = match self.fetch_ocsp(target, now).await {
            Ok(answer) if usable(&answer, now, self.inner.policy.max_age) => {
                return Ok(to_status(&answer, false));
            }
            Ok(_) => "the OCSP answer is older than max_age".to_owned(),
            Err(e) => e.to_string(),
        };
        let crl_error = match crl_first_error {
            Some(error) => error,
            None => match self.crl_status(target, now).await {
                Ok(status) => return Ok(status),
                Err(e) => e.to_string(),
            },
        };
        if let Some(grace) = self.inner.policy.grace {
            let cached = lock(&self.inner.answers)?.get(&target.serial_hex).copied();
            if let Some(Cached { answer, .. }) = cached
                && answer.status == OcspStatus::Good
                && within_grace(&answer, now, self.inner.policy.max_age, grace)
            {
                tracing::warn!(serial = %target.serial_hex,
                    "no fresh status; using a good answer within the grace period");
                return Ok(to_status(&answer, true));
            }
        }
        Err(CaError::StatusUnavailable(format!(
            "serial {}: OCSP: {ocsp_error}; CRL: {crl_error}",
            target.serial_hex
        )))
    }

    /// Fetches and verifies an OCSP answer and caches it (unless the CA does not know the
    /// certificate).
    async fn fetch_ocsp(&self, target: &Target, now: SystemTime) -> Result<OcspAnswer, CaError> {
        let url = target
            .ocsp_url
            .as_deref()
            .ok_or_else(|| CaError::Config("no OCSP URL".into()))?;
        let query = OcspQuery::new(&self.inner.issuer_der, &target.cert_der)?;
        let started = Instant::now();
        let result = within(
            self.inner.policy.timeout,
            url,
            query.send(&self.inner.transport, url, now),
        )
        .await;
        self.inner
            .observer
            .ca_request("ocsp", started.elapsed(), result.is_ok());
        let answer = result?;
        if answer.status != OcspStatus::Unknown {
            lock(&self.inner.answers)?.insert(
                target.serial_hex.clone(),
                Cached {
                    answer,
                    refreshing: false,
                },
            );
        }
        Ok(answer)
    }

    /// The status from the CRL, fetched when none is cached for this URL or the cached one is
    /// no longer fresh. A CRL is fresh, like an OCSP answer, until its nextUpdate and no longer
    /// than `max_age` after its thisUpdate; a good answer from a CRL that is not fresh counts
    /// only within the policy's grace.
    async fn crl_status(&self, target: &Target, now: SystemTime) -> Result<CertStatus, CaError> {
        let url = target
            .crl_url
            .as_deref()
            .ok_or_else(|| CaError::Config("no CRL URL".into()))?;
        let crl = {
            let mut cached = self.inner.crl.lock().await;
            match cached.as_ref() {
                Some((cached_url, crl))
                    if cached_url == url
                        && now < crl_fresh_until(crl, self.inner.policy.max_age) =>
                {
                    Arc::clone(crl)
                }
                _ => {
                    let started = Instant::now();
                    let result = within(
                        self.inner.policy.timeout,
                        url,
                        VerifiedCrl::fetch(&self.inner.transport, url, &self.inner.issuer_der, now),
                    )
                    .await;
                    self.inner
                        .observer
                        .ca_request("crl", started.elapsed(), result.is_ok());
                    let crl = Arc::new(result?);
                    *cached = Some((url.to_owned(), Arc::clone(&crl)));
                    crl
                }
            }
        };
        self.inner
            .observer
            .crl_age(now.duration_since(crl.this_update()).unwrap_or_default());
        Ok(match crl.lookup(&target.serial_hex) {
            Some(entry) => CertStatus::Revoked {
                revoked_at: entry.revoked_at,
                reason_code: entry.reason_code,
            },
            None => {
                let fresh_until = crl_fresh_until(&crl, self.inner.policy.max_age);
                let within_grace = now >= fresh_until;
                let grace = self.inner.policy.grace.unwrap_or_default();
                if within_grace && (grace.is_zero() || now >= fresh_until + grace) {
                    return Err(CaError::StatusUnavailable(format!(
                        "the CRL of {url} is older than the status policy's maximum age"
                    )));
                }
                CertStatus::Good {
                    source: StatusSource::Crl,
                    this_update: crl.this_update(),
                    within_grace,
                }
            }
        })
    }
}

/// Until when a CRL counts as fresh: its nextUpdate, and no longer than `max_age` after its
/// thisUpdate.
fn crl_fresh_until(crl: &VerifiedCrl, max_age: Duration) -> SystemTime {
    crl.next_update().min(crl.this_update() + max_age)
}

/// `request` limited to the policy's time per CA request.
async fn within<T>(
    limit: Duration,
    url: &str,
    request: impl Future<Output = Result<T, CaError>>,
) -> Result<T, CaError> {
    tokio::time::timeout(limit, request)
        .await
        .map_err(|_| CaError::Transport {
            url: url.to_owned(),
            why: "timed out".into(),
        })?
}

/// When a good answer stops being fresh: its nextUpdate, or `max_age` after its thisUpdate if
/// that is earlier.
fn fresh_until(answer: &OcspAnswer, max_age: Duration) -> SystemTime {
    answer.next_update.min(answer.this_update + max_age)
}

/// A good answer is fresh while younger than `max_age`, before its nextUpdate, and not from
/// the future.
fn fresh(answer: &OcspAnswer, now: SystemTime, max_age: Duration) -> bool {
    now + CLOCK_SKEW >= answer.this_update && now < fresh_until(answer, max_age)
}

/// A good answer that is no longer fresh, but stopped being fresh less than `grace` ago.
fn within_grace(answer: &OcspAnswer, now: SystemTime, max_age: Duration, grace: Duration) -> bool {
    now + CLOCK_SKEW >= answer.this_update && now < fresh_until(answer, max_age) + grace
}

/// A just-fetched answer is usable when revoked or unknown, or fresh when good.
fn usable(answer: &OcspAnswer, now: SystemTime, max_age: Duration) -> bool {
    answer.status != OcspStatus::Good || fresh(answer, now, max_age)
}

fn half_life_passed(answer: &OcspAnswer, now: SystemTime) -> bool {
    let life = answer
        .next_update
        .duration_since(answer.this_update)
        .unwrap_or_default();
    now >= answer.this_update + life / 2
}

fn to_status(answer: &OcspAnswer, within_grace: bool) -> CertStatus {
    match answer.status {
        OcspStatus::Good => CertStatus::Good {
            source: StatusSource::Ocsp,
            this_update: answer.this_update,
            within_grace,
        },
        OcspStatus::Revoked {
            revoked_at,
            reason_code,
        } => CertStatus::Revoked {
            revoked_at,
            reason_code,
        },
        OcspStatus::Unknown => CertStatus::Unknown,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> Result<MutexGuard<'_, T>, CaError> {
    mutex
        .lock()
        .map_err(|_| CaError::Internal("status cache lock poisoned".into()))
}

/// The first http(s) OCSP URL of the certificate's authorityInfoAccess.
fn aia_ocsp_url(cert: &Certificate) -> Option<String> {
    let Ok(Some((_, aia))) = cert.tbs_certificate.get::<AuthorityInfoAccessSyntax>() else {
        return None;
    };
    aia.0.iter().find_map(|access| {
        if access.access_method != const_oid::db::rfc5280::ID_AD_OCSP {
            return None;
        }
        uri(&access.access_location)
    })
}

/// The first http(s) URL of the certificate's CRL distribution points.
fn crl_dp_url(cert: &Certificate) -> Option<String> {
    let Ok(Some((_, points))) = cert.tbs_certificate.get::<CrlDistributionPoints>() else {
        return None;
    };
    points
        .0
        .iter()
        .find_map(|point| match &point.distribution_point {
            Some(DistributionPointName::FullName(names)) => names.iter().find_map(uri),
            _ => None,
        })
}

fn uri(name: &GeneralName) -> Option<String> {
    match name {
        GeneralName::UniformResourceIdentifier(uri)
            if uri.as_str().starts_with("http://") || uri.as_str().starts_with("https://") =>
        {
            Some(uri.as_str().to_owned())
        }
        _ => None,
    }
}
