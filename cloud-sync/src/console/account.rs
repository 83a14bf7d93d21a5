//! Sign-in, sign-out, the password page and the audit page.

use std::sync::Arc;

use axum::extract::{ConnectInfo, Query};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use maud::Markup;
use serde::Deserialize;

use super::{Fields, PageError, audited, field, pages};
use crate::access::{Access, Caller, PeerAddr, SESSION_COOKIE, cookie};
use crate::operators::Role;
use crate::service::now_ms;
use crate::store::{AuditFilter, AuditRow};

#[derive(Deserialize, Default)]
pub(super) struct LoginQuery {
    next: Option<String>,
}

/// Where to go after signing in: a path on this console only (never `//host` or a URL).
fn safe_next(next: &str) -> &str {
    if next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') {
        next
    } else {
        "/"
    }
}

pub(super) async fn login_page(Query(q): Query<LoginQuery>) -> Markup {
    pages::login(None, safe_next(q.next.as_deref().unwrap_or("/")))
}

pub(super) async fn login(
    Extension(access): Extension<Arc<Access>>,
    peer: Option<Extension<ConnectInfo<PeerAddr>>>,
    Form(f): Fields,
) -> Response {
    let (user, password) = (field(&f, "user").to_string(), field(&f, "password").to_string());
    let next = safe_next(field(&f, "next")).to_string();
    let from = peer.map_or("unknown".to_string(), |p| p.0.0.0.ip().to_string());
    let a = access.clone();
    let (u, fr) = (user.clone(), from.clone());
    // argon2 takes tens of milliseconds of CPU: off the async threads.
    let outcome = tokio::task::spawn_blocking(move || a.sign_in(&u, &password, &fr))
        .await
        .unwrap_or_else(|e| Err(format!("sign-in failed: {e}")));
    access.audit(AuditRow {
        at_ms: now_ms(),
        who: user.clone(),
        from,
        kind: "sign_in".into(),
        device: String::new(),
        target: String::new(),
        result: if outcome.is_ok() { "ok" } else { "refused" }.into(),
        message: outcome.as_ref().err().cloned().unwrap_or_default(),
    });
    match outcome {
        Ok((session, must_change)) => {
            let to = if must_change {
                "/account/password"
            } else {
                next.as_str()
            };
            let mut r = Redirect::to(to).into_response();
            if let Ok(v) = access.session_cookie(Some(&session)).parse() {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Err(e) => (StatusCode::UNAUTHORIZED, pages::login(Some(&e), &next)).into_response(),
    }
}

pub(super) async fn logout(Extension(access): Extension<Arc<Access>>, headers: axum::http::HeaderMap) -> Response {
    if let Some(c) = cookie(&headers, SESSION_COOKIE) {
        access.sign_out(c);
    }
    let mut r = Redirect::to("/login").into_response();
    if let Ok(v) = access.session_cookie(None).parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

pub(super) async fn password_page(Extension(access): Extension<Arc<Access>>, caller: Caller) -> Markup {
    let store = access.store().clone();
    let name = caller.principal.name.clone();
    let must_change = tokio::task::spawn_blocking(move || store.user(&name))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten()
        .is_some_and(|u| u.must_change);
    pages::password(&pages::Viewer::of(&caller), must_change, None)
}

pub(super) async fn change_password(
    Extension(access): Extension<Arc<Access>>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    Form(f): Fields,
) -> Response {
    let viewer = pages::Viewer::of(&caller);
    let (current, new, repeat) = (
        field(&f, "current").to_string(),
        field(&f, "new").to_string(),
        field(&f, "repeat").to_string(),
    );
    let Some(session) = cookie(&headers, SESSION_COOKIE).map(str::to_string) else {
        let why = "only a signed-in user changes their password here";
        return audited(
            "password",
            "",
            &caller.principal.name,
            Err(why.into()),
            (StatusCode::FORBIDDEN, pages::password(&viewer, false, Some(why))),
        );
    };
    let outcome = if new != repeat {
        Err("the two new passwords differ".to_string())
    } else {
        let (a, name) = (access.clone(), caller.principal.name.clone());
        tokio::task::spawn_blocking(move || a.change_password(&session, &name, &current, &new))
            .await
            .unwrap_or_else(|e| Err(e.to_string()))
    };
    match outcome {
        Ok(()) => audited(
            "password",
            "",
            &caller.principal.name,
            Ok(String::new()),
            Redirect::to("/"),
        ),
        Err(e) => audited(
            "password",
            "",
            &caller.principal.name,
            Err(e.clone()),
            (StatusCode::BAD_REQUEST, pages::password(&viewer, false, Some(&e))),
        ),
    }
}

/// The audit filter of the page and the export.
#[derive(Deserialize, Default)]
pub struct AuditQuery {
    who: Option<String>,
    device: Option<String>,
    kind: Option<String>,
}

impl AuditQuery {
    /// As the store's filter (empty fields select everything).
    pub fn filter(&self) -> AuditFilter {
        let some = |o: &Option<String>| o.clone().filter(|v| !v.trim().is_empty());
        AuditFilter {
            who: some(&self.who),
            device: some(&self.device),
            kind: some(&self.kind),
        }
    }
}

/// Entries the audit page shows.
const AUDIT_SHOWN: usize = 500;

pub(super) async fn audit(
    Extension(access): Extension<Arc<Access>>,
    caller: Caller,
    Query(q): Query<AuditQuery>,
) -> Result<Response, PageError> {
    if let Err(e) = caller.need(Role::Admin, "read the audit trail") {
        return Ok(e.into_page());
    }
    let filter = q.filter();
    let store = access.store().clone();
    let f = filter.clone();
    let rows = super::blocking(move || store.audit(&f, AUDIT_SHOWN)).await?;
    Ok(pages::audit(&rows, &filter, &pages::Viewer::of(&caller), AUDIT_SHOWN).into_response())
}
