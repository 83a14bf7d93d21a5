//! Conditions and templates, evaluated with MiniJinja (the Jinja2 dialect Home Assistant and
//! Ansible users already know).
//!
//! A condition is a bare expression (`steps.read.output.celsius > 80`). A template is any string
//! argument containing `{{ … }}`; a string that is exactly one `{{ expr }}` keeps the expression's
//! JSON type (`"{{ input.count }}"` stays a number), anything else renders to a string.
//! Evaluation is bounded by fuel, so a definition cannot hang the engine.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, LazyLock, Mutex};

use minijinja::{Environment, UndefinedBehavior, Value as MjValue};
use serde_json::Value;

/// Instruction budget for one evaluation; a template that needs more fails instead of hanging.
const FUEL: u64 = 100_000;

/// Names a condition or template may start from.
pub const ROOTS: &[&str] = &["input", "steps", "run"];

static ENV: LazyLock<Environment<'static>> = LazyLock::new(new_env);

fn new_env() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    // Templates render JSON arguments and URLs, never HTML, whatever their text ends with.
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env
}

thread_local! {
    /// Each thread's compiled templates, named by their own text (a template borrows the
    /// environment that holds it, so they are kept per thread rather than behind a lock).
    static TEMPLATES: std::cell::RefCell<(Environment<'static>, usize)> = std::cell::RefCell::new((new_env(), 0));
}

/// Renders template `src` in `ctx`, compiling it on this thread only the first time.
fn render_template(src: &str, ctx: &MjValue) -> Result<String, ExprError> {
    TEMPLATES.with(|cell| {
        let mut cell = cell.borrow_mut();
        let (env, count) = &mut *cell;
        if env.get_template(src).is_err() {
            if *count >= CACHE_MAX {
                *env = new_env();
                *count = 0;
            }
            env.add_template_owned(src.to_string(), src.to_string())
                .map_err(mj_err)?;
            *count += 1;
        }
        env.get_template(src).map_err(mj_err)?.render(ctx).map_err(mj_err)
    })
}

/// An expression or template that failed to compile or evaluate.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ExprError(pub String);

fn mj_err(e: minijinja::Error) -> ExprError {
    // MiniJinja's Display includes the detail line ("undefined value", "unknown filter") we want.
    let mut msg = e.to_string();
    if let Some(detail) = e.detail()
        && !msg.contains(detail)
    {
        msg = format!("{msg}: {detail}");
    }
    ExprError(msg)
}

/// True when `s` contains template syntax and so must be rendered.
pub fn is_template(s: &str) -> bool {
    s.contains("{{") || s.contains("{%")
}

/// The inner expression when `s` is exactly one `{{ expr }}`.
fn single_expression(s: &str) -> Option<&str> {
    let t = s.trim();
    let inner = t.strip_prefix("{{")?.strip_suffix("}}")?;
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") {
        return None;
    }
    Some(inner.trim())
}

/// Checks a condition's syntax and returns the variable paths it reads (`steps.read.output`).
pub fn check_expression(src: &str) -> Result<BTreeSet<String>, ExprError> {
    let expr = ENV.compile_expression(src).map_err(mj_err)?;
    Ok(expr.undeclared_variables(true).into_iter().collect())
}

/// Checks a template string's syntax and returns the variable paths it reads.
pub fn check_template(src: &str) -> Result<BTreeSet<String>, ExprError> {
    if let Some(inner) = single_expression(src) {
        return check_expression(inner);
    }
    let tmpl = ENV.template_from_str(src).map_err(mj_err)?;
    Ok(tmpl.undeclared_variables(true).into_iter().collect())
}

/// Compiled expressions kept for reuse: a definition's few expressions are evaluated at every
/// step, and compiling one cost more than evaluating it.
type Compiled = Arc<minijinja::Expression<'static, 'static>>;

/// Most compiled expressions kept; the cache starts over when full (definitions hold a few
/// dozen each, so only a flood of distinct expressions ever clears it).
const CACHE_MAX: usize = 1024;

static CACHE: LazyLock<Mutex<HashMap<Box<str>, Compiled>>> = LazyLock::new(Default::default);

/// A JSON value as MiniJinja sees it.
fn mj_of(v: &Value) -> MjValue {
    MjValue::from(minijinja::value::Serde(v))
}

/// `src` compiled, from the cache when it was compiled before.
fn compiled(src: &str) -> Result<Compiled, ExprError> {
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = cache.get(src) {
        return Ok(e.clone());
    }
    let expr = Arc::new(ENV.compile_expression_owned(src.to_string()).map_err(mj_err)?);
    if cache.len() >= CACHE_MAX {
        cache.clear();
    }
    cache.insert(Box::from(src), expr.clone());
    Ok(expr)
}

