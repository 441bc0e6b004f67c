//! The route table of API.md: method, path template, the roles allowed, and the handler.
//! Metrics label requests by the template, never by the concrete path; [`crate::api`] builds
//! the axum router from it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::http::Method;

use crate::api::{Ctx, Reply};
use crate::app::App;
use crate::problem::ApiError;
use crate::tls::Role::{self, *};
use crate::{accounts, admin, audit_api, csc, events, lifecycle, signing, sweeps, unseal};

type Handler = fn(Arc<App>, Ctx) -> Pin<Box<dyn Future<Output = Result<Reply, ApiError>> + Send>>;

/// One route.
#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) method: Method,
    pub(crate) template: &'static str,
    pub(crate) roles: &'static [Role],
    pub(crate) handler: Handler,
    /// The largest body it reads, in bytes; a larger one is 413 `payload_too_large`.
    pub(crate) body_limit: usize,
}

/// The body limit of routes that take JSON: the largest API body (a registration with a PEM
/// device key, names and a guardian) is under 4 KiB.
const JSON_BODY: usize = 16 * 1024;
/// The body limit of routes that take none (a client may still send `{}`).
const NO_BODY: usize = 1024;

/// The body limit of a route by its method.
fn body_limit(method: &Method) -> usize {
    if *method == Method::GET || *method == Method::DELETE {
        NO_BODY
    } else {
        JSON_BODY
    }
}

macro_rules! route {
    ($method:ident, $template:literal, $roles:expr, $handler:path) => {
        Route {
            method: Method::$method,
            template: $template,
            roles: $roles,
            handler: |app, ctx| Box::pin($handler(app, ctx)),
            body_limit: body_limit(&Method::$method),
        }
    };
}

/// Every API route. `{...}` segments are parameters, passed to the handler in order.
pub(crate) fn table() -> &'static [Route] {
    static TABLE: std::sync::OnceLock<Vec<Route>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        vec![
            route!(POST, "/v1/accounts", &[Registrar], accounts::register),
            route!(GET, "/v1/accounts/{id}", &[Registrar], accounts::get),
            route!(
                DELETE,
                "/v1/accounts/{id}",
                &[Registrar],
                accounts::deregister
            ),
            route!(
                POST,
                "/v1/accounts/{id}/upgrade",
                &[Registrar],
                accounts::upgrade
            ),
            route!(
                PUT,
                "/v1/accounts/{id}/device",
                &[Registrar],
                accounts::switch_device
            ),
            route!(
                POST,
                "/v1/accounts/{id}/suspend",
                &[Registrar],
                accounts::suspend
            ),
            route!(
                POST,
                "/v1/accounts/{id}/resume",
                &[Registrar],
                accounts::resume
            ),
            route!(
                POST,
                "/v1/accounts/{id}/matching",
                &[Registrar],
                accounts::matching
            ),
            route!(
                POST,
                "/v1/accounts/{id}/invalidate",
                &[Registrar],
                accounts::invalidate
            ),
            route!(GET, "/v1/accounts/{id}/taid", &[Registrar], accounts::taid),
            route!(
                POST,
                "/v1/accounts/{id}/certificate/revoke",
                &[Registrar, Officer],
                accounts::revoke_certificate
            ),
            route!(GET, "/v1/renewals/due", &[Registrar], lifecycle::due),
            route!(
                GET,
                "/v1/accounts/{id}/consent-challenge",
                &[Gateway],
                lifecycle::consent_challenge
            ),
            route!(
                POST,
                "/v1/accounts/{id}/certificate/renewal",
                &[Gateway],
                lifecycle::renew
            ),
            route!(
                POST,
                "/v1/accounts/{id}/certificate/reapply",
                &[Gateway],
                lifecycle::reapply
            ),
            route!(POST, "/v1/signing-requests", &[Service], signing::create),
            route!(GET, "/v1/signing-requests/{id}", &[Service], signing::get),
            route!(
                GET,
                "/v1/signing-requests/{id}/receipt",
                &[Service],
                audit_api::receipt
            ),
            route!(
                GET,
                "/v1/accounts/{id}/signing-requests",
                &[Gateway],
                signing::pending_for_account
            ),
            route!(
                POST,
                "/v1/signing-requests/{id}/authorisation",
                &[Gateway],
                signing::authorise
            ),
            route!(
                GET,
                "/v1/accounts/{id}/signing-history",
                &[Gateway],
                signing::history
            ),
            route!(
                POST,
                "/v1/accounts/{id}/deregistration",
                &[Gateway],
                lifecycle::deregistration
            ),
            route!(GET, "/v1/events", &[Gateway, Registrar], events::feed),
            route!(POST, "/csc/v1/info", &[Service], csc::info),
            route!(POST, "/csc/v1/credentials/list", &[Service], csc::list),
            route!(
                POST,
                "/csc/v1/credentials/info",
                &[Service],
                csc::credential_info
            ),
            route!(
                POST,
                "/csc/v1/credentials/authorize",
                &[Service],
                csc::authorize
            ),
            route!(
                POST,
                "/csc/v1/signatures/signHash",
                &[Service],
                csc::sign_hash
            ),
            route!(GET, "/v1/audit/records", &[Auditor], audit_api::records),
            route!(
                GET,
                "/v1/audit/checkpoint",
                &[Auditor],
                audit_api::checkpoint
            ),
            route!(
                GET,
                "/v1/audit/proofs/inclusion",
                &[Auditor],
                audit_api::inclusion
            ),
            route!(
                GET,
                "/v1/audit/proofs/consistency",
                &[Auditor],
                audit_api::consistency
            ),
            route!(
                GET,
                "/v1/audit/public-key",
                &[Auditor],
                audit_api::public_key
            ),
            route!(GET, "/v1/admin/status", &[Officer], admin::status),
            route!(
                POST,
                "/v1/admin/unseal",
                &[Officer],
                unseal::already_unsealed
            ),
            route!(POST, "/v1/admin/clock", &[Officer], admin::set_clock),
            route!(POST, "/v1/admin/sweep", &[Officer], sweeps::sweep_now),
        ]
    })
}

/// The route `method` `template` of the table, if there is one.
pub(crate) fn find(method: &Method, template: &str) -> Option<&'static Route> {
    table()
        .iter()
        .find(|route| route.method == *method && route.template == template)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_method_and_template_is_one_route() {
        for (i, route) in table().iter().enumerate() {
            assert!(
                table()[..i]
                    .iter()
                    .all(|other| (&other.method, other.template) != (&route.method, route.template)),
                "{} {} twice",
                route.method,
                route.template
            );
            assert!(std::ptr::eq(
                find(&route.method, route.template).unwrap(),
                route
            ));
        }
        assert!(find(&Method::PATCH, "/v1/accounts/{id}").is_none());
    }
}
