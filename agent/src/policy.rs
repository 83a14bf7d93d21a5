//! The gateway's local policy for definitions that arrive from the cloud (deployments): which
//! `exec` commands, `http` hosts and equipment writes they may use. Definitions applied here
//! (the CLI, `--apply`) are the local operator's and are not checked.
//!
//! ```yaml
//! # /etc/outpost/policy.yaml
//! exec:                 # commands as written in `command` + `args`, `*` matches anything
//!   - /usr/local/bin/line-report *
//! http_hosts:           # host names (`*.plant.local`), default: any
//!   - mes.plant.local
//! equipment_writes:     # devices gpio.write / modbus.write / opcua.write may drive, default: any
//!   - vent
//! ```
//!
//! Without a file: no `exec` at all, any `http` host, any equipment write. A value the policy
//! cannot check before the run (a template in the command, URL or device) is allowed only by
//! a `*` rule. The check is a pure function of the policy and the document.

use std::path::Path;

use outpost_shared::definition::Document;
use serde::Deserialize;
use serde_json::{Map, Value};

/// What remote definitions may do.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Allowed `exec` command lines (globs); empty: none.
    #[serde(default)]
    pub exec: Vec<String>,
    /// Allowed `http` hosts (globs).
    #[serde(default = "any")]
    pub http_hosts: Vec<String>,
    /// Devices remote definitions may write (globs).
    #[serde(default = "any")]
    pub equipment_writes: Vec<String>,
    /// Where it came from, for messages.
    #[serde(skip)]
    pub source: String,
}

fn any() -> Vec<String> {
    vec!["*".into()]
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            exec: Vec::new(),
            http_hosts: any(),
            equipment_writes: any(),
            source: "the default policy (no --policy file)".into(),
        }
    }
}

/// Why a remote definition is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused by {policy}: step '{step}' {what}; {rule}")]
pub struct Violation {
    /// Which policy (its file).
    pub policy: String,
    /// The step (or `STEP (compensation)`).
    pub step: String,
    /// What it does.
    pub what: String,
    /// Which rule refuses it.
    pub rule: String,
}

