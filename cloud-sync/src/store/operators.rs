//! Operators' rows: console users, API tokens and the audit trail. The rules about them (roles,
//! password hashing, who may do what) live in `crate::operators`; this is only their storage.

use serde::{Deserialize, Serialize};

use super::tables::{Dir, Owned, Part::Num, Part::Str, T};
use super::{Store, StoreError, dec, enc};

/// A console user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRow {
    /// Role names (`crate::operators::Role`).
    pub roles: Vec<String>,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Disabled users cannot sign in; their sessions end.
    pub disabled: bool,
    /// The password was set by someone else (first start, `users add`): change it at sign-in.
    pub must_change: bool,
    /// When the user was created.
    pub created_ms: u64,
}

/// An API token (the secret itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRow {
    /// What it is for (shown in lists and the audit trail).
    pub name: String,
    /// Its roles.
    pub roles: Vec<String>,
    /// SHA-256 of the secret part.
    pub secret_sha256: [u8; 32],
    /// When it stops working, if ever.
    pub expires_ms: Option<u64>,
    /// Revoked tokens are refused.
    pub revoked: bool,
    /// When and by whom it was created.
    pub created_ms: u64,
    /// Who created it.
    pub created_by: String,
}

/// One entry of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRow {
    /// When.
    pub at_ms: u64,
    /// Who: a user name, `token:NAME`, `local:UNIX_USER`, or what a refused caller claimed.
    pub who: String,
    /// From where (the peer address, or `local`).
    pub from: String,
    /// What kind of action (`sign_in`, `start`, `approve`, `deploy`, `users.add`, …).
    pub kind: String,
    /// The device it was for, if any.
    pub device: String,
    /// What it was about (run, deployment, user, path).
    pub target: String,
    /// `ok`, `refused` or `failed`.
    pub result: String,
    /// Details: what was asked, why it was refused.
    pub message: String,
}

/// What the audit page and export select.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this actor.
    pub who: Option<String>,
    /// Only this device.
    pub device: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
}

impl AuditFilter {
    fn matches(&self, r: &AuditRow) -> bool {
        let is = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w.is_empty() || w == have);
        is(&self.who, &r.who) && is(&self.device, &r.device) && is(&self.kind, &r.kind)
    }
}

impl Store {
    /// A user, if there is one by that name.
    pub fn user(&self, name: &str) -> Result<Option<UserRow>, StoreError> {
        self.get_one(T::Users, name, "user")
    }

    /// Every user, by name.
    pub fn users(&self) -> Result<Vec<(String, UserRow)>, StoreError> {
        self.all_rows(T::Users, "user")
    }

    /// Creates or replaces a user.
    pub fn put_user(&self, name: &str, row: &UserRow) -> Result<(), StoreError> {
        self.put_one(T::Users, name, row)
    }

    /// Creates a user unless one by that name exists (then `Invalid`), in one transaction.
    pub fn add_user(&self, name: &str, row: &UserRow) -> Result<(), StoreError> {
        let bytes = enc(row);
        self.write(|tx| {
            if tx.get(T::Users, &[Str(name)])?.is_some() {
                return Err(StoreError::Invalid(format!("user '{name}' exists already")));
            }
            tx.put(T::Users, &[Str(name)], &bytes)
        })
    }

    /// A token by id.
    pub fn token(&self, id: &str) -> Result<Option<TokenRow>, StoreError> {
        self.get_one(T::ApiTokens, id, "token")
    }

    /// Every token, by id.
    pub fn tokens(&self) -> Result<Vec<(String, TokenRow)>, StoreError> {
        self.all_rows(T::ApiTokens, "token")
    }

    /// Creates or replaces a token row.
    pub fn put_token(&self, id: &str, row: &TokenRow) -> Result<(), StoreError> {
        self.put_one(T::ApiTokens, id, row)
    }

    /// Appends an entry to the audit trail; returns its number.
    pub fn append_audit(&self, row: &AuditRow) -> Result<u64, StoreError> {
        let bytes = enc(row);
        self.write(|tx| {
            let mut last = 0;
            tx.scan(T::Audit, &[], None, Dir::Down, &mut |k, _| {
                last = k.first().map_or(0, Owned::num);
                Ok(false)
            })?;
            tx.put(T::Audit, &[Num(last + 1)], &bytes)?;
            Ok(last + 1)
        })
    }

    /// The newest `limit` audit entries that match, newest first.
    pub fn audit(&self, filter: &AuditFilter, limit: usize) -> Result<Vec<(u64, AuditRow)>, StoreError> {
        self.read(|tx| {
            let mut out = Vec::new();
            tx.scan(T::Audit, &[], None, Dir::Down, &mut |k, v| {
                if out.len() >= limit {
                    return Ok(false);
                }
                let r: AuditRow = dec("audit entry", v)?;
                if filter.matches(&r) {
                    out.push((k.first().map_or(0, Owned::num), r));
                }
                Ok(true)
            })?;
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(who: &str, kind: &str) -> AuditRow {
        AuditRow {
            at_ms: 1,
            who: who.into(),
            from: "127.0.0.1".into(),
            kind: kind.into(),
            device: "gw".into(),
            target: String::new(),
            result: "ok".into(),
            message: String::new(),
        }
    }

    #[test]
    fn the_audit_trail_appends_in_order_and_filters() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        assert_eq!(store.append_audit(&entry("alice", "start")).unwrap(), 1);
        assert_eq!(store.append_audit(&entry("bob", "approve")).unwrap(), 2);
        assert_eq!(store.append_audit(&entry("alice", "approve")).unwrap(), 3);
        let all = store.audit(&AuditFilter::default(), 10).unwrap();
        assert_eq!(all.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [3, 2, 1]);
        let alice = AuditFilter {
            who: Some("alice".into()),
            ..Default::default()
        };
        assert_eq!(store.audit(&alice, 10).unwrap().len(), 2);
        let approvals = AuditFilter {
            kind: Some("approve".into()),
            ..Default::default()
        };
        assert_eq!(store.audit(&approvals, 1).unwrap()[0].0, 3);
    }

    #[test]
    fn a_user_is_added_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let row = UserRow {
            roles: vec!["viewer".into()],
            password_hash: "x".into(),
            disabled: false,
            must_change: false,
            created_ms: 0,
        };
        store.add_user("ada", &row).unwrap();
        assert!(matches!(store.add_user("ada", &row), Err(StoreError::Invalid(_))));
        assert_eq!(store.users().unwrap().len(), 1);
    }
}
