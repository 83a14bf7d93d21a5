//! Access control for the console and the JSON API, in front of every route: the Host check
//! (DNS rebinding), who the caller is (session cookie, bearer token, or the plant's sign-on
//! proxy), and for anything that changes state the Origin check, the CSRF token of forms and the
//! JSON content type. Every such request, allowed or refused, lands in the audit trail. Role
//! checks are the handlers' (`Caller::need`), which know what is being asked.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header, request::Parts};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::json;

use crate::operators::{self, Lockout, LockoutPolicy, Principal, Role, SessionPolicy, Sessions, Via};
use crate::service::now_ms;
use crate::store::{AuditRow, Store};

/// The peer address of a connection, plain or TLS (the connect info `guard` reads).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>> for PeerAddr {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, crate::https::TlsListener>> for PeerAddr {
    fn connect_info(stream: axum::serve::IncomingStream<'_, crate::https::TlsListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "outpost_session";

/// Trusted-header sign-on: a proxy in front of the console (oauth2-proxy, nginx with SSO) names
/// the user in a header; only requests from the listed proxy addresses are believed.
#[derive(Debug, Clone)]
pub struct ProxyAuth {
    /// The header, e.g. `X-Remote-User`.
    pub header: header::HeaderName,
    /// Addresses the proxy connects from.
    pub from: Vec<IpAddr>,
    /// Roles per user name; `default` for users not listed.
    pub roles: RoleMap,
}

/// The roles file of trusted-header sign-on.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleMap {
    /// User name → role names.
    #[serde(default)]
    pub users: BTreeMap<String, Vec<String>>,
    /// Roles of users the file does not list [default: none: they are refused].
    #[serde(default)]
    pub default: Vec<String>,
}

impl RoleMap {
    /// Parses a roles file (YAML or JSON), checking every role name.
    pub fn parse(text: &str) -> Result<RoleMap, String> {
        let map: RoleMap = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
        for (user, roles) in map
            .users
            .iter()
            .chain(std::iter::once((&"default".to_string(), &map.default)))
        {
            for r in roles {
                Role::parse(r).map_err(|e| format!("{user}: {e}"))?;
            }
        }
        Ok(map)
    }

    fn roles(&self, user: &str) -> Vec<Role> {
        operators::roles_of(self.users.get(user).unwrap_or(&self.default))
    }
}

/// How the console and API check their callers.
#[derive(Debug, Clone, Default)]
pub struct AccessOptions {
    /// Session lengths.
    pub sessions: SessionPolicy,
    /// Sign-in lock-out.
    pub lockout: LockoutPolicy,
    /// Host names the console answers to besides IP addresses and `localhost` (its public name).
    pub hosts: Vec<String>,
    /// The console is served over HTTPS: cookies are `Secure`, origins are `https://`.
    pub https: bool,
    /// Trusted-header sign-on, if configured.
    pub proxy: Option<ProxyAuth>,
}

/// The access state: sessions, lock-out counts, options.
pub struct Access {
    store: Arc<Store>,
    sessions: Mutex<Sessions>,
    lockout: Mutex<Lockout>,
    opts: AccessOptions,
    /// Keys the CSRF tokens of proxy-signed-on users (they have no session to hold one).
    csrf_key: ring::hmac::Key,
}

/// The caller of a request, put in its extensions by `guard` for handlers and pages.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Who.
    pub principal: Principal,
    /// The token forms must carry.
    pub csrf: String,
}

/// What a handler did, for the audit trail: set as a response extension.
#[derive(Debug, Clone)]
pub struct Audited {
    /// The kind of action (`start`, `approve`, `deploy`, …).
    pub kind: String,
    /// The device it was for.
    pub device: String,
    /// What it was about (run, deployment, command id).
    pub target: String,
    /// What came of it: `Ok(detail)` or `Err(why it was refused or failed)`.
    pub outcome: Result<String, String>,
}

impl Audited {
    /// Adds this record to a response.
    pub fn on(self, mut r: Response) -> Response {
        r.extensions_mut().insert(self);
        r
    }
}

/// A refusal for lack of a role: 403 with a message saying what is needed.
#[derive(Debug)]
pub struct Forbidden(pub String);

