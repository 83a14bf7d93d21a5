//! Conditions and templates, evaluated with MiniJinja (the Jinja2 dialect Home Assistant and
//! Ansible users already know).
//!
//! A condition is a bare expression (`steps.read.output.celsius > 80`). A template is any string
//! argument containing `{{ … }}`; a string that is exactly one `{{ expr }}` keeps the expression's
//! JSON type (`"{{ input.count }}"` stays a number), anything else renders to a string.
//! Evaluation is bounded by fuel, so a definition cannot hang the engine.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use minijinja::{Environment, UndefinedBehavior, Value as MjValue};
use serde_json::Value;

/// Instruction budget for one evaluation; a template that needs more fails instead of hanging.
const FUEL: u64 = 100_000;

/// Names a condition or template may start from.
pub const ROOTS: &[&str] = &["input", "steps", "run"];

static ENV: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    env
});

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

/// Evaluates a condition against `ctx` to a boolean (Jinja truthiness).
pub fn eval_condition(src: &str, ctx: &Value) -> Result<bool, ExprError> {
    let expr = ENV.compile_expression(src).map_err(mj_err)?;
    let v = expr.eval(MjValue::from(minijinja::value::Serde(ctx))).map_err(mj_err)?;
    Ok(v.is_true())
}

/// Evaluates an expression against `ctx` to a JSON value.
pub fn eval_value(src: &str, ctx: &Value) -> Result<Value, ExprError> {
    eval_mj(src, &MjValue::from(minijinja::value::Serde(ctx)))
}

fn eval_mj(src: &str, ctx: &MjValue) -> Result<Value, ExprError> {
    let expr = ENV.compile_expression(src).map_err(mj_err)?;
    let v = expr.eval(ctx.clone()).map_err(mj_err)?;
    if v.is_undefined() {
        return Ok(Value::Null);
    }
    serde_json::to_value(&v).map_err(|e| ExprError(format!("result is not JSON: {e}")))
}

/// Renders every template string inside `value` (recursively through arrays and objects).
pub fn render(value: &Value, ctx: &Value) -> Result<Value, ExprError> {
    render_mj(value, &MjValue::from(minijinja::value::Serde(ctx)))
}

fn render_mj(value: &Value, ctx: &MjValue) -> Result<Value, ExprError> {
    Ok(match value {
        Value::String(s) if is_template(s) => match single_expression(s) {
            Some(inner) => eval_mj(inner, ctx)?,
            None => Value::String(ENV.render_str(s, ctx.clone()).map_err(mj_err)?),
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