/// `*` matches any run of characters; everything else itself.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for p in middle {
        match rest.find(p) {
            Some(i) => rest = rest.get(i + p.len()..).unwrap_or(""),
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

fn is_template(v: &str) -> bool {
    outpost_shared::expr::is_template(v)
}

fn allowed(rules: &[String], text: &str) -> bool {
    if is_template(text) {
        return rules.iter().any(|r| r == "*");
    }
    rules.iter().any(|r| glob(r, text))
}

fn host_of(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if host.starts_with('[') {
        host.split_once(']').map_or(host, |(h, _)| h).trim_start_matches('[')
    } else {
        host.split(':').next().unwrap_or(host)
    };
    Some(host)
}

impl Policy {
    /// Reads a policy file.
    pub fn load(path: &Path) -> Result<Policy, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("--policy {}: {e}", path.display()))?;
        let mut p: Policy = serde_saphyr::from_str(&text).map_err(|e| format!("--policy {}: {e}", path.display()))?;
        p.source = format!("the gateway's policy {}", path.display());
        Ok(p)
    }

    /// Checks every step (and compensation) of a remote definition.
    pub fn check(&self, doc: &Document) -> Result<(), Violation> {
        for s in &doc.steps {
            self.check_call(&s.id, &s.action, &s.args)?;
            if let Some(c) = &s.compensate {
                self.check_call(&format!("{} (compensation)", s.id), &c.action, &c.args)?;
            }
        }
        Ok(())
    }

    fn check_call(&self, step: &str, action: &str, args: &Map<String, Value>) -> Result<(), Violation> {
        let refuse = |what: String, rule: String| {
            Err(Violation {
                policy: self.source.clone(),
                step: step.to_string(),
                what,
                rule,
            })
        };
        let text = |k: &str| args.get(k).and_then(Value::as_str).unwrap_or("");
        match action {
            "exec" => {
                let mut line = text("command").to_string();
                match args.get("args") {
                    Some(Value::Array(list)) => {
                        for a in list {
                            line.push(' ');
                            line.push_str(&a.as_str().map_or_else(|| a.to_string(), str::to_string));
                        }
                    }
                    Some(Value::String(t)) => {
                        line.push(' ');
                        line.push_str(t);
                    }
                    _ => {}
                }
                let env_path = args.get("env").and_then(|e| e.get("PATH")).is_some();
                if self.exec.is_empty() {
                    return refuse(
                        format!("runs exec '{}'", outpost_shared::protocol::quote(&line)),
                        "no exec is allowed for definitions from the cloud (add an `exec:` rule to the policy)".into(),
                    );
                }
                if env_path && !self.exec.iter().any(|r| r == "*") {
                    return refuse(
                        format!(
                            "runs exec '{}' with its own PATH",
                            outpost_shared::protocol::quote(&line)
                        ),
                        "a remote exec may not change PATH".into(),
                    );
                }
                if !allowed(&self.exec, &line) {
                    return refuse(
                        format!("runs exec '{}'", outpost_shared::protocol::quote(&line)),
                        format!("no exec rule matches it (allowed: {})", self.exec.join(", ")),
                    );
                }
            }
            "http" => {
                let url = text("url");
                let host = if is_template(url) {
                    url
                } else {
                    host_of(url).unwrap_or(url)
                };
                if !allowed(&self.http_hosts, host) {
                    return refuse(
                        format!("calls http '{}'", outpost_shared::protocol::quote(url)),
                        format!("its host is not in http_hosts ({})", self.http_hosts.join(", ")),
                    );
                }
            }
            "gpio.write" | "modbus.write" | "opcua.write" => {
                let device = text("device");
                if !allowed(&self.equipment_writes, device) {
                    return refuse(
                        format!(
                            "writes to device '{}' ({action})",
                            outpost_shared::protocol::quote(device)
                        ),
                        format!(
                            "the device is not in equipment_writes ({})",
                            self.equipment_writes.join(", ")
                        ),
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(steps: &str) -> Document {
        outpost_shared::definition::parse_document(&format!("name: w\nversion: 1\nsteps:\n{steps}")).unwrap()
    }

    #[test]
    fn globs() {
        assert!(glob("*", "anything"));
        assert!(glob("/usr/bin/report *", "/usr/bin/report --line 3"));
        assert!(!glob("/usr/bin/report *", "/usr/bin/reporter"));
        assert!(glob("*.plant.local", "mes.plant.local"));
        assert!(!glob("*.plant.local", "plant.local.evil.com"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxbyy"));
        assert!(glob("exact", "exact") && !glob("exact", "exact2"));
    }

    #[test]
    fn the_default_refuses_exec_and_allows_the_rest() {
        let p = Policy::default();
        let err = p
            .check(&doc(
                "  - id: x\n    action: exec\n    args: {command: rm, args: ['-rf', '/']}\n",
            ))
            .unwrap_err();
        assert_eq!(err.step, "x");
        assert!(err.to_string().contains("exec 'rm -rf /'"), "{err}");
        assert!(err.to_string().contains("no exec is allowed"), "{err}");
        assert!(
            p.check(&doc("  - id: h\n    action: http\n    args: {url: 'https://mes/x'}\n"))
                .is_ok()
        );
        let comp = "  - id: s\n    action: set\n    compensate: {action: exec, args: {command: x}}\n";
        assert_eq!(p.check(&doc(comp)).unwrap_err().step, "s (compensation)");
    }

    #[test]
    fn rules_allow_what_they_name_and_templates_need_a_star() {
        let p = Policy {
            exec: vec!["/usr/local/bin/report *".into()],
            http_hosts: vec!["*.plant.local".into()],
            equipment_writes: vec!["vent".into()],
            source: "test".into(),
        };
        let ok = |s: &str| p.check(&doc(s));
        assert!(ok("  - id: r\n    action: exec\n    args: {command: /usr/local/bin/report, args: [a]}\n").is_ok());
        assert!(ok("  - id: r\n    action: exec\n    args: {command: /bin/sh, args: ['-c', x]}\n").is_err());
        assert!(ok("  - id: r\n    action: exec\n    args: {command: '{{ input.cmd }}'}\n").is_err());
        assert!(
            ok("  - id: r\n    action: exec\n    args: {command: /usr/local/bin/report, args: [a], env: {PATH: /tmp}}\n")
                .is_err()
        );
        assert!(ok("  - id: h\n    action: http\n    args: {url: 'https://mes.plant.local:8443/x'}\n").is_ok());
        assert!(ok("  - id: h\n    action: http\n    args: {url: 'https://evil.com/x'}\n").is_err());
        assert!(ok("  - id: h\n    action: http\n    args: {url: 'https://user@evil.com/'}\n").is_err());
        assert!(ok("  - id: h\n    action: http\n    args: {url: '{{ input.url }}'}\n").is_err());
        assert!(ok("  - id: w\n    action: modbus.write\n    args: {device: vent, register: 1, value: 2}\n").is_ok());
        let e = ok("  - id: w\n    action: gpio.write\n    args: {device: heater, value: true}\n").unwrap_err();
        assert!(e.to_string().contains("device 'heater'"), "{e}");
    }

    #[test]
    fn policy_files_parse_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("policy.yaml");
        std::fs::write(&f, "exec: ['/bin/true']\n").unwrap();
        let p = Policy::load(&f).unwrap();
        assert_eq!(p.exec, vec!["/bin/true".to_string()]);
        assert_eq!(p.http_hosts, vec!["*".to_string()]);
        std::fs::write(&f, "exce: ['/bin/true']\n").unwrap();
        assert!(Policy::load(&f).unwrap_err().contains("exce"));
    }
}