/// The variables conditions and templates see, converted once for every expression of a
/// decision ([`scope`] builds it without a JSON tree in between).
#[derive(Debug, Clone)]
pub struct Scope(MjValue);

impl Scope {
    /// A scope holding the JSON object `ctx`.
    pub fn from_json(ctx: &Value) -> Scope {
        Scope(mj_of(ctx))
    }
}

/// What a step shows to expressions under `steps.<id>`.
#[derive(Debug)]
pub struct StepScope<'a> {
    /// The step's id.
    pub id: &'a str,
    /// Its phase, as users see it (`completed`, `running`…).
    pub status: &'a str,
    /// Its output, once it has one.
    pub output: Option<&'a Value>,
    /// Its error's kind and message, once it failed.
    pub error: Option<(&'a str, &'a str)>,
    /// How many times it was entered.
    pub visits: u32,
}

/// The scope of a run: `input`, `steps.<id>.{status, output, error, visits}` and
/// `run.{id, workflow, version}`, the same as [`Scope::from_json`] of that JSON object.
pub fn scope<'a>(input: &Value, steps: impl Iterator<Item = StepScope<'a>>, run: (&str, &str, u32)) -> Scope {
    let steps = map(steps.map(|s| {
        let mut m = vec![("status", MjValue::from(s.status))];
        if let Some(o) = s.output {
            m.push(("output", mj_of(o)));
        }
        if let Some((kind, message)) = s.error {
            m.push((
                "error",
                map([("kind", MjValue::from(kind)), ("message", MjValue::from(message))]),
            ));
        }
        m.push(("visits", MjValue::from(s.visits)));
        (s.id, map(m))
    }));
    let (id, workflow, version) = run;
    let run = map([
        ("id", MjValue::from(id)),
        ("workflow", MjValue::from(workflow)),
        ("version", MjValue::from(version)),
    ]);
    Scope(map([("input", mj_of(input)), ("steps", steps), ("run", run)]))
}

/// A map value, made as the conversion from JSON makes one (so the two compare equal).
fn map<'k>(entries: impl IntoIterator<Item = (&'k str, MjValue)>) -> MjValue {
    MjValue::from_object(
        entries
            .into_iter()
            .map(|(k, v)| (MjValue::from(k), v))
            .collect::<std::collections::BTreeMap<MjValue, MjValue>>(),
    )
}

/// Evaluates a condition against `ctx` to a boolean (Jinja truthiness).
pub fn eval_condition(src: &str, ctx: &Value) -> Result<bool, ExprError> {
    eval_condition_in(src, &Scope::from_json(ctx))
}

/// Evaluates a condition in `scope` to a boolean (Jinja truthiness).
pub fn eval_condition_in(src: &str, scope: &Scope) -> Result<bool, ExprError> {
    let v = compiled(src)?.eval(scope.0.clone()).map_err(mj_err)?;
    Ok(v.is_true())
}

/// Evaluates an expression against `ctx` to a JSON value.
pub fn eval_value(src: &str, ctx: &Value) -> Result<Value, ExprError> {
    eval_mj(src, &Scope::from_json(ctx).0)
}

fn eval_mj(src: &str, ctx: &MjValue) -> Result<Value, ExprError> {
    let v = compiled(src)?.eval(ctx.clone()).map_err(mj_err)?;
    if v.is_undefined() {
        return Ok(Value::Null);
    }
    serde_json::to_value(&v).map_err(|e| ExprError(format!("result is not JSON: {e}")))
}

/// Renders every template string inside `value` (recursively through arrays and objects).
pub fn render(value: &Value, ctx: &Value) -> Result<Value, ExprError> {
    render_in(value, &Scope::from_json(ctx))
}

/// Renders every template string inside `value` in `scope`.
pub fn render_in(value: &Value, scope: &Scope) -> Result<Value, ExprError> {
    render_mj(value, &scope.0)
}

fn render_mj(value: &Value, ctx: &MjValue) -> Result<Value, ExprError> {
    Ok(match value {
        Value::String(s) if is_template(s) => match single_expression(s) {
            Some(inner) => eval_mj(inner, ctx)?,
            None => Value::String(render_template(s, ctx)?),
        },
        Value::Array(items) => Value::Array(items.iter().map(|v| render_mj(v, ctx)).collect::<Result<_, _>>()?),
        Value::Object(map) => {
            let mut out = serde_json::Map::with_capacity(map.len());
            for (k, v) in map {
                out.insert(k.clone(), render_mj(v, ctx)?);
            }
            Value::Object(out)
        }
        other => other.clone(),
    })
}

