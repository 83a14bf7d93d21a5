//! Who may do what on the console and the API: roles, passwords (argon2id), API tokens,
//! sessions, sign-in lock-out, and the admin commands (`users …`, `tokens …`) shared by the CLI
//! and the running service. The HTTP side (cookies, CSRF, Origin and Host checks) is
//! `crate::access`; the rows are stored by `crate::store`.

pub mod admin;
mod lockout;
mod sessions;

use std::fmt;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
pub use lockout::{Lockout, LockoutPolicy};
pub use sessions::{Session, SessionPolicy, Sessions};

use crate::store::{Store, StoreError, TokenRow, UserRow};

/// A role: what its holders may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Read everything.
    Viewer,
    /// Start, cancel and signal runs.
    Operator,
    /// Decide approval steps.
    Approver,
    /// Deployments and desired state.
    Deployer,
    /// Users, tokens, devices, the PKI; and everything the other roles may do.
    Admin,
}

/// Every role, in order.
pub const ROLES: [Role; 5] = [
    Role::Viewer,
    Role::Operator,
    Role::Approver,
    Role::Deployer,
    Role::Admin,
];

impl Role {
    /// Its name, as in `--role NAME` and `approvers: [role:NAME]`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Approver => "approver",
            Role::Deployer => "deployer",
            Role::Admin => "admin",
        }
    }

    /// The role called `name`.
    pub fn parse(name: &str) -> Result<Role, String> {
        ROLES.into_iter().find(|r| r.name() == name).ok_or_else(|| {
            let names: Vec<&str> = ROLES.iter().map(|r| r.name()).collect();
            format!("unknown role '{name}' (roles: {})", names.join(", "))
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses role names; at least one.
pub fn parse_roles(names: &[String]) -> Result<Vec<Role>, String> {
    if names.is_empty() {
        return Err("give at least one --role".into());
    }
    let mut roles = names
        .iter()
        .map(|n| Role::parse(n.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    roles.sort();
    roles.dedup();
    Ok(roles)
}

/// Role names as stored; unknown names (from a newer version) are skipped, never widened.
pub fn roles_of(names: &[String]) -> Vec<Role> {
    names.iter().filter_map(|n| Role::parse(n).ok()).collect()
}

/// Who is asking: a signed-in user, a token, a user named by the plant's sign-on proxy, or a
/// local administrator on the service's own machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The name the audit trail and approvals record (`alice`, `token:ci`, `local:root`).
    pub name: String,
    /// Its roles.
    pub roles: Vec<Role>,
    /// How it proved who it is.
    pub via: Via,
}

/// How a principal proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A session cookie (a browser: forms need the CSRF token).
    Session,
    /// A bearer token.
    Token,
    /// The trusted sign-on proxy's header (a browser: forms need the CSRF token).
    Proxy,
    /// The admin socket (`outpost-cloud users …` while the service runs).
    Local,
}

impl Principal {
    /// True when it may do what `role` may: it has that role, or it is an admin. Every
    /// principal may read.
    pub fn may(&self, role: Role) -> bool {
        role == Role::Viewer || self.roles.contains(&role) || self.roles.contains(&Role::Admin)
    }

    /// True when its requests come from a browser that sends cookies on its own.
    pub fn is_browser(&self) -> bool {
        matches!(self.via, Via::Session | Via::Proxy)
    }
}

/// Who may decide an approval step, from its `approvers:` list: user names and `role:NAME`.
/// An empty list lets anyone with the approver role decide.
pub fn may_approve(who: &Principal, approvers: &[String]) -> Result<(), String> {
    if !who.may(Role::Approver) {
        return Err(format!("{} does not have the approver role", who.name));
    }
    if approvers.is_empty() {
        return Ok(());
    }
    let listed = approvers.iter().any(|a| match a.strip_prefix("role:") {
        Some(role) => Role::parse(role).is_ok_and(|r| who.roles.contains(&r)),
        None => a == &who.name,
    });
    if listed {
        Ok(())
    } else {
        Err(format!(
            "{} may not decide this step: it may be decided by {}",
            who.name,
            approvers.join(", ")
        ))
    }
}

/// Why an operator action failed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Bad input (unknown role, empty name, …).
    #[error("{0}")]
    Invalid(String),
    /// Randomness or hashing failed.
    #[error("{0}")]
    Crypto(String),
}

/// `n` random bytes from the OS.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], OperatorError> {
    let mut out = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut out)
        .map_err(|_| OperatorError::Crypto("the OS random source failed".into()))?;
    Ok(out)
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A password for a new account: 20 characters from an alphabet without look-alikes.
pub fn new_password() -> Result<String, OperatorError> {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzACDEFGHJKLMNPQRTUVWXY3479";
    let bytes = random_bytes::<20>()?;
    Ok(bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect())
}

/// Shortest password `users add --password-stdin` and the password form take.
pub const MIN_PASSWORD_CHARS: usize = 12;

/// Hashes a password with argon2id (the crate's defaults: 19 MiB, 2 passes).
pub fn hash_password(password: &str) -> Result<String, OperatorError> {
    let salt = SaltString::encode_b64(&random_bytes::<16>()?).map_err(|e| OperatorError::Crypto(e.to_string()))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| OperatorError::Crypto(format!("hashing the password: {e}")))
}