impl IntoResponse for Forbidden {
    fn into_response(self) -> Response {
        let mut r = (StatusCode::FORBIDDEN, axum::Json(json!({"error": {"message": self.0}}))).into_response();
        r.extensions_mut().insert(Refusal(self.0));
        r
    }
}

impl Forbidden {
    /// The 403 as a console page.
    pub fn into_page(self) -> Response {
        let mut r = (
            StatusCode::FORBIDDEN,
            crate::console::error_page(StatusCode::FORBIDDEN, &self.0),
        )
            .into_response();
        r.extensions_mut().insert(Refusal(self.0));
        r
    }
}

/// Why a request was refused, for the audit trail (a response extension).
#[derive(Debug, Clone)]
struct Refusal(String);

impl Caller {
    /// Ok when the caller may do what `role` may; else the 403 to answer.
    pub fn need(&self, role: Role, what: &str) -> Result<(), Forbidden> {
        if self.principal.may(role) {
            return Ok(());
        }
        let has: Vec<&str> = self.principal.roles.iter().map(|r| r.name()).collect();
        Err(Forbidden(format!(
            "{} ({}) may not {what}: that needs the {role} role",
            self.principal.name,
            if has.is_empty() {
                "no roles".to_string()
            } else {
                has.join(", ")
            }
        )))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // `guard` runs before every handler; a route outside it is a bug, refused, not served.
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or(StatusCode::UNAUTHORIZED)
    }
}

/// Paths anyone may GET: health and metrics (for load balancers and Prometheus, documented as
/// open), the API's description, the sign-in page and the console's static files.
fn is_public(method: &Method, path: &str) -> bool {
    matches!(
        path,
        "/v1/health" | "/v1/openapi.json" | "/metrics" | "/console/app.css" | "/console/app.js"
    ) && method == Method::GET
        || path == "/login"
}

fn is_api(path: &str) -> bool {
    path.starts_with("/v1/")
}

fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// True when the Host header names this console: an IP address (not a name an attacker's DNS
/// can point here), `localhost`, or one of the configured names; any port.
pub fn host_allowed(host: &str, names: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => return v6.split(']').next().is_some_and(|a| a.parse::<IpAddr>().is_ok()),
        None => host
            .rsplit_once(':')
            .filter(|(_, p)| p.parse::<u16>().is_ok())
            .map_or(host, |(h, _)| h),
    };
    name.parse::<IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// True when a state-changing browser request comes from this console's own pages: its Origin
/// (or, without one, its Referer) is `scheme://host`.
pub fn same_origin(headers: &HeaderMap, scheme: &str, host: &str) -> bool {
    let own = format!("{scheme}://{host}");
    let get = |h| headers.get(h).and_then(|v| v.to_str().ok());
    match (get(header::ORIGIN), get(header::REFERER)) {
        (Some(origin), _) => origin == own,
        (None, Some(referer)) => referer == own || referer.starts_with(&format!("{own}/")),
        (None, None) => false,
    }
}

/// The value of cookie `name`.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// What a state-changing request is, from its path, for the audit trail of a refusal that never
/// reached its handler: (kind, device, target).
pub fn describe(method: &Method, path: &str) -> (String, String, String) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let owned = |s: &str| s.to_string();
    match parts.as_slice() {
        ["login"] => (owned("sign_in"), String::new(), String::new()),
        ["logout"] => (owned("sign_out"), String::new(), String::new()),
        ["account", "password"] => (owned("password"), String::new(), String::new()),
        ["devices", d, "start"] => (owned("start"), owned(d), String::new()),
        ["devices", d, "desired"] | ["v1", "devices", d, "desired"] => (owned("desired"), owned(d), String::new()),
        ["devices", d, "runs", r, action] => (owned(action), owned(d), owned(r)),
        ["v1", "devices", d, "commands"] => (owned("command"), owned(d), String::new()),
        ["deployments"] | ["v1", "deployments"] => (owned("deploy"), String::new(), String::new()),
        ["deployments", id, order] | ["v1", "deployments", id, order] => {
            (format!("rollout.{order}"), String::new(), owned(id))
        }
        ["v1", "devices", d] if method == Method::DELETE => (owned("remove_device"), owned(d), String::new()),
        _ => (
            format!("{} {path}", method.as_str().to_lowercase()),
            String::new(),
            String::new(),
        ),
    }
}

