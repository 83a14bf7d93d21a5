//! Console sessions, in memory: a restart signs everyone out (the cookie holds 32 random bytes,
//! the map holds their SHA-256). Idle and absolute expiry; the caller gives the time.

use std::collections::HashMap;

use super::{OperatorError, Principal, hex, random_bytes, sha256};

/// How long sessions last.
#[derive(Debug, Clone, Copy)]
pub struct SessionPolicy {
    /// A session unused this long ends.
    pub idle_ms: u64,
    /// A session ends this long after sign-in, used or not.
    pub max_ms: u64,
}

impl Default for SessionPolicy {
    fn default() -> Self {
        SessionPolicy {
            idle_ms: 30 * 60_000,
            max_ms: 12 * 3_600_000,
        }
    }
}

/// A signed-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// Who signed in.
    pub principal: Principal,
    /// The token its forms carry (CSRF).
    pub csrf: String,
    /// The password must be changed before anything else.
    pub must_change: bool,
    created_ms: u64,
    last_ms: u64,
}

/// Every live session.
#[derive(Debug, Default)]
pub struct Sessions {
    policy: SessionPolicy,
    by_hash: HashMap<[u8; 32], Session>,
}

impl Sessions {
    /// Sessions that last as `policy` says.
    pub fn new(policy: SessionPolicy) -> Sessions {
        Sessions {
            policy,
            by_hash: HashMap::new(),
        }
    }

    /// Starts a session; returns the cookie value.
    pub fn create(&mut self, principal: Principal, must_change: bool, now_ms: u64) -> Result<String, OperatorError> {
        self.by_hash.retain(|_, s| {
            now_ms.saturating_sub(s.last_ms) < self.policy.idle_ms
                && now_ms.saturating_sub(s.created_ms) < self.policy.max_ms
        });
        let cookie = hex(&random_bytes::<32>()?);
        let session = Session {
            principal,
            csrf: hex(&random_bytes::<16>()?),
            must_change,
            created_ms: now_ms,
            last_ms: now_ms,
        };
        self.by_hash.insert(sha256(cookie.as_bytes()), session);
        Ok(cookie)
    }

    /// The live session of a cookie, marked used; an expired one is removed.
    pub fn touch(&mut self, cookie: &str, now_ms: u64) -> Option<Session> {
        let key = sha256(cookie.as_bytes());
        let s = self.by_hash.get_mut(&key)?;
        let idle = now_ms.saturating_sub(s.last_ms) >= self.policy.idle_ms;
        let old = now_ms.saturating_sub(s.created_ms) >= self.policy.max_ms;
        if idle || old {
            self.by_hash.remove(&key);
            return None;
        }
        s.last_ms = now_ms;
        Some(s.clone())
    }

    /// Ends a cookie's session.
    pub fn remove(&mut self, cookie: &str) {
        self.by_hash.remove(&sha256(cookie.as_bytes()));
    }

    /// Ends every session of a user (disabled, password changed elsewhere).
    pub fn remove_user(&mut self, name: &str) {
        self.by_hash.retain(|_, s| s.principal.name != name);
    }

    /// Ends every session of a user but the one of `keep` (after a password change there).
    pub fn remove_user_except(&mut self, name: &str, keep: &str) {
        let keep = sha256(keep.as_bytes());
        self.by_hash.retain(|k, s| *k == keep || s.principal.name != name);
    }

    /// Marks a cookie's password as changed.
    pub fn password_changed(&mut self, cookie: &str) {
        if let Some(s) = self.by_hash.get_mut(&sha256(cookie.as_bytes())) {
            s.must_change = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operators::{Role, Via};

    fn ada() -> Principal {
        Principal {
            name: "ada".into(),
            roles: vec![Role::Viewer],
            via: Via::Session,
        }
    }

    #[test]
    fn sessions_end_when_idle_or_old_and_on_sign_out() {
        let mut s = Sessions::new(SessionPolicy {
            idle_ms: 100,
            max_ms: 250,
        });
        let c = s.create(ada(), false, 0).unwrap();
        assert_eq!(s.touch(&c, 90).unwrap().principal.name, "ada");
        assert!(s.touch(&c, 180).is_some(), "used at 90, so not idle at 180");
        assert!(s.touch(&c, 250).is_none(), "older than the absolute limit");
        let c = s.create(ada(), false, 1000).unwrap();
        assert!(s.touch(&c, 1100).is_none(), "idle");
        let c = s.create(ada(), false, 2000).unwrap();
        assert!(s.touch("not-a-cookie", 2001).is_none());
        s.remove(&c);
        assert!(s.touch(&c, 2002).is_none());
        let c = s.create(ada(), false, 3000).unwrap();
        s.remove_user("ada");
        assert!(s.touch(&c, 3001).is_none());
    }
}
