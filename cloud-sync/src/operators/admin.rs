//! The admin commands (`outpost-cloud users …`, `tokens …`): one executor for the CLI on a
//! stopped service's store and for the running service's admin socket, so both behave the same
//! and both land in the audit trail.

use serde::{Deserialize, Serialize};

use super::{MIN_PASSWORD_CHARS, OperatorError, check_user_name, hash_password, new_password, new_token, parse_roles};
use crate::store::{AuditRow, Store, TokenRow, UserRow};

/// One admin command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum AdminRequest {
    /// Add a user; a password is generated (and printed once) unless one is given.
    UsersAdd {
        /// User name.
        name: String,
        /// Role names.
        roles: Vec<String>,
        /// Their password (the user need not change it) [default: generated, to be changed].
        password: Option<String>,
    },
    /// List users.
    UsersList,
    /// Disable a user: no sign-in, their sessions end.
    UsersDisable {
        /// User name.
        name: String,
    },
    /// Enable a disabled user.
    UsersEnable {
        /// User name.
        name: String,
    },
    /// Set a new generated password, to be changed at the next sign-in.
    UsersResetPassword {
        /// User name.
        name: String,
    },
    /// Create an API token, shown once.
    TokensCreate {
        /// What it is for.
        name: String,
        /// Role names.
        roles: Vec<String>,
        /// When it expires (unix ms), if ever.
        expires_ms: Option<u64>,
    },
    /// List tokens.
    TokensList,
    /// Revoke a token by id or name.
    TokensRevoke {
        /// Token id or name.
        token: String,
    },
}

/// What the command did: the text to print, and whose sessions must end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminReply {
    /// What to print.
    pub text: String,
    /// Users whose sessions end now (disabled, password reset).
    pub end_sessions_of: Vec<String>,
}

impl AdminRequest {
    /// Its audit kind.
    pub fn kind(&self) -> &'static str {
        match self {
            AdminRequest::UsersAdd { .. } => "users.add",
            AdminRequest::UsersList => "users.list",
            AdminRequest::UsersDisable { .. } => "users.disable",
            AdminRequest::UsersEnable { .. } => "users.enable",
            AdminRequest::UsersResetPassword { .. } => "users.reset_password",
            AdminRequest::TokensCreate { .. } => "tokens.create",
            AdminRequest::TokensList => "tokens.list",
            AdminRequest::TokensRevoke { .. } => "tokens.revoke",
        }
    }

    fn target(&self) -> String {
        match self {
            AdminRequest::UsersAdd { name, .. }
            | AdminRequest::UsersDisable { name }
            | AdminRequest::UsersEnable { name }
            | AdminRequest::UsersResetPassword { name }
            | AdminRequest::TokensCreate { name, .. } => name.clone(),
            AdminRequest::TokensRevoke { token } => token.clone(),
            AdminRequest::UsersList | AdminRequest::TokensList => String::new(),
        }
    }

    fn changes(&self) -> bool {
        !matches!(self, AdminRequest::UsersList | AdminRequest::TokensList)
    }
}

fn invalid(e: impl Into<String>) -> OperatorError {
    OperatorError::Invalid(e.into())
}

/// Runs `req` on `store` as `actor` (from `from`); changes are recorded in the audit trail,
/// refused ones too.
pub fn execute(
    store: &Store,
    req: &AdminRequest,
    actor: &str,
    from: &str,
    now_ms: u64,
) -> Result<AdminReply, OperatorError> {
    let result = run(store, req, now_ms);
    if req.changes() {
        let (outcome, message) = match &result {
            Ok(_) => ("ok", String::new()),
            Err(e) => ("refused", e.to_string()),
        };
        store.append_audit(&AuditRow {
            at_ms: now_ms,
            who: actor.to_string(),
            from: from.to_string(),
            kind: req.kind().to_string(),
            device: String::new(),
            target: req.target(),
            result: outcome.to_string(),
            message,
        })?;
    }
    result
}