/// A short request-refused answer: JSON for the API, a page (or the sign-in page) for the
/// console.
fn refuse(api: bool, code: StatusCode, message: &str, path_and_query: &str) -> Response {
    let mut r = if code == StatusCode::UNAUTHORIZED && !api {
        let next = serde_urlencoded::to_string([("next", path_and_query)]).unwrap_or_default();
        Redirect::to(&format!("/login?{next}")).into_response()
    } else if api {
        (code, axum::Json(json!({"error": {"message": message}}))).into_response()
    } else {
        (code, crate::console::error_page(code, message)).into_response()
    };
    r.extensions_mut().insert(Refusal(message.to_string()));
    r
}

impl Access {
    /// Access state over `store` with `opts`.
    pub fn new(store: Arc<Store>, opts: AccessOptions) -> Result<Arc<Access>, operators::OperatorError> {
        let key = operators::random_bytes::<32>()?;
        Ok(Arc::new(Access {
            store,
            sessions: Mutex::new(Sessions::new(opts.sessions)),
            lockout: Mutex::new(Lockout::new(opts.lockout)),
            csrf_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
            opts,
        }))
    }

    /// The store (for the sign-in handlers).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// True when served over HTTPS.
    pub fn https(&self) -> bool {
        self.opts.https
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lockout(&self) -> std::sync::MutexGuard<'_, Lockout> {
        self.lockout.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends to the audit trail; a failure is logged, never hidden from the caller's result.
    pub fn audit(&self, row: AuditRow) {
        if let Err(e) = self.store.append_audit(&row) {
            tracing::error!(error = %e, kind = %row.kind, who = %row.who, "cannot write the audit trail");
        }
    }

    /// Signs a user in from `addr`: the session cookie, and whether the password must change;
    /// or why not. Runs argon2: call it off the async threads.
    pub fn sign_in(&self, user: &str, password: &str, addr: &str) -> Result<(String, bool), String> {
        let now = now_ms();
        if let Some(secs) = self.lockout().locked(user, addr, now) {
            return Err(format!(
                "too many failed sign-ins for this user or from this address: try again in {secs} s"
            ));
        }
        let row = self.store.user(user).map_err(|e| e.to_string())?;
        match operators::check_password(row.as_ref(), user, password) {
            Ok(principal) => {
                self.lockout().succeeded(user);
                let must_change = row.is_some_and(|r| r.must_change);
                let cookie = self
                    .sessions()
                    .create(principal, must_change, now)
                    .map_err(|e| e.to_string())?;
                Ok((cookie, must_change))
            }
            Err(e) => {
                if self.lockout().failed(user, addr, now) {
                    tracing::warn!(user, addr, "sign-in locked out after repeated failures");
                }
                Err(e)
            }
        }
    }

    /// Ends a session.
    pub fn sign_out(&self, cookie: &str) {
        self.sessions().remove(cookie);
    }

    /// Ends every session of `user`.
    pub fn end_sessions_of(&self, user: &str) {
        self.sessions().remove_user(user);
    }

    /// Changes a signed-in user's password (checking the current one); their other sessions
    /// end. Runs argon2.
    pub fn change_password(&self, cookie: &str, user: &str, current: &str, new: &str) -> Result<(), String> {
        if new.chars().count() < operators::MIN_PASSWORD_CHARS {
            return Err(format!(
                "a password has at least {} characters",
                operators::MIN_PASSWORD_CHARS
            ));
        }
        let mut row = self
            .store
            .user(user)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("there is no user '{user}'"))?;
        if !operators::verify_password(current, &row.password_hash) {
            return Err("the current password is wrong".into());
        }
        if current == new {
            return Err("choose a password different from the current one".into());
        }
        row.password_hash = operators::hash_password(new).map_err(|e| e.to_string())?;
        row.must_change = false;
        self.store.put_user(user, &row).map_err(|e| e.to_string())?;
        // This browser stays signed in; the user's other sessions end.
        let mut sessions = self.sessions();
        sessions.remove_user_except(user, cookie);
        sessions.password_changed(cookie);
        Ok(())
    }