/// Every template string inside `value`, with its JSON path relative to the value.
pub fn templates_in<'a>(value: &'a Value, path: &str, out: &mut Vec<(String, &'a str)>) {
    match value {
        Value::String(s) if is_template(s) => out.push((path.to_string(), s)),
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                templates_in(v, &format!("{path}[{i}]"), out);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                templates_in(v, &format!("{path}.{k}"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn single_expression_keeps_json_type() {
        let ctx = json!({"input": {"n": 3, "name": "oven"}});
        assert_eq!(render(&json!("{{ input.n }}"), &ctx).unwrap(), json!(3));
        assert_eq!(
            render(&json!("n={{ input.n }} {{ input.name }}"), &ctx).unwrap(),
            json!("n=3 oven")
        );
        assert_eq!(
            render(&json!({"a": ["{{ input.n * 2 }}", 1]}), &ctx).unwrap(),
            json!({"a": [6, 1]})
        );
    }

    #[test]
    fn conditions_and_strict_undefined() {
        let ctx = json!({"steps": {"read": {"output": {"celsius": 85}}}});
        assert!(eval_condition("steps.read.output.celsius > 80", &ctx).unwrap());
        assert!(!eval_condition("steps.read.output.celsius > 90", &ctx).unwrap());
        let err = eval_condition("steps.nope.output > 1", &ctx).unwrap_err();
        assert!(err.0.contains("undefined"), "{err}");
    }

    #[test]
    fn syntax_errors_and_references() {
        assert!(check_expression("a >").is_err());
        let vars = check_expression("steps.read.output.x > input.limit").unwrap();
        assert!(vars.iter().any(|v| v.starts_with("steps.read")), "{vars:?}");
        assert!(vars.iter().any(|v| v.starts_with("input")), "{vars:?}");
        assert!(check_template("{{ oops").is_err());
    }

    #[test]
    fn a_built_scope_is_the_json_scope() {
        let input = json!({"n": 3, "tags": ["a", "b"]});
        let out = json!({"celsius": 85.5, "ok": true, "none": null});
        let steps = || {
            [
                StepScope {
                    id: "read",
                    status: "completed",
                    output: Some(&out),
                    error: None,
                    visits: 1,
                },
                StepScope {
                    id: "act",
                    status: "failed",
                    output: None,
                    error: Some(("http.status", "500")),
                    visits: 2,
                },
            ]
            .into_iter()
        };
        let built = scope(&input, steps(), ("r1", "w", 4));
        let json = Scope::from_json(&json!({
            "input": input,
            "steps": {
                "read": {"status": "completed", "output": out, "visits": 1},
                "act": {"status": "failed", "error": {"kind": "http.status", "message": "500"}, "visits": 2},
            },
            "run": {"id": "r1", "workflow": "w", "version": 4},
        }));
        assert_eq!(built.0, json.0);
        for src in [
            "steps",
            "steps.read.output.celsius * 2",
            "input.tags | join(',')",
            "run",
            "steps.act.error",
        ] {
            assert_eq!(eval_mj(src, &built.0), eval_mj(src, &json.0), "{src}");
        }
        assert_eq!(
            render_in(&json!("{{ run.id }}-{{ steps.act.visits }}"), &built).unwrap(),
            json!("r1-2")
        );
    }

    #[test]
    fn templates_render_the_same_compiled_again_and_never_escape() {
        let ctx = json!({"run": {"id": "r1"}, "input": {"tag": "<a&b>"}});
        for _ in 0..3 {
            assert_eq!(
                render(&json!("http://h/x?run={{ run.id }}&t={{ input.tag }}.html"), &ctx).unwrap(),
                json!("http://h/x?run=r1&t=<a&b>.html")
            );
        }
        let err = render(&json!("id={{ run.nope.x }}"), &ctx).unwrap_err();
        assert!(err.0.contains("undefined"), "{err}");
        assert!(render(&json!("{% if %}"), &ctx).is_err());
    }

    #[test]
    fn compiled_expressions_are_reused_and_errors_are_not_kept() {
        let ctx = json!({"input": {"n": 2}});
        for _ in 0..3 {
            assert_eq!(eval_value("input.n * 21", &ctx).unwrap(), json!(42));
        }
        assert!(compiled("input.n +").is_err());
        assert!(compiled("input.n +").is_err());
    }

    #[test]
    fn runaway_template_is_stopped_by_fuel() {
        let ctx = json!({});
        let err = render(
            &json!("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"),
            &ctx,
        )
        .unwrap_err();
        assert!(err.0.to_lowercase().contains("fuel"), "{err}");
    }
}