fn run(store: &Store, req: &AdminRequest, now_ms: u64) -> Result<AdminReply, OperatorError> {
    let text = |t: String| {
        Ok(AdminReply {
            text: t,
            end_sessions_of: Vec::new(),
        })
    };
    match req {
        AdminRequest::UsersAdd { name, roles, password } => {
            check_user_name(name).map_err(invalid)?;
            let roles = parse_roles(roles).map_err(invalid)?;
            let (password, generated) = match password {
                Some(p) if p.chars().count() < MIN_PASSWORD_CHARS => {
                    return Err(invalid(format!(
                        "a password has at least {MIN_PASSWORD_CHARS} characters"
                    )));
                }
                Some(p) => (p.clone(), false),
                None => (new_password()?, true),
            };
            let row = UserRow {
                roles: roles.iter().map(|r| r.name().to_string()).collect(),
                password_hash: hash_password(&password)?,
                disabled: false,
                must_change: generated,
                created_ms: now_ms,
            };
            store.add_user(name, &row)?;
            let names = row.roles.join(", ");
            text(if generated {
                format!(
                    "user {name} added (roles: {names})\npassword: {password}\n(shown once; {name} chooses a new one at the first sign-in)"
                )
            } else {
                format!("user {name} added (roles: {names})")
            })
        }
        AdminRequest::UsersList => {
            let mut out = format!("{:<24} {:<34} {}\n", "USER", "ROLES", "STATE");
            for (name, u) in store.users()? {
                let state = if u.disabled {
                    "disabled"
                } else if u.must_change {
                    "password to change"
                } else {
                    "active"
                };
                out.push_str(&format!("{name:<24} {:<34} {state}\n", u.roles.join(",")));
            }
            text(out)
        }
        AdminRequest::UsersDisable { name } | AdminRequest::UsersEnable { name } => {
            let disable = matches!(req, AdminRequest::UsersDisable { .. });
            let mut row = store
                .user(name)?
                .ok_or_else(|| invalid(format!("there is no user '{name}'")))?;
            row.disabled = disable;
            store.put_user(name, &row)?;
            Ok(AdminReply {
                text: format!(
                    "user {name} {}",
                    if disable {
                        "disabled; their sessions ended"
                    } else {
                        "enabled"
                    }
                ),
                end_sessions_of: if disable { vec![name.clone()] } else { Vec::new() },
            })
        }
        AdminRequest::UsersResetPassword { name } => {
            let mut row = store
                .user(name)?
                .ok_or_else(|| invalid(format!("there is no user '{name}'")))?;
            let password = new_password()?;
            row.password_hash = hash_password(&password)?;
            row.must_change = true;
            store.put_user(name, &row)?;
            Ok(AdminReply {
                text: format!("user {name}: new password: {password}\n(shown once; to be changed at the next sign-in)"),
                end_sessions_of: vec![name.clone()],
            })
        }
        AdminRequest::TokensCreate {
            name,
            roles,
            expires_ms,
        } => {
            check_user_name(name).map_err(|_| {
                invalid(format!(
                    "token name '{name}' must be 1–64 letters, digits, '.', '-', '_' or '@'"
                ))
            })?;
            let roles = parse_roles(roles).map_err(invalid)?;
            if store.tokens()?.iter().any(|(_, t)| &t.name == name && !t.revoked) {
                return Err(invalid(format!(
                    "a token named '{name}' exists; revoke it first or choose another name"
                )));
            }
            let t = new_token()?;
            store.put_token(
                &t.id,
                &TokenRow {
                    name: name.clone(),
                    roles: roles.iter().map(|r| r.name().to_string()).collect(),
                    secret_sha256: t.secret_sha256,
                    expires_ms: *expires_ms,
                    revoked: false,
                    created_ms: now_ms,
                    created_by: String::new(),
                },
            )?;
            let until = expires_ms.map_or("never expires".to_string(), |e| {
                format!("expires {}", outpost_shared::journal::rfc3339(e))
            });
            text(format!(
                "token {name} (id {}, roles: {}, {until}):\n{}\n(shown once: store it now; use it as `Authorization: Bearer TOKEN`)",
                t.id,
                roles.iter().map(|r| r.name()).collect::<Vec<_>>().join(", "),
                t.text
            ))
        }
        AdminRequest::TokensList => {
            let mut out = format!("{:<18} {:<20} {:<30} {}\n", "ID", "NAME", "ROLES", "STATE");
            for (id, t) in store.tokens()? {
                let state = if t.revoked {
                    "revoked".to_string()
                } else if t.expires_ms.is_some_and(|e| e <= now_ms) {
                    "expired".to_string()
                } else {
                    t.expires_ms.map_or("active".into(), |e| {
                        format!("active until {}", outpost_shared::journal::rfc3339(e))
                    })
                };
                out.push_str(&format!("{id:<18} {:<20} {:<30} {state}\n", t.name, t.roles.join(",")));
            }
            text(out)
        }
        AdminRequest::TokensRevoke { token } => {
            let found = store
                .tokens()?
                .into_iter()
                .filter(|(id, t)| (id == token || &t.name == token) && !t.revoked)
                .collect::<Vec<_>>();
            if found.is_empty() {
                return Err(invalid(format!("no active token has the id or name '{token}'")));
            }
            for (id, mut t) in found {
                t.revoked = true;
                store.put_token(&id, &t)?;
            }
            text(format!("token {token} revoked: it is refused from now on"))
        }
    }
}