    /// The Set-Cookie value of a new session (or, with `None`, of signing out).
    pub fn session_cookie(&self, value: Option<&str>) -> String {
        let secure = if self.opts.https { "; Secure" } else { "" };
        match value {
            Some(v) => format!(
                "{SESSION_COOKIE}={v}; Path=/; HttpOnly; SameSite=Strict{secure}; Max-Age={}",
                self.opts.sessions.max_ms / 1000
            ),
            None => format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict{secure}; Max-Age=0"),
        }
    }

    fn proxy_principal(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> Option<Result<Principal, String>> {
        let proxy = self.opts.proxy.as_ref()?;
        let name = headers.get(&proxy.header)?;
        if !peer.is_some_and(|p| proxy.from.contains(&p)) {
            return Some(Err(format!(
                "the {} header is only believed from the sign-on proxy ({}), not from {}",
                proxy.header,
                proxy.from.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(", "),
                peer.map_or("an unknown address".into(), |p| p.to_string())
            )));
        }
        let name = match name.to_str().map(str::trim) {
            Ok(n) if operators::check_user_name(n).is_ok() => n.to_string(),
            _ => return Some(Err(format!("the {} header does not hold a user name", proxy.header))),
        };
        let roles = proxy.roles.roles(&name);
        if roles.is_empty() {
            return Some(Err(format!("{name} has no roles in the sign-on roles file")));
        }
        Some(Ok(Principal {
            name,
            roles,
            via: Via::Proxy,
        }))
    }

    fn proxy_csrf(&self, name: &str) -> String {
        operators::hex(ring::hmac::sign(&self.csrf_key, format!("proxy:{name}").as_bytes()).as_ref())
    }
}

/// Who the request is from, or the refusal to answer.
enum Identified {
    Caller(Caller, bool),
    Anonymous,
    Refused(StatusCode, String, String),
}

fn identify(access: &Access, headers: &HeaderMap, peer: Option<IpAddr>) -> Identified {
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        let text = auth.to_str().unwrap_or("");
        let Some(token) = text.strip_prefix("Bearer ") else {
            return Identified::Refused(
                StatusCode::UNAUTHORIZED,
                "anonymous".into(),
                "the Authorization header is not `Bearer TOKEN`".into(),
            );
        };
        return match operators::token_principal(&access.store, token.trim(), now_ms()) {
            Ok(p) => Identified::Caller(
                Caller {
                    principal: p,
                    csrf: String::new(),
                },
                false,
            ),
            Err(e @ operators::TokenRefused::Unavailable(_)) => {
                Identified::Refused(StatusCode::SERVICE_UNAVAILABLE, "anonymous".into(), e.to_string())
            }
            Err(e) => Identified::Refused(StatusCode::UNAUTHORIZED, "anonymous".into(), e.to_string()),
        };
    }
    match access.proxy_principal(headers, peer) {
        Some(Ok(p)) => {
            let csrf = access.proxy_csrf(&p.name);
            return Identified::Caller(Caller { principal: p, csrf }, false);
        }
        Some(Err(e)) => return Identified::Refused(StatusCode::UNAUTHORIZED, "anonymous".into(), e),
        None => {}
    }
    if let Some(c) = cookie(headers, SESSION_COOKIE)
        && let Some(s) = access.sessions().touch(c, now_ms())
    {
        // A disabled user's sessions end at once, even ones started before.
        if access
            .store
            .user(&s.principal.name)
            .ok()
            .flatten()
            .is_none_or(|u| u.disabled)
        {
            access.sign_out(c);
            return Identified::Anonymous;
        }
        return Identified::Caller(
            Caller {
                principal: s.principal,
                csrf: s.csrf,
            },
            s.must_change,
        );
    }
    Identified::Anonymous
}

/// Most bytes of a form the CSRF check reads (the API's own limit).
const MAX_FORM_BYTES: usize = 2 * 1024 * 1024;

