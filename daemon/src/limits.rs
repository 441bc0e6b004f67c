//! Per-client-certificate limits on the API: a sustained rate with a burst (GCRA, the
//! `governor` crate) and a number of requests in flight, each kept per principal (`role:name`),
//! so that one service, gateway or officer cannot starve the others. Past either, the request
//! is refused with 429 `rate_limited` and a `Retry-After` before any of its body is read.
//!
//! The principals are the holders of client certificates from the client CA, so the state kept
//! here is bounded by the certificates issued.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::clock::Clock as _;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ClientLimits;
use crate::metrics::Metrics;
use crate::problem::ApiError;
use crate::tls::Caller;

/// The limits of every client certificate.
#[derive(Debug)]
pub(crate) struct ClientLimiter {
    rate: DefaultKeyedRateLimiter<String>,
    in_flight: Mutex<HashMap<String, Arc<Semaphore>>>,
    max_concurrent: usize,
    metrics: Metrics,
}

/// A request let in: it counts against its client's concurrency until the last clone drops
/// (the handler's task holds one, so a client that hangs up does not free its place early).
#[derive(Clone, Debug)]
pub(crate) struct Admitted {
    _permit: Arc<OwnedSemaphorePermit>,
}

impl ClientLimiter {
    pub(crate) fn new(limits: &ClientLimits, metrics: Metrics) -> Self {
        let one = NonZeroU32::MIN;
        let quota = Quota::per_second(NonZeroU32::new(limits.requests_per_second).unwrap_or(one))
            .allow_burst(NonZeroU32::new(limits.burst).unwrap_or(one));
        Self {
            rate: RateLimiter::keyed(quota),
            in_flight: Mutex::new(HashMap::new()),
            max_concurrent: usize::try_from(limits.max_concurrent)
                .unwrap_or(usize::MAX)
                .clamp(1, Semaphore::MAX_PERMITS),
            metrics,
        }
    }

    /// Lets one request of `caller` in, or says when to come back.
    pub(crate) fn admit(&self, caller: &Caller) -> Result<Admitted, ApiError> {
        let principal = caller.to_string();
        if let Err(not_until) = self.rate.check_key(&principal) {
            self.metrics
                .count_rate_limited(caller.role.as_str(), "rate");
            let wait = not_until.wait_time_from(self.rate.clock().now());
            return Err(ApiError::RateLimited {
                retry_after: u32::try_from(wait.as_secs().saturating_add(1)).unwrap_or(u32::MAX),
            });
        }
        let semaphore = {
            let mut in_flight = self
                .in_flight
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            in_flight
                .entry(principal)
                .or_insert_with(|| Arc::new(Semaphore::new(self.max_concurrent)))
                .clone()
        };
        match semaphore.try_acquire_owned() {
            Ok(permit) => Ok(Admitted {
                _permit: Arc::new(permit),
            }),
            Err(_) => {
                self.metrics
                    .count_rate_limited(caller.role.as_str(), "concurrency");
                Err(ApiError::RateLimited { retry_after: 1 })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::Role;

    fn caller(name: &str) -> Caller {
        Caller {
            role: Role::Service,
            name: name.to_owned(),
        }
    }

    fn limiter(rate: u32, burst: u32, concurrent: u32) -> ClientLimiter {
        ClientLimiter::new(
            &ClientLimits {
                requests_per_second: rate,
                burst,
                max_concurrent: concurrent,
            },
            Metrics::new().unwrap(),
        )
    }

    #[test]
    fn a_burst_past_the_quota_is_refused_with_a_retry_time_and_others_are_not_affected() {
        let limiter = limiter(1, 3, 100);
        let greedy = caller("greedy");
        let admitted: Vec<_> = (0..3).map(|_| limiter.admit(&greedy).unwrap()).collect();
        match limiter.admit(&greedy) {
            Err(ApiError::RateLimited { retry_after }) => assert!((1..=2).contains(&retry_after)),
            other => panic!("expected rate_limited, got {other:?}"),
        }
        // Another certificate has its own budget.
        limiter.admit(&caller("polite")).unwrap();
        drop(admitted);
    }

    #[test]
    fn requests_in_flight_are_capped_until_one_finishes() {
        let limiter = limiter(1000, 1000, 2);
        let busy = caller("busy");
        let first = limiter.admit(&busy).unwrap();
        let second = limiter.admit(&busy).unwrap();
        let handler_copy = second.clone();
        assert!(matches!(
            limiter.admit(&busy),
            Err(ApiError::RateLimited { retry_after: 1 })
        ));
        drop(first);
        let third = limiter.admit(&busy).unwrap();
        // The client hung up, but its handler still runs: the place stays taken.
        drop(second);
        assert!(limiter.admit(&busy).is_err());
        drop(handler_copy);
        limiter.admit(&busy).unwrap();
        drop(third);
    }
}
