//! What a step can do. Each action is a value implementing [`Action`]; the [`Registry`] holds
//! them by name and tells the validator which arguments each takes. `set`, `fail` and `sleep`
//! are decided by the engine itself (no I/O), so they appear here only as signatures.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use outpost_shared::ErrorInfo;
use outpost_shared::definition::{ActionCatalog, Signature};
use serde_json::{Map, Value};

pub mod equipment;
pub mod exec;
#[cfg(feature = "http-action")]
pub mod http;

/// Everything an action invocation gets.
#[derive(Debug, Clone)]
pub struct Call {
    /// Run id.
    pub run_id: String,
    /// Step id.
    pub step: String,
    /// Visit of the step (loops revisit steps), from 1.
    pub visit: u32,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Idempotency key: the same for every attempt and every re-run after a crash.
    pub key: String,
    /// Rendered arguments.
    pub args: Value,
}

/// An action's failure.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionError {
    /// Kind and message, as journaled.
    pub info: ErrorInfo,
    /// False when retrying cannot help (bad arguments, a 4xx answer).
    pub retryable: bool,
}

impl ActionError {
    /// A failure that a retry may fix.
    pub fn retryable(kind: &str, message: impl Into<String>) -> Self {
        ActionError {
            info: ErrorInfo::new(kind, message),
            retryable: true,
        }
    }
    /// A failure that a retry cannot fix.
    pub fn permanent(kind: &str, message: impl Into<String>) -> Self {
        ActionError {
            info: ErrorInfo::new(kind, message),
            retryable: false,
        }
    }
}

/// The future an action returns.
pub type ActionFuture = Pin<Box<dyn Future<Output = Result<Value, ActionError>> + Send>>;

/// Something a step can do.
pub trait Action: Send + Sync + 'static {
    /// Argument names.
    fn signature(&self) -> Signature;
    /// Extra checks of literal (non-template) arguments at validation time.
    fn check(&self, _args: &Map<String, Value>) -> Vec<String> {
        Vec::new()
    }
    /// Runs one attempt. Cancel-safe: dropping the future must stop the work.
    fn execute(&self, call: Call) -> ActionFuture;
}

/// Engine-level actions: no I/O, resolved in `engine::decide`.
const ENGINE_ACTIONS: &[(&str, Signature)] = &[
    (
        "set",
        Signature {
            required: &[],
            optional: &[],
        },
    ),
    (
        "fail",
        Signature {
            required: &[],
            optional: &["error", "message"],
        },
    ),
    (
        "sleep",
        Signature {
            required: &["duration"],
            optional: &[],
        },
    ),
    (
        "wait_signal",
        Signature {
            required: &["signal"],
            optional: &["timeout", "on_timeout"],
        },
    ),
    (
        "approval",
        Signature {
            required: &[],
            optional: &["timeout", "on_timeout", "on_reject", "approvers"],
        },
    ),
    (
        "workflow",
        Signature {
            required: &["workflow"],
            optional: &["version", "input"],
        },
    ),
    (
        "map",
        Signature {
            required: &["items", "workflow"],
            optional: &["version", "input", "concurrency", "tolerate"],
        },
    ),
    (
        "continue_as_new",
        Signature {
            required: &[],
            optional: &["input"],
        },
    ),
];

/// The signature of an engine-level action (`set`, `sleep`, `workflow`, …).
pub(crate) fn engine_signature(name: &str) -> Option<Signature> {
    ENGINE_ACTIONS.iter().find(|(n, _)| *n == name).map(|(_, sig)| *sig)
}

/// Actions by name.
#[derive(Clone, Default)]
pub struct Registry {
    actions: BTreeMap<String, Arc<dyn Action>>,
    equipment: Option<Arc<crate::equipment::Equipment>>,
}

impl Registry {
    /// The built-in actions: `exec`, `http` (feature `http-action`), and the engine's `set`,
    /// `fail`, `sleep`.
    pub fn builtin() -> Self {
        let mut r = Registry::default();
        r.register("exec", exec::Exec);
        #[cfg(feature = "http-action")]
        r.register("http", http::Http::new());
        r.with_equipment(None)
    }

    /// Adds the equipment actions (`gpio.*`, `sensor.read`, `adc.read`, `modbus.*`), bound to
    /// `equipment`; without it they validate but fail at run time with a clear error.
    pub fn with_equipment(mut self, equipment: Option<std::sync::Arc<crate::equipment::Equipment>>) -> Self {
        for (name, op) in equipment::Op::ALL {
            self.register(name, equipment::EquipmentAction::new(op, equipment.clone()));
        }
        self.equipment = equipment;
        self
    }

    /// The configured equipment, if any (for `status`).
    pub fn equipment(&self) -> Option<&Arc<crate::equipment::Equipment>> {
        self.equipment.as_ref()
    }

    /// Adds (or replaces) an action.
    pub fn register(&mut self, name: &str, action: impl Action) {
        self.actions.insert(name.to_string(), Arc::new(action));
    }

    /// An action by name.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Action>> {
        self.actions.get(name).cloned()
    }
}

impl ActionCatalog for Registry {
    fn names(&self) -> Vec<String> {
        ENGINE_ACTIONS
            .iter()
            .map(|(n, _)| n.to_string())
            .chain(self.actions.keys().cloned())
            .collect()
    }

    fn check(&self, action: &str, args: &Map<String, Value>) -> Option<Vec<String>> {
        if let Some((_, sig)) = ENGINE_ACTIONS.iter().find(|(n, _)| *n == action) {
            // `set` takes any arguments: they are its output.
            if action == "set" {
                return Some(Vec::new());
            }
            let mut p = sig.check_names(args);
            for field in ["duration", "timeout"] {
                if let Some(Value::String(d)) = args.get(field)
                    && !outpost_shared::expr::is_template(d)
                    && let Err(e) = outpost_shared::definition::parse_duration(d)
                {
                    p.push(format!("{field}: {e}"));
                }
            }
            for (field, allowed) in [
                ("on_timeout", ["fail", "continue"]),
                ("on_reject", ["fail", "continue"]),
            ] {
                if let Some(v) = args.get(field)
                    && !v.as_str().is_some_and(|v| allowed.contains(&v))
                {
                    p.push(format!("{field}: {v} must be one of: {}", allowed.join(", ")));
                }
            }
            return Some(p);
        }
        let a = self.actions.get(action)?;
        let mut p = a.signature().check_names(args);
        p.extend(a.check(args));
        Some(p)
    }
}

/// A literal string argument, or an error naming it.
pub(crate) fn str_arg<'a>(args: &'a Value, name: &str) -> Result<&'a str, ActionError> {
    args.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| ActionError::permanent("invalid_argument", format!("argument '{name}' must be a string")))
}

/// Caps text kept in an output, on a character boundary.
pub(crate) fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("…[truncated]");
    }
    s
}

/// A call with fixed run, step and key, for action tests.
#[cfg(test)]
pub(crate) fn test_call(args: Value) -> Call {
    Call {
        run_id: "r".into(),
        step: "s".into(),
        visit: 1,
        attempt: 1,
        key: "r/s/1".into(),
        args,
    }
}