/// The middleware in front of every route.
pub async fn guard(State(access): State<Arc<Access>>, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<ConnectInfo<PeerAddr>>().map(|c| c.0.0.ip());
    let from = peer.map_or("unknown".to_string(), |p| p.to_string());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let path_and_query = req.uri().path_and_query().map_or(path.clone(), |p| p.to_string());
    let api = is_api(&path);
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mutating = changes_state(&method);
    let audit = |who: &str, r: &Response| {
        if !mutating {
            return;
        }
        let (kind, device, target) = describe(&method, &path);
        let done = r.extensions().get::<Audited>().cloned();
        let refusal = r.extensions().get::<Refusal>().map(|r| r.0.clone());
        let (kind, device, target, result, message) = match (done, refusal) {
            (Some(a), _) => {
                let (result, message) = match a.outcome {
                    Ok(m) => ("ok", m),
                    Err(m) => ("refused", m),
                };
                (a.kind, a.device, a.target, result, message)
            }
            (None, Some(why)) => (kind, device, target, "refused", why),
            (None, None) if r.status().is_success() || r.status().is_redirection() => {
                (kind, device, target, "ok", String::new())
            }
            (None, None) => (kind, device, target, "failed", format!("HTTP {}", r.status().as_u16())),
        };
        if kind == "sign_in" && r.extensions().get::<Refusal>().is_none() {
            // The sign-in handler records sign-ins itself, with the name tried.
            return;
        }
        if who == "anonymous" && kind.contains(' ') {
            // Anyone can post to paths that are no action at all; recording each would let a
            // stranger fill the disk with the audit trail.
            return;
        }
        access.audit(AuditRow {
            at_ms: now_ms(),
            who: who.to_string(),
            from: from.clone(),
            kind,
            device,
            target,
            result: result.to_string(),
            message,
        });
    };
    if !host_allowed(&host, &access.opts.hosts) {
        let r = refuse(
            api,
            StatusCode::MISDIRECTED_REQUEST,
            &format!("this console does not answer to the host name '{host}' (give it with --console-host)"),
            &path_and_query,
        );
        audit("anonymous", &r);
        return r;
    }
    if is_public(&method, &path) && !mutating {
        // Health and metrics must answer even while the store (and so the token check) fails.
        return next.run(req).await;
    }
    // Behind the sign-on proxy the browser sees the proxy's scheme (TLS ends there).
    let forwarded = access
        .opts
        .proxy
        .as_ref()
        .filter(|p| peer.is_some_and(|a| p.from.contains(&a)))
        .and_then(|_| req.headers().get("x-forwarded-proto"))
        .and_then(|v| v.to_str().ok())
        .filter(|v| matches!(*v, "http" | "https"))
        .map(str::to_string);
    let scheme = forwarded.unwrap_or_else(|| if access.opts.https { "https" } else { "http" }.to_string());
    let scheme = scheme.as_str();
    let (caller, must_change) = match identify(&access, req.headers(), peer) {
        Identified::Caller(c, m) => (Some(c), m),
        Identified::Anonymous => (None, false),
        Identified::Refused(code, who, why) => {
            let r = refuse(api, code, &why, &path_and_query);
            audit(&who, &r);
            return r;
        }
    };
    let who = caller
        .as_ref()
        .map_or("anonymous".to_string(), |c| c.principal.name.clone());
    let browser = caller.as_ref().is_none_or(|c| c.principal.is_browser());
    if mutating && browser && !same_origin(req.headers(), scheme, &host) {
        let r = refuse(
            api,
            StatusCode::FORBIDDEN,
            &format!("refused: the request does not come from this console's own pages ({scheme}://{host})"),
            &path_and_query,
        );
        audit(&who, &r);
        return r;
    }
    if mutating && api {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().starts_with("application/json"));
        if !json {
            let r = refuse(
                true,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the JSON API takes only `Content-Type: application/json` bodies",
                &path_and_query,
            );
            audit(&who, &r);
            return r;
        }
    }
    if is_public(&method, &path) {
        let r = next.run(req).await;
        audit(&who, &r);
        return r;
    }
    let Some(caller) = caller else {
        let r = refuse(
            api,
            StatusCode::UNAUTHORIZED,
            "sign in first (or give an API token: Authorization: Bearer TOKEN)",
            &path_and_query,
        );
        audit(&who, &r);
        return r;
    };
    let password_paths = matches!(path.as_str(), "/account/password" | "/logout");
    if must_change && !password_paths {
        if !mutating && !api {
            return Redirect::to("/account/password").into_response();
        }
        let r = refuse(
            api,
            StatusCode::FORBIDDEN,
            "choose a new password first (/account/password)",
            &path_and_query,
        );
        audit(&who, &r);
        return r;
    }
    let mut req = req;
    if mutating && !api && caller.principal.is_browser() {
        let (parts, body) = req.into_parts();
        let bytes = match axum::body::to_bytes(body, MAX_FORM_BYTES).await {
            Ok(b) => b,
            Err(e) => {
                let r = refuse(
                    false,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("form: {e}"),
                    &path_and_query,
                );
                audit(&who, &r);
                return r;
            }
        };
        let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes).unwrap_or_default();
        let token = fields.iter().find(|(k, _)| k == "csrf").map(|(_, v)| v.as_str());
        if token.is_none_or(|t| t.is_empty() || t != caller.csrf) {
            let r = refuse(
                false,
                StatusCode::FORBIDDEN,
                "refused: the form's CSRF token is missing or wrong (reload the page and send it again)",
                &path_and_query,
            );
            audit(&who, &r);
            return r;
        }
        req = Request::from_parts(parts, Body::from(bytes));
    }
    req.extensions_mut().insert(caller);
    let r = next.run(req).await;
    audit(&who, &r);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn hosts_are_ip_addresses_localhost_or_configured_names() {
        let names = vec!["console.plant".to_string()];
        for ok in [
            "127.0.0.1:8080",
            "10.1.2.3",
            "[::1]:8080",
            "localhost:8080",
            "console.plant:443",
            "CONSOLE.plant",
        ] {
            assert!(host_allowed(ok, &names), "{ok}");
        }
        for bad in ["attacker.example:8080", "", "127.0.0.1.attacker.example", "[evil]:80"] {
            assert!(!host_allowed(bad, &names), "{bad}");
        }
    }

    #[test]
    fn origins_must_be_the_consoles_own() {
        let mut h = HeaderMap::new();
        assert!(!same_origin(&h, "http", "127.0.0.1:8080"), "neither Origin nor Referer");
        h.insert(
            header::REFERER,
            HeaderValue::from_static("http://127.0.0.1:8080/devices/x"),
        );
        assert!(same_origin(&h, "http", "127.0.0.1:8080"));
        assert!(!same_origin(&h, "https", "127.0.0.1:8080"));
        h.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:9999"));
        assert!(!same_origin(&h, "http", "127.0.0.1:8080"), "the Origin decides");
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(!same_origin(&h, "http", "127.0.0.1:8080"));
        let mut h = HeaderMap::new();
        h.insert(header::REFERER, HeaderValue::from_static("http://127.0.0.1:8080.evil/"));
        assert!(!same_origin(&h, "http", "127.0.0.1:8080"));
    }

    #[test]
    fn actions_are_described_from_their_paths() {
        let d = |m: Method, p: &str| describe(&m, p);
        assert_eq!(
            d(Method::POST, "/devices/gw/runs/r1/approve"),
            ("approve".into(), "gw".into(), "r1".into())
        );
        assert_eq!(d(Method::PUT, "/v1/devices/gw/desired").0, "desired");
        assert_eq!(d(Method::POST, "/v1/deployments").0, "deploy");
        assert_eq!(d(Method::POST, "/login").0, "sign_in");
        assert_eq!(d(Method::POST, "/somewhere").0, "post /somewhere");
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; outpost_session=abc; b=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }

    #[test]
    fn role_files_name_known_roles() {
        let m = RoleMap::parse("users:\n  alice: [approver, operator]\ndefault: [viewer]\n").unwrap();
        assert_eq!(m.roles("alice"), [Role::Approver, Role::Operator]);
        assert_eq!(m.roles("zed"), [Role::Viewer]);
        assert!(
            RoleMap::parse("users:\n  bob: [root]\n")
                .unwrap_err()
                .contains("unknown role")
        );
        assert!(RoleMap::parse("default: []\n").unwrap().roles("x").is_empty());
    }
}