/// Creates the first admin on a store without users: `admin` with a generated one-time password.
/// Returns the password to print, or `None` when there are users already.
pub fn first_admin(store: &Store, now_ms: u64) -> Result<Option<String>, OperatorError> {
    if !store.users()?.is_empty() {
        return Ok(None);
    }
    let password = new_password()?;
    let added = store.add_user(
        "admin",
        &UserRow {
            roles: vec!["admin".into()],
            password_hash: hash_password(&password)?,
            disabled: false,
            must_change: true,
            created_ms: now_ms,
        },
    );
    match added {
        Ok(()) => {}
        // Replicas starting together on a new store: another one made the first admin (and
        // printed its password); this one has nothing to say.
        Err(crate::store::StoreError::Invalid(_)) if !store.users()?.is_empty() => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    store.append_audit(&AuditRow {
        at_ms: now_ms,
        who: "outpost-cloud".into(),
        from: "local".into(),
        kind: "users.add".into(),
        device: String::new(),
        target: "admin".into(),
        result: "ok".into(),
        message: "first start: the first admin".into(),
    })?;
    Ok(Some(password))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_tokens_are_managed_and_every_change_is_audited() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        assert!(first_admin(&store, 1).unwrap().is_some());
        assert!(first_admin(&store, 2).unwrap().is_none());
        let add = AdminRequest::UsersAdd {
            name: "alice".into(),
            roles: vec!["approver".into()],
            password: None,
        };
        let out = execute(&store, &add, "local:root", "local", 3).unwrap();
        assert!(out.text.contains("password: "), "{}", out.text);
        assert!(execute(&store, &add, "local:root", "local", 4).is_err(), "added twice");
        let bad = AdminRequest::UsersAdd {
            name: "eve".into(),
            roles: vec!["superuser".into()],
            password: None,
        };
        assert!(
            execute(&store, &bad, "local:root", "local", 5)
                .unwrap_err()
                .to_string()
                .contains("unknown role")
        );
        let off = execute(
            &store,
            &AdminRequest::UsersDisable { name: "alice".into() },
            "local:root",
            "local",
            6,
        )
        .unwrap();
        assert_eq!(off.end_sessions_of, ["alice"]);
        assert!(store.user("alice").unwrap().unwrap().disabled);

        let create = AdminRequest::TokensCreate {
            name: "ci".into(),
            roles: vec!["viewer".into()],
            expires_ms: None,
        };
        let out = execute(&store, &create, "local:root", "local", 7).unwrap();
        let token = out
            .text
            .lines()
            .find(|l| l.starts_with(super::super::TOKEN_PREFIX))
            .unwrap()
            .to_string();
        assert!(super::super::token_principal(&store, &token, 8).is_ok());
        execute(
            &store,
            &AdminRequest::TokensRevoke { token: "ci".into() },
            "local:root",
            "local",
            9,
        )
        .unwrap();
        assert!(
            super::super::token_principal(&store, &token, 10)
                .unwrap_err()
                .to_string()
                .contains("revoked")
        );

        let audit = store.audit(&Default::default(), 100).unwrap();
        let kinds: Vec<(&str, &str)> = audit
            .iter()
            .rev()
            .map(|(_, a)| (a.kind.as_str(), a.result.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("users.add", "ok"),
                ("users.add", "ok"),
                ("users.add", "refused"),
                ("users.add", "refused"),
                ("users.disable", "ok"),
                ("tokens.create", "ok"),
                ("tokens.revoke", "ok"),
            ]
        );
    }

    #[test]
    fn an_expired_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let create = AdminRequest::TokensCreate {
            name: "short".into(),
            roles: vec!["viewer".into()],
            expires_ms: Some(100),
        };
        let out = execute(&store, &create, "t", "local", 1).unwrap();
        let token = out.text.lines().find(|l| l.starts_with("opt_")).unwrap().to_string();
        assert!(super::super::token_principal(&store, &token, 99).is_ok());
        assert!(
            super::super::token_principal(&store, &token, 100)
                .unwrap_err()
                .to_string()
                .contains("expired")
        );
    }
}
