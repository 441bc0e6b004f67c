//! The route table of API.md: method, path template, the roles allowed, and the handler.
//! Metrics label requests by the template, never by the concrete path.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use hyper::Method;

use crate::app::App;
use crate::http::{Ctx, Reply};
use crate::problem::ApiError;
use crate::tls::Role::{self, *};
use crate::{accounts, admin, audit_api, lifecycle, signing, sweeps, unseal};

type Handler = fn(Arc<App>, Ctx) -> Pin<Box<dyn Future<Output = Result<Reply, ApiError>> + Send>>;

/// One route.
#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) method: Method,
    pub(crate) template: &'static str,
    pub(crate) roles: &'static [Role],
    pub(crate) handler: Handler,
}

macro_rules! route {
    ($method:ident, $template:literal, $roles:expr, $handler:path) => {
        Route {
            method: Method::$method,
            template: $template,
            roles: $roles,
            handler: |app, ctx| Box::pin($handler(app, ctx)),
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

fn matches(template: &str, path: &str) -> Option<Vec<String>> {
    let mut params = Vec::new();
    let mut template_parts = template.split('/');
    let mut path_parts = path.split('/');
    loop {
        match (template_parts.next(), path_parts.next()) {
            (None, None) => return Some(params),
            (Some(t), Some(p)) if t.starts_with('{') => {
                if p.is_empty() {
                    return None;
                }
                params.push(p.to_owned());
            }
            (Some(t), Some(p)) if t == p => {}
            _ => return None,
        }
    }
}

/// The route for `method` and `path`, with its parameters.
pub(crate) fn resolve(method: &Method, path: &str) -> Option<(&'static Route, Vec<String>)> {
    table()
        .iter()
        .filter(|route| route.method == *method)
        .find_map(|route| matches(route.template, path).map(|params| (route, params)))
}

/// Whether some route serves `path` with another method (405 rather than 404).
pub(crate) fn path_known(path: &str) -> bool {
    table()
        .iter()
        .any(|route| matches(route.template, path).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_with_parameters_in_order() {
        let (route, params) =
            resolve(&Method::POST, "/v1/signing-requests/abc/authorisation").unwrap();
        assert_eq!(route.template, "/v1/signing-requests/{id}/authorisation");
        assert_eq!(params, ["abc"]);
        assert!(resolve(&Method::GET, "/v1/accounts/").is_none());
        assert!(resolve(&Method::GET, "/v1/accounts/a/b/c").is_none());
        assert!(path_known("/v1/accounts/u-1"));
    }
}
