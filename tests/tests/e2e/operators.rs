//! Operators on the console and the API, in a real Chromium against the real `outpost-cloud`:
//! sign-in, lock-out, sign-out and session expiry; roles (what a viewer sees and may post);
//! API tokens; cross-origin forms and fetches; approvals bound to the signed-in user and the
//! step's `approvers:`; and the audit trail that records all of it, refusals included.

use std::io::{Read, Write};
use std::time::Duration;

use outpost_tests::browser::Browser;
use outpost_tests::cloud::{self, Cloud};
use outpost_tests::{Agent, eventually, write};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// A gate only alice may pass.
const ALICE_GATE: &str = r#"
name: gate
version: 1
kind: state_machine
steps:
  - id: lot
    action: wait_signal
    args: {signal: lot-ready}
    next: release
  - id: release
    action: approval
    args: {approvers: [alice]}
    next: done
  - id: done
    action: set
    args: {by: "{{ steps.release.output.by }}"}
    end: succeed
"#;

/// cloud-sync and a gateway `device` holding ALICE_GATE, with run g1 of it started.
fn gate_device(dir: &std::path::Path, device: &str) -> (Cloud, Agent) {
    let cloud = Cloud::embedded(&dir.join("cloud"));
    let gate = write(dir, "gate.yaml", ALICE_GATE);
    let url = cloud.mqtt_url();
    let agent = Agent::start(
        &dir.join("agent"),
        &["--broker", &url, "--device-id", device, "--apply", &gate],
    );
    cloud.wait_presence(device, true, WAIT);
    assert!(agent.cli(&["start", "gate", "--id", "g1"]).status.success());
    (cloud, agent)
}

fn base(cloud: &Cloud) -> String {
    format!("http://127.0.0.1:{}", cloud.api)
}

/// Fills and sends the sign-in form; returns the error shown, if any.
fn try_sign_in(b: &Browser, cloud: &Cloud, user: &str, password: &str) -> Option<String> {
    b.goto(&format!("{}/login", base(cloud)));
    b.type_into(&b.wait_for("#login-form input[name=user]", WAIT), user);
    b.type_into(&b.wait_for("#login-form input[name=password]", WAIT), password);
    b.click(&b.wait_for("#login-form button", WAIT));
    eventually(WAIT, "the sign-in answer", || {
        if !b.url().contains("/login") {
            return Some(None);
        }
        let e = b.all("#login-error");
        (!e.is_empty()).then(|| Some(b.text_of("#login-error")))
    })
}

fn sign_out(b: &Browser) {
    b.click(&b.wait_for("#signout-form button", WAIT));
    eventually(WAIT, "signed out", || b.url().contains("/login").then_some(()));
}