/// True when `password` matches the stored hash (a damaged hash matches nothing).
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// An argon2id hash of nothing anyone types: sign-in with an unknown user name verifies against
/// it, so it takes as long as with a known one.
pub fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash_password("\u{0}decoy\u{0}").unwrap_or_default())
}

/// Prefix of every API token (so secret scanners and people recognise one).
pub const TOKEN_PREFIX: &str = "opt_";

/// A new token's secret text and its stored row's key: `opt_<id>_<secret>`.
pub struct NewToken {
    /// Its id (the store key; shown in lists).
    pub id: String,
    /// The whole token, shown once.
    pub text: String,
    /// SHA-256 of its secret part.
    pub secret_sha256: [u8; 32],
}

/// Makes a token: 8 random bytes of id, 32 of secret.
pub fn new_token() -> Result<NewToken, OperatorError> {
    let id = hex(&random_bytes::<8>()?);
    let secret = hex(&random_bytes::<32>()?);
    Ok(NewToken {
        text: format!("{TOKEN_PREFIX}{id}_{secret}"),
        secret_sha256: sha256(secret.as_bytes()),
        id,
    })
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Splits a presented token into its id and the SHA-256 of its secret.
pub fn parse_token(text: &str) -> Option<(&str, [u8; 32])> {
    let rest = text.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 16 && !secret.is_empty()).then(|| (id, sha256(secret.as_bytes())))
}

/// Why a presented token was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefused {
    /// Not a token, unknown, revoked or expired.
    #[error("{0}")]
    Invalid(String),
    /// The store could not be read: the token may be good.
    #[error("cannot check the token: {0}")]
    Unavailable(String),
}

impl From<&str> for TokenRefused {
    fn from(s: &str) -> Self {
        TokenRefused::Invalid(s.to_string())
    }
}

impl From<String> for TokenRefused {
    fn from(s: String) -> Self {
        TokenRefused::Invalid(s)
    }
}

/// The principal a presented token stands for, or why it is refused.
pub fn token_principal(store: &Store, text: &str, now_ms: u64) -> Result<Principal, TokenRefused> {
    let (id, hash) = parse_token(text).ok_or("the bearer token is not an Outpost API token")?;
    let row: TokenRow = store
        .token(id)
        .map_err(|e| TokenRefused::Unavailable(e.to_string()))?
        .ok_or("the bearer token is not known")?;
    // Compared without an early exit, so timing says nothing about how much matched.
    if row
        .secret_sha256
        .iter()
        .zip(hash)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        != 0
    {
        return Err("the bearer token is not known".into());
    }
    if row.revoked {
        return Err(format!("token '{}' was revoked", row.name).into());
    }
    if row.expires_ms.is_some_and(|e| e <= now_ms) {
        return Err(format!("token '{}' expired", row.name).into());
    }
    Ok(Principal {
        name: format!("token:{}", row.name),
        roles: roles_of(&row.roles),
        via: Via::Token,
    })
}