/// A POST made by script from the page the browser shows, with that page's CSRF token (as a
/// user who edits the page or uses curl with their cookie would): the status.
fn post_from_page(b: &Browser, path: &str, fields: &Value) -> u64 {
    let script = format!(
        r#"var x = new XMLHttpRequest(); x.open('POST', {path:?}, false);
           x.setRequestHeader('Content-Type', 'application/x-www-form-urlencoded');
           var p = new URLSearchParams({fields});
           p.set('csrf', document.querySelector('input[name=csrf]').value);
           x.send(p.toString()); return x.status;"#
    );
    b.js(&script).as_u64().unwrap_or(0)
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

#[test]
fn sign_in_wrong_password_sign_out_session_expiry_and_lock_out() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded_with_args(&dir.path().join("cloud"), &["--session-idle", "3s"]);
    let password = cloud.user("ada", &["viewer"]);
    let b = Browser::start(900);

    // Nothing is shown before signing in: the console sends the browser to the sign-in page.
    b.goto(&format!("{}/devices/x", base(&cloud)));
    eventually(WAIT, "the sign-in page", || {
        b.url().contains("/login?next=").then_some(())
    });
    b.screenshot("sign-in");
    let err = try_sign_in(&b, &cloud, "ada", "not her password").expect("refused");
    assert!(err.contains("wrong user name or password"), "{err}");
    let err = try_sign_in(&b, &cloud, "nobody", "whatever").expect("refused");
    assert!(
        err.contains("wrong user name or password"),
        "the same words for an unknown user: {err}"
    );

    assert_eq!(try_sign_in(&b, &cloud, "ada", &password), None);
    assert_eq!(b.text_of("#who"), "ada");
    sign_out(&b);
    b.goto(&format!("{}/", base(&cloud)));
    eventually(WAIT, "signed out for good", || b.url().contains("/login").then_some(()));

    // Idle for longer than --session-idle: signed out.
    assert_eq!(try_sign_in(&b, &cloud, "ada", &password), None);
    std::thread::sleep(Duration::from_secs(4));
    b.goto(&format!("{}/", base(&cloud)));
    eventually(WAIT, "the idle session to end", || {
        b.url().contains("/login").then_some(())
    });

    // A generated password (first start, `users add` without one) is changed at first sign-in.
    let out = cloud.admin(&["users", "add", "newbie", "--role", "viewer"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let first = text
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .unwrap_or_else(|| panic!("no password in: {text}"))
        .to_string();
    assert_eq!(try_sign_in(&b, &cloud, "newbie", &first), None);
    b.wait_for("#must-change", WAIT);
    b.goto(&format!("{}/devices/x", base(&cloud)));
    eventually(WAIT, "the password page first", || {
        b.url().ends_with("/account/password").then_some(())
    });
    for (field, value) in [
        ("current", first.as_str()),
        ("new", "newbie-chose-this"),
        ("repeat", "newbie-chose-this"),
    ] {
        b.type_into(&b.wait_for(&format!("#password-form input[name={field}]"), WAIT), value);
    }
    b.click(&b.wait_for("#password-form button", WAIT));
    eventually(WAIT, "the fleet page", || (!b.url().contains("/account")).then_some(()));
    assert_eq!(b.text_of("#who"), "newbie");
    // Disabled: the session ends at once, and so does signing in.
    let out = cloud.admin(&["users", "disable", "newbie"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    b.goto(&format!("{}/", base(&cloud)));
    eventually(WAIT, "the disabled user signed out", || {
        b.url().contains("/login").then_some(())
    });
    let err = try_sign_in(&b, &cloud, "newbie", "newbie-chose-this").expect("refused");
    assert!(err.contains("disabled"), "{err}");

    // Five wrong passwords lock the name out, even against the right password.
    for _ in 0..5 {
        assert!(try_sign_in(&b, &cloud, "ada", "guess").is_some());
    }
    let err = try_sign_in(&b, &cloud, "ada", &password).expect("locked out");
    assert!(err.contains("too many failed sign-ins"), "{err}");

    let signs: Vec<Value> = cloud.audit().into_iter().filter(|a| a["kind"] == "sign_in").collect();
    let ok = signs.iter().filter(|a| a["result"] == "ok").count();
    let refused = signs.iter().filter(|a| a["result"] == "refused").count();
    assert_eq!((ok, refused), (3, 9), "{signs:?}");
    assert!(signs.iter().all(|a| a["from"] == "127.0.0.1"), "{signs:?}");
}

#[test]
fn a_viewer_sees_no_actions_and_is_refused_every_post_and_tokens_carry_their_roles() {
    let dir = tempfile::tempdir().unwrap();
    let (cloud, _agent) = gate_device(dir.path(), "line-5");
    eventually(WAIT, "the run in the cloud", || {
        cloud.device("line-5").filter(|d| d["runs"] == 1)
    });

    let password = cloud.user("vera", &["viewer"]);
    let b = Browser::start(900);
    cloud.sign_in(&b, "vera", &password);
    b.goto(&format!("{}/devices/line-5", base(&cloud)));
    b.wait_for("#run-list", WAIT);
    assert!(b.all("#start-form").is_empty() && b.all("#desired-form").is_empty());
    b.goto(&format!("{}/devices/line-5/runs/g1", base(&cloud)));
    b.wait_for("#timeline", WAIT);
    for form in ["form.approval", "#signal-form", "#cancel-form"] {
        assert!(b.all(form).is_empty(), "a viewer sees {form}");
    }
    b.goto(&format!("{}/deployments", base(&cloud)));
    b.wait_for("#deployment-list", WAIT);
    assert!(b.all("#deploy-form").is_empty());
    b.screenshot("viewer-deployments");

    // Every action posted by hand, with a valid session and CSRF token: 403 for a viewer.
    let actions = [
        ("/devices/line-5/start", json!({"workflow": "gate"})),
        ("/devices/line-5/desired", json!({"document": "{}"})),
        ("/devices/line-5/runs/g1/cancel", json!({})),
        ("/devices/line-5/runs/g1/signal", json!({"name": "lot-ready"})),
        (
            "/devices/line-5/runs/g1/approve",
            json!({"step": "release", "decision": "approve"}),
        ),
        ("/deployments", json!({"document": ALICE_GATE, "device": "line-5"})),
    ];
    for (path, fields) in &actions {
        assert_eq!(post_from_page(&b, path, fields), 403, "{path}");
    }
    let (_, pending) = cloud::http("GET", cloud.api, "/v1/devices/line-5/commands", None).unwrap();
    assert_eq!(pending, json!([]), "nothing queued");
    let refused: Vec<Value> = cloud
        .audit()
        .into_iter()
        .filter(|a| a["who"] == "vera" && a["result"] == "refused")
        .collect();
    assert_eq!(refused.len(), actions.len(), "{refused:?}");
    assert!(
        refused
            .iter()
            .any(|a| a["message"].as_str().unwrap_or("").contains("needs the deployer role")),
        "{refused:?}"
    );

    // API tokens: each does what its role may, and a revoked one is refused.
    let viewer = cloud::create_token(&cloud.dir, "dash", &["viewer"]);
    let operator = cloud::create_token(&cloud.dir, "line-bot", &["operator"]);
    let deployer = cloud::create_token(&cloud.dir, "ci", &["deployer"]);
    let start = json!({"type": "start", "workflow": "gate", "run_id": "g2"}).to_string();
    let post = |token: &str, path: &str, body: &str| {
        cloud::http_raw("POST", cloud.api, path, Some(body), &bearer(token), "application/json").unwrap()
    };
    let (code, v) = post(&viewer, "/v1/devices/line-5/commands", &start);
    assert_eq!(code, 403, "{v}");
    let (code, v) = cloud::http_raw(
        "GET",
        cloud.api,
        "/v1/devices",
        None,
        &bearer(&viewer),
        "application/json",
    )
    .unwrap();
    assert_eq!(code, 200, "a viewer token reads: {v}");
    let deploy = json!({"document": ALICE_GATE.replace("version: 1", "version: 2"), "devices": ["line-5"]}).to_string();
    let (code, v) = post(&operator, "/v1/deployments", &deploy);
    assert_eq!(code, 403, "an operator cannot deploy: {v}");
    let (code, v) = post(&deployer, "/v1/deployments", &deploy);
    assert_eq!(code, 201, "a deployer can: {v}");
    let (code, v) = post(&operator, "/v1/devices/line-5/commands", &start);
    assert_eq!(code, 202, "{v}");
    // A device that never connected and was never enrolled: refused, not queued forever.
    let (code, v) = post(&operator, "/v1/devices/nosuch/commands", &start);
    assert_eq!(code, 404, "{v}");
    assert!(v.to_string().contains("'nosuch' is not known"), "{v}");
    let (_, pending) = cloud::http("GET", cloud.api, "/v1/devices/nosuch/commands", None).unwrap();
    assert_eq!(pending, json!([]), "nothing queued for it");
    let out = cloud.admin(&["tokens", "revoke", "line-bot"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, v) = post(&operator, "/v1/devices/line-5/commands", &start);
    assert_eq!(code, 401, "revoked: {v}");
    assert!(v.to_string().contains("revoked"), "{v}");
    let (code, _) = cloud::http_raw("GET", cloud.api, "/v1/devices", None, "", "application/json").unwrap();
    assert_eq!(code, 401, "no token, no answer");
    let (code, _) = cloud::http_raw("GET", cloud.api, "/v1/health", None, "", "application/json").unwrap();
    assert_eq!(code, 200, "health stays open");
    let token_audit: Vec<Value> = cloud
        .audit()
        .into_iter()
        .filter(|a| a["who"].as_str().unwrap_or("").starts_with("token:"))
        .collect();
    assert!(
        token_audit
            .iter()
            .any(|a| a["who"] == "token:line-bot" && a["kind"] == "start" && a["result"] == "ok"),
        "{token_audit:?}"
    );
}

/// Serves `page` to every request on a port of its own: another origin than the console's.
fn serve_page(page: String) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    port
}

#[test]
fn cross_origin_posts_are_refused_approvals_are_bound_to_people_and_the_audit_trail_has_it_all() {
    let dir = tempfile::tempdir().unwrap();
    let (cloud, agent) = gate_device(dir.path(), "line-6");
    assert!(agent.cli(&["signal", "g1", "lot-ready"]).status.success());
    eventually(WAIT, "the gate to wait", || {
        let r = agent.json(&["show", "g1"]);
        r["waiting"]
            .as_str()
            .is_some_and(|w| w.contains("waiting for approval"))
            .then_some(())
    });
    let everything = ["operator", "approver", "deployer"];
    let alice = cloud.user("alice", &everything);
    let bob = cloud.user("bob", &everything);
    let admin = cloud.user("audra", &["admin"]);

    // Alice, signed in, opens a page of another origin that posts the deployment and approval
    // forms and a text/plain fetch at the console with her cookie.
    let api = cloud.api;
    let evil =
        "name: evil\nversion: 1\nsteps:\n  - {id: x, action: exec, args: {command: [touch, /tmp/outpost-pwned]}}\n";
    let page = format!(
        r#"<!doctype html><title>cat pictures</title>
<form id="d" method="post" action="http://127.0.0.1:{api}/deployments" target="f1">
  <input name="document" value="{evil}"><input name="device" value="line-6"><input name="csrf" value="guessed">
</form>
<form id="a" method="post" action="http://127.0.0.1:{api}/devices/line-6/runs/g1/approve" target="f2">
  <input name="step" value="release"><input name="decision" value="approve">
</form>
<iframe name="f1"></iframe><iframe name="f2"></iframe>
<script>
  document.getElementById('d').submit();
  document.getElementById('a').submit();
  fetch('http://127.0.0.1:{api}/v1/devices/line-6/commands', {{method: 'POST', mode: 'no-cors', credentials: 'include',
    headers: {{'Content-Type': 'text/plain'}}, body: JSON.stringify({{type: 'approve', run_id: 'g1', step: 'release'}})}})
    .finally(() => {{ document.title = 'sent'; }});
</script>"#
    );
    let attacker = serve_page(page);
    let b = Browser::start(900);
    cloud.sign_in(&b, "alice", &alice);
    b.goto(&format!("http://127.0.0.1:{attacker}/"));
    eventually(WAIT, "the attack page to send", || {
        (b.js("return document.title") == "sent").then_some(())
    });
    eventually(WAIT, "three refusals in the audit trail", || {
        let refused: Vec<Value> = cloud
            .audit()
            .into_iter()
            .filter(|a| a["result"] == "refused" && a["kind"] != "sign_in")
            .collect();
        (refused.len() >= 3).then_some(refused)
    });
    let refused: Vec<Value> = cloud.audit().into_iter().filter(|a| a["result"] == "refused").collect();
    for kind in ["deploy", "approve", "command"] {
        let a = refused
            .iter()
            .find(|a| a["kind"] == kind)
            .unwrap_or_else(|| panic!("{kind}: {refused:?}"));
        let why = a["message"].as_str().unwrap_or("");
        assert!(
            why.contains("does not come from this console") || why.contains("application/json"),
            "{kind}: {why}"
        );
    }
    let (_, pending) = cloud::http("GET", cloud.api, "/v1/devices/line-6/commands", None).unwrap();
    assert_eq!(pending, json!([]), "nothing reached the gateway's queue");
    let r = agent.json(&["show", "g1"]);
    assert_eq!(r["status"], "running", "{r}");
    assert!(!agent.json(&["definitions"]).to_string().contains("evil"));

    // Bob is an approver, but the step lists only alice: refused, saying who may decide.
    b.goto(&format!("{}/devices/line-6/runs/g1", base(&cloud)));
    sign_out(&b);
    cloud.sign_in(&b, "bob", &bob);
    b.goto(&format!("{}/devices/line-6/runs/g1", base(&cloud)));
    b.click(&b.wait_for(r#"form.approval button[value="approve"]"#, WAIT));
    let err = b.text(&b.wait_for(".flash.error", WAIT));
    assert!(
        err.contains("bob may not decide this step: it may be decided by alice"),
        "{err}"
    );
    sign_out(&b);

    // Alice decides; the run's own history on the gateway names her.
    cloud.sign_in(&b, "alice", &alice);
    b.goto(&format!("{}/devices/line-6/runs/g1", base(&cloud)));
    b.type_into(
        &b.wait_for(r#"form.approval input[name="comment"]"#, WAIT),
        "dry enough",
    );
    b.click(&b.wait_for(r#"form.approval button[value="approve"]"#, WAIT));
    b.wait_for(r#"#run-head [data-status="completed"]"#, WAIT);
    let run = agent.json(&["show", "g1"]);
    assert_eq!(run["output"]["by"], "alice", "{run}");
    let decision = run["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "signal_received" && e["payload"]["approved"] == true)
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(decision["payload"]["by"], "alice", "{run}");
    sign_out(&b);

    // The audit page lists it all, refusals included, and filters by user.
    cloud.sign_in(&b, "audra", &admin);
    b.goto(&format!("{}/audit", base(&cloud)));
    b.wait_for("#audit", WAIT);
    let rows = |css: &str| b.all(css).len();
    assert!(rows(r#"#audit tr[data-kind="sign_in"][data-result="ok"]"#) >= 4);
    assert_eq!(rows(r#"#audit tr[data-kind="approve"][data-result="ok"]"#), 1);
    assert!(rows(r#"#audit tr[data-kind="approve"][data-result="refused"][data-who="bob"]"#) == 1);
    assert!(rows(r#"#audit tr[data-kind="deploy"][data-result="refused"]"#) >= 1);
    assert!(rows(r#"#audit tr[data-kind="command"][data-result="refused"]"#) >= 1);
    b.screenshot("audit");
    b.goto(&format!("{}/audit?who=bob", base(&cloud)));
    b.wait_for("#audit", WAIT);
    assert!(
        b.all(r#"#audit tbody tr:not([data-who="bob"])"#).is_empty(),
        "only bob's rows"
    );
    assert!(!b.all(r#"#audit tbody tr[data-who="bob"]"#).is_empty());
}

fn curl(args: &[&str]) -> (String, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl (apt-get install curl)");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_console_and_api_are_https_by_default_and_plain_http_only_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded_with_args(&dir.path().join("cloud"), &["--https"]);
    let ca = cloud.pki().join("console.crt");
    let ca = ca.to_str().unwrap();
    let url = |path: &str| format!("https://127.0.0.1:{}{path}", cloud.api);

    // The certificate made on first start verifies for 127.0.0.1; no token, no answer.
    let (body, err) = curl(&["--cacert", ca, &url("/v1/health")]);
    assert!(body.contains(r#""ok":true"#), "{body}{err}");
    let (body, _) = curl(&["--cacert", ca, &url("/v1/devices")]);
    assert!(body.contains("sign in first"), "{body}");
    let token = cloud::create_token(&cloud.dir, "tls", &["viewer"]);
    let (body, err) = curl(&[
        "--cacert",
        ca,
        "-H",
        &format!("Authorization: Bearer {token}"),
        &url("/v1/devices"),
    ]);
    assert_eq!(body.trim(), "[]", "{err}");
    // Without trusting it, a client refuses the connection; plain HTTP gets no answer.
    let (body, err) = curl(&[&url("/v1/health")]);
    assert!(body.is_empty() && err.contains("certificate"), "{body}{err}");
    assert!(!matches!(
        cloud::http("GET", cloud.api, "/v1/health", None),
        Ok((200, _))
    ));

    // The session cookie is Secure, HttpOnly and SameSite=Strict under TLS.
    let password = cloud.user("ada", &["viewer"]);
    let (head, err) = curl(&[
        "--cacert",
        ca,
        "-i",
        "-H",
        &format!("Origin: https://127.0.0.1:{}", cloud.api),
        "--data-urlencode",
        "user=ada",
        "--data-urlencode",
        &format!("password={password}"),
        &url("/login"),
    ]);
    let cookie = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no cookie: {head}{err}"));
    for part in ["HttpOnly", "SameSite=Strict", "Secure"] {
        assert!(cookie.contains(part), "{cookie}");
    }

    // Plain HTTP is refused on an address other machines reach, unless the insecure flag says so.
    let other = dir.path().join("other");
    let mqtt = format!("127.0.0.1:{}", cloud::free_port());
    let out = cloud::admin(
        &other,
        &["--plain-http", "--listen", "0.0.0.0:1", "--mqtt-listen", &mqtt],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--insecure-http"), "{err}");
}

#[test]
fn a_sign_on_proxys_header_is_believed_only_from_the_proxy_and_its_roles_file_decides() {
    let dir = tempfile::tempdir().unwrap();
    let roles = write(
        dir.path(),
        "roles.yaml",
        "users:\n  alice: [approver]\n  olga: [operator]\ndefault: [viewer]\n",
    );
    let cloud = Cloud::embedded_with_args(
        &dir.path().join("cloud"),
        &[
            "--auth-proxy-header",
            "X-Remote-User",
            "--auth-proxy-from",
            "127.0.0.1",
            "--auth-proxy-roles",
            &roles,
        ],
    );
    let url = |path: &str| format!("http://127.0.0.1:{}{path}", cloud.api);
    let start = json!({"type": "start", "workflow": "w"}).to_string();
    let as_user = |from: &str, user: &str, path: &str, body: Option<&str>| {
        let mut args = vec!["--interface", from, "-H", "Content-Type: application/json"];
        let header = format!("X-Remote-User: {user}");
        // The proxy passes the browser's Origin on; it ends TLS, and says so.
        let origin = format!("Origin: https://127.0.0.1:{}", cloud.api);
        args.extend([
            "-H",
            &header,
            "-H",
            &origin,
            "-H",
            "X-Forwarded-Proto: https",
            "-w",
            "\n%{http_code}",
        ]);
        if let Some(b) = body {
            args.extend(["-X", "POST", "-d", b]);
        }
        let target = url(path);
        args.push(&target);
        let (out, err) = curl(&args);
        let (body, code) = out.rsplit_once('\n').unwrap_or_else(|| panic!("{out}{err}"));
        (code.to_string(), body.to_string())
    };
    // From the proxy: the user it names, with the roles the file gives.
    let (code, body) = as_user("127.0.0.1", "zed", "/v1/devices", None);
    assert_eq!(code, "200", "{body}");
    let (code, body) = as_user("127.0.0.1", "alice", "/v1/devices/gw/commands", Some(&start));
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("alice (approver) may not start runs"), "{body}");
    let (code, body) = as_user("127.0.0.1", "olga", "/v1/devices/gw/commands", Some(&start));
    assert_ne!(code, "403", "an operator may start: {body}");
    // The same header from anywhere else is refused, not believed.
    let (code, body) = as_user("127.0.0.2", "olga", "/v1/devices", None);
    assert_eq!(code, "401", "{body}");
    assert!(body.contains("only believed from the sign-on proxy"), "{body}");
    let who: Vec<String> = cloud
        .audit()
        .iter()
        .map(|a| a["who"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        who.contains(&"alice".to_string()) && who.contains(&"olga".to_string()),
        "{who:?}"
    );
    // Colour codes only on a terminal: the harness's log file gets plain text (issue 19).
    assert!(!cloud.log().contains('\u{1b}'), "{}", cloud.log());
}