/// A user's principal when `password` is theirs, or why not (the same words for an unknown user
/// and a wrong password, so sign-in does not tell which names exist).
pub fn check_password(user: Option<&UserRow>, name: &str, password: &str) -> Result<Principal, String> {
    const WRONG: &str = "wrong user name or password";
    let Some(row) = user else {
        let _ = verify_password(password, decoy_hash());
        return Err(WRONG.into());
    };
    if !verify_password(password, &row.password_hash) {
        return Err(WRONG.into());
    }
    if row.disabled {
        return Err(format!("user '{name}' is disabled"));
    }
    Ok(Principal {
        name: name.to_string(),
        roles: roles_of(&row.roles),
        via: Via::Session,
    })
}

/// A user name: letters, digits, `.`, `-`, `_`, `@`; 1–64 characters; not a reserved prefix.
pub fn check_user_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@'));
    if name.is_empty() || name.len() > 64 || !ok_chars {
        return Err(format!(
            "user name '{name}' must be 1–64 letters, digits, '.', '-', '_' or '@'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(name: &str, roles: &[Role]) -> Principal {
        Principal {
            name: name.into(),
            roles: roles.to_vec(),
            via: Via::Session,
        }
    }

    #[test]
    fn admins_may_do_everything_and_everyone_may_read() {
        let viewer = who("v", &[Role::Viewer]);
        assert!(viewer.may(Role::Viewer) && !viewer.may(Role::Operator));
        let admin = who("a", &[Role::Admin]);
        assert!(ROLES.iter().all(|r| admin.may(*r)));
        let op = who("o", &[Role::Operator]);
        assert!(op.may(Role::Operator) && !op.may(Role::Deployer) && !op.may(Role::Approver));
    }

    #[test]
    fn approvers_are_listed_by_name_or_role() {
        let alice = who("alice", &[Role::Approver]);
        let bob = who("bob", &[Role::Approver, Role::Operator]);
        let list = vec!["alice".to_string()];
        assert!(may_approve(&alice, &list).is_ok());
        let err = may_approve(&bob, &list).unwrap_err();
        assert!(err.contains("bob may not") && err.contains("alice"), "{err}");
        assert!(may_approve(&bob, &["role:operator".into()]).is_ok());
        assert!(may_approve(&alice, &["role:operator".into()]).is_err());
        assert!(may_approve(&bob, &[]).is_ok());
        let op = who("carol", &[Role::Operator]);
        assert!(
            may_approve(&op, &["carol".into()])
                .unwrap_err()
                .contains("approver role")
        );
    }

    #[test]
    fn passwords_hash_and_verify_and_damaged_hashes_match_nothing() {
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse batterx", &h));
        assert!(!verify_password("", "not a hash"));
        let row = UserRow {
            roles: vec!["viewer".into(), "from-the-future".into()],
            password_hash: h,
            disabled: false,
            must_change: false,
            created_ms: 0,
        };
        assert_eq!(
            check_password(Some(&row), "ada", "correct horse battery")
                .unwrap()
                .roles,
            [Role::Viewer]
        );
        let wrong = check_password(Some(&row), "ada", "nope").unwrap_err();
        assert_eq!(wrong, check_password(None, "nobody", "nope").unwrap_err());
    }

    #[test]
    fn tokens_parse_only_in_their_own_shape() {
        let t = new_token().unwrap();
        let (id, hash) = parse_token(&t.text).unwrap();
        assert_eq!((id, hash), (t.id.as_str(), t.secret_sha256));
        for bad in ["", "opt_", "opt_abc_def", "Bearer x", "opt_0123456789abcdef_"] {
            assert!(parse_token(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn generated_passwords_are_long_enough() {
        let p = new_password().unwrap();
        assert!(p.chars().count() >= MIN_PASSWORD_CHARS);
        assert_ne!(p, new_password().unwrap());
    }
}
