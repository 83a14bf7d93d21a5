//! Harness for the sync tests: the real `outpost-cloud` binary, a TCP proxy that can cut and
//! blackhole the agent's link, and a minimal HTTP client for the cloud's API.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A free loopback port.
///
/// Never the same port twice in this process: the kernel may hand a port it just freed out
/// again, and a cloud whose API and broker got one port let the harness's probe reach the
/// broker while the API failed to listen.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

fn cloud_bin() -> PathBuf {
    let bin = crate::bin_dir().join("outpost-cloud");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// Runs `outpost-cloud --data-dir DIR ARGS` (a `pki`, `devices`, `users` or `tokens` command).
pub fn admin(dir: &Path, args: &[&str]) -> std::process::Output {
    admin_with_stdin(dir, args, "")
}

/// The store URL a cloud's data directory is bound to when the suite runs on Postgres
/// (`OUTPOST_TEST_STORE=postgres`): its own database, named in `harness.store-url`.
fn store_url(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("harness.store-url")).ok()
}

/// True when the suite runs its clouds on Postgres (`OUTPOST_TEST_STORE=postgres`; CI runs the
/// sync, console and command tests that way too).
pub fn on_postgres() -> bool {
    std::env::var("OUTPOST_TEST_STORE").is_ok_and(|v| v == "postgres")
}

/// Runs an admin command with `input` on its standard input (`--password-stdin`).
pub fn admin_with_stdin(dir: &Path, args: &[&str], input: &str) -> std::process::Output {
    let mut cmd = Command::new(cloud_bin());
    if let Some(url) = store_url(dir) {
        cmd.env("OUTPOST_CLOUD_STORE", url);
    }
    let mut child = cmd
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("outpost-cloud admin command");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    child.wait_with_output().expect("outpost-cloud admin command")
}

/// The API token each running cloud's harness uses, by API port: `http` sends it, so the suites
/// that are not about access control talk to the API as an admin.
static TOKENS: Mutex<Vec<(u16, String)>> = Mutex::new(Vec::new());

/// The harness token for the API on `port`, if one is registered.
pub fn token_for(port: u16) -> Option<String> {
    TOKENS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|(p, _)| *p == port)
        .map(|(_, t)| t.clone())
}

/// Creates an API token with `roles` through the admin command and returns it.
pub fn create_token(dir: &Path, name: &str, roles: &[&str]) -> String {
    let mut args = vec!["tokens", "create", "--name", name];
    for r in roles {
        args.extend(["--role", r]);
    }
    let out = admin(dir, &args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tokens create: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find(|l| l.starts_with("opt_"))
        .unwrap_or_else(|| panic!("no token in: {text}"))
        .to_string()
}

/// A running `outpost-cloud`: with its embedded broker, or against an external one.
pub struct Cloud {
    /// Data directory.
    pub dir: PathBuf,
    /// HTTP API port.
    pub api: u16,
    /// MQTT port (the embedded broker's, or the external broker's).
    pub mqtt: u16,
    external: Option<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    secure: bool,
    args: Vec<String>,
    /// The Postgres server this cloud's store lives on, when the suite runs on Postgres.
    postgres: Option<std::sync::Arc<outpost_cloud_sync::testing::TestPostgres>>,
}

impl Cloud {
    /// Starts cloud-sync with its embedded broker.
    pub fn embedded(dir: &Path) -> Cloud {
        Self::start(dir, None, free_port())
    }

    /// Starts cloud-sync with its embedded broker on a given port.
    pub fn start_on(dir: &Path, mqtt_port: u16) -> Cloud {
        Self::start(dir, None, mqtt_port)
    }

    /// Starts cloud-sync against an external broker on `mqtt_port`.
    pub fn external(dir: &Path, mqtt_port: u16) -> Cloud {
        Self::start(dir, Some(format!("mqtt://127.0.0.1:{mqtt_port}")), mqtt_port)
    }

    /// Starts cloud-sync with its embedded broker and extra environment variables.
    pub fn embedded_with_env(dir: &Path, env: &[(&str, &str)]) -> Cloud {
        Self::start_env(dir, None, free_port(), env)
    }

    fn start(dir: &Path, external: Option<String>, mqtt: u16) -> Cloud {
        Self::start_env(dir, external, mqtt, &[])
    }

    fn start_env(dir: &Path, external: Option<String>, mqtt: u16, env: &[(&str, &str)]) -> Cloud {
        Self::launch(dir, external, mqtt, env, false)
    }

    fn launch(dir: &Path, external: Option<String>, mqtt: u16, env: &[(&str, &str)], secure: bool) -> Cloud {
        let mut c = Cloud {
            dir: dir.to_path_buf(),
            api: free_port(),
            mqtt,
            external,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            child: None,
            secure,
            args: Vec::new(),
            postgres: None,
        };
        c.restart();
        c
    }

    /// Starts cloud-sync with its embedded broker and extra command-line arguments; the API is
    /// plain HTTP on loopback unless they hold `--https` (the harness's own marker: HTTPS, as
    /// shipped).
    pub fn embedded_with_args(dir: &Path, args: &[&str]) -> Cloud {
        Self::embedded_with(dir, args, &[])
    }

    /// Starts cloud-sync with its embedded broker, extra arguments and environment variables.
    pub fn embedded_with(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Cloud {
        let mut c = Cloud {
            dir: dir.to_path_buf(),
            api: free_port(),
            mqtt: free_port(),
            external: None,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            child: None,
            secure: false,
            args: args.iter().map(|a| a.to_string()).collect(),
            postgres: None,
        };
        c.restart();
        c
    }

    /// Starts replica `n` of a scaled-out cloud-sync: the store at `store_url` (Postgres), the
    /// broker on `mqtt_port` (Mosquitto), device traffic through the shared subscription group
    /// `outpost-cloud`, its own client id.
    pub fn replica(dir: &Path, mqtt_port: u16, store_url: &str, n: usize) -> Cloud {
        let url = format!("mqtt://127.0.0.1:{mqtt_port}");
        Self::launch_replica(dir, &url, mqtt_port, store_url, &format!("replica-{n}"), None)
    }

    /// Starts replica `n` as shipped for scale-out: TLS to the broker at `url` with its own
    /// certificate (`pki replica outpost-cloud-N` in the PKI at `pki`, shared by the replicas),
    /// every message signed, the store at `store_url`, the shared subscription group.
    pub fn secure_replica(dir: &Path, url: &str, mqtt_port: u16, store_url: &str, n: usize, pki: &Path) -> Cloud {
        Self::launch_replica(dir, url, mqtt_port, store_url, &format!("outpost-cloud-{n}"), Some(pki))
    }

    /// A replica on `store_url` behind the broker at `url`: plain and unsigned without `pki`,
    /// as shipped (TLS, signatures, the shared PKI) with it.
    fn launch_replica(
        dir: &Path,
        url: &str,
        mqtt_port: u16,
        store_url: &str,
        client_id: &str,
        pki: Option<&Path>,
    ) -> Cloud {
        std::fs::create_dir_all(dir).expect("replica dir");
        std::fs::write(dir.join("harness.store-url"), store_url).expect("harness.store-url");
        let mut c = Cloud {
            dir: dir.to_path_buf(),
            api: free_port(),
            mqtt: mqtt_port,
            external: Some(url.to_string()),
            env: pki
                .map(|p| ("OUTPOST_CLOUD_PKI".to_string(), p.display().to_string()))
                .into_iter()
                .collect(),
            child: None,
            secure: pki.is_some(),
            args: ["--shared-group", "outpost-cloud", "--client-id", client_id]
                .iter()
                .map(|a| a.to_string())
                .collect(),
            postgres: None,
        };
        c.restart();
        c
    }

    /// Starts cloud-sync as shipped: its fleet PKI, the embedded broker behind TLS with client
    /// certificates and topic rules, every message signed.
    pub fn secure(dir: &Path) -> Cloud {
        Self::launch(dir, None, free_port(), &[], true)
    }

    /// Starts cloud-sync as shipped against an external TLS broker (`mqtts://…`).
    pub fn secure_external(dir: &Path, url: &str, mqtt_port: u16) -> Cloud {
        Self::launch(dir, Some(url.to_string()), mqtt_port, &[], true)
    }

    /// The fleet PKI directory.
    pub fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }

    /// Runs `outpost-cloud ARGS` (a `pki` or `devices` command) on this cloud's data directory.
    pub fn admin(&self, args: &[&str]) -> std::process::Output {
        admin(&self.dir, args)
    }

    /// Adds console user `name` with `roles` and a known password (returned).
    pub fn user(&self, name: &str, roles: &[&str]) -> String {
        let password = format!("{name}-password-1234");
        let mut args = vec!["users", "add", name, "--password-stdin"];
        for r in roles {
            args.extend(["--role", r]);
        }
        let out = admin_with_stdin(&self.dir, &args, &format!("{password}\n"));
        assert!(
            out.status.success(),
            "users add: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        password
    }

    /// Signs `browser` in as `name` (made with `user`) on the sign-in page.
    pub fn sign_in(&self, b: &crate::browser::Browser, name: &str, password: &str) {
        b.goto(&format!("http://127.0.0.1:{}/login", self.api));
        let user = b.wait_for("#login-form input[name=user]", Duration::from_secs(10));
        b.type_into(&user, name);
        let pass = b.wait_for("#login-form input[name=password]", Duration::from_secs(10));
        b.type_into(&pass, password);
        let go = b.wait_for("#login-form button", Duration::from_secs(10));
        b.click(&go);
        crate::eventually(Duration::from_secs(10), "signed in", || {
            (!b.url().contains("/login")).then_some(())
        });
    }

    /// Enrols a gateway as the README says: `outpost keygen` in its data directory, `pki sign`
    /// here, `outpost enroll` there.
    pub fn enroll(&self, agent_dir: &Path, device: &str) {
        std::fs::create_dir_all(agent_dir).expect("agent dir");
        let out = crate::cli(agent_dir, &["keygen", "--device-id", device]);
        assert!(out.status.success(), "keygen: {}", String::from_utf8_lossy(&out.stderr));
        let csr = agent_dir.join("identity/device.csr");
        let cert = agent_dir.join(format!("identity/{device}.crt"));
        let out = self.admin(&["pki", "sign", csr.to_str().unwrap(), "--out", cert.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "pki sign: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (ca, fleet) = (self.pki().join("ca.crt"), self.pki().join("fleet.pub"));
        let out = crate::cli(
            agent_dir,
            &[
                "enroll",
                "--cert",
                cert.to_str().unwrap(),
                "--ca",
                ca.to_str().unwrap(),
                "--fleet-key",
                fleet.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "enroll: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `mqtts://127.0.0.1:PORT` (the secure broker).
    pub fn mqtts_url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.mqtt)
    }

    /// Starts the process again (after a kill), on the same ports.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "cloud already running");
        std::fs::create_dir_all(&self.dir).expect("cloud dir");
        if on_postgres() && self.postgres.is_none() && store_url(&self.dir).is_none() {
            let pg = outpost_cloud_sync::testing::TestPostgres::start().expect("start a test Postgres");
            let url = pg.create_database("cloud").expect("createdb");
            std::fs::write(self.dir.join("harness.store-url"), url).expect("harness.store-url");
            self.postgres = Some(std::sync::Arc::new(pg));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("cloud.log"))
            .expect("cloud log");
        let token_file = self.dir.join("harness.token");
        let token = match std::fs::read_to_string(&token_file) {
            Ok(t) => t,
            Err(_) => {
                // Named by port: replicas share one store, and token names are unique in it.
                let t = create_token(&self.dir, &format!("harness-{}", self.api), &["admin"]);
                std::fs::write(&token_file, &t).expect("harness token");
                t
            }
        };
        {
            let mut tokens = TOKENS.lock().unwrap_or_else(|p| p.into_inner());
            tokens.retain(|(p, _)| *p != self.api);
            tokens.push((self.api, token));
        }
        let mut cmd = Command::new(cloud_bin());
        if let Some(url) = store_url(&self.dir) {
            cmd.env("OUTPOST_CLOUD_STORE", url);
        }
        cmd.arg("--data-dir")
            .arg(&self.dir)
            .args(["--listen", &format!("127.0.0.1:{}", self.api)]);
        match &self.external {
            Some(url) => cmd.args(["--broker", url]),
            None => cmd.args(["--mqtt-listen", &format!("127.0.0.1:{}", self.mqtt)]),
        };
        if !self.secure {
            // The suites that are not about security keep their raw MQTT clients.
            cmd.args(["--insecure-plaintext", "--insecure-unsigned"]);
        }
        if !self.args.iter().any(|a| a == "--https") {
            cmd.arg("--plain-http");
        }
        let child = cmd
            .args(self.args.iter().filter(|a| *a != "--https"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn outpost-cloud");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let https = self.args.iter().any(|a| a == "--https");
        let up = |api: u16| match https {
            // A plain request cannot talk to the TLS port: wait for it to accept.
            true => crate::connect_local(api).is_ok(),
            false => http("GET", api, "/v1/health", None).is_ok(),
        };
        while !up(self.api) {
            assert!(Instant::now() < deadline, "cloud did not come up:\n{}", self.log());
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("cloud exited ({status}) before it listened:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        if store_url(&self.dir).is_some() && !https {
            let health = self.get("/v1/health");
            assert!(
                health["store_backend"]
                    .as_str()
                    .is_some_and(|b| b.starts_with("postgres ")),
                "the suite runs on Postgres but cloud-sync says {health}"
            );
        }
    }

    /// SIGKILL (with the embedded broker, the broker dies too).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            c.wait().expect("reap");
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process has not exited.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The cloud's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("cloud.log")).unwrap_or_default()
    }

    /// `mqtt://127.0.0.1:PORT` of the broker the agents should use.
    pub fn mqtt_url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.mqtt)
    }

    /// GET, asserting success.
    pub fn get(&self, path: &str) -> Value {
        let (code, v) = http("GET", self.api, path, None).unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert!(code < 300, "GET {path}: {code} {v}");
        v
    }

    /// A device as the API shows it, if cloud-sync knows it (and answers).
    pub fn device(&self, id: &str) -> Option<Value> {
        let (code, v) = http("GET", self.api, &format!("/v1/devices/{id}"), None).ok()?;
        (code == 200).then_some(v)
    }

    /// Waits until cloud-sync shows the device online (`true`) or offline (`false`).
    pub fn wait_presence(&self, id: &str, online: bool, timeout: Duration) -> Value {
        let what = format!("{id} to be {}", if online { "online" } else { "offline" });
        crate::eventually(timeout, &what, || self.device(id).filter(|d| d["online"] == online))
    }

    /// The audit trail as its export gives it (as the harness's admin), oldest first.
    pub fn audit(&self) -> Vec<Value> {
        let (code, v) = http("GET", self.api, "/v1/audit", None).expect("audit export");
        assert_eq!(code, 200, "{v}");
        let text = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
        text.lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    /// POST/PUT a JSON body; returns status and body.
    pub fn send(&self, method: &str, path: &str, body: &Value) -> (u16, Value) {
        http(method, self.api, path, Some(&body.to_string())).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        TOKENS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(p, _)| *p != self.api);
        self.kill9();
    }
}

/// Events stored for `device` so far (its `stored_seq`; 0 while the cloud does not know it).
pub fn stored(cloud: &Cloud, device: &str) -> u64 {
    cloud
        .device(device)
        .map(|d| d["stored_seq"].as_u64().unwrap_or(0))
        .unwrap_or(0)
}

/// A state machine that sets a value `visits` times, then ends: `visits + 3` events a run.
pub fn ticking_workflow(name: &str, visits: u32) -> String {
    format!(
        r#"
name: {name}
version: 1
kind: state_machine
steps:
  - id: tick
    action: set
    args: {{n: "{{{{ steps.tick.visits }}}}"}}
    choices:
      - when: steps.tick.visits >= {visits}
        next: done
    default: tick
  - id: done
    action: set
    args: {{ticks: "{{{{ steps.tick.visits }}}}"}}
    end: succeed
"#
    )
}

/// One HTTP/1.1 request with `Connection: close`, as the harness's admin (the port's
/// registered token); returns the status and the JSON body.
pub fn http(method: &str, port: u16, path: &str, body: Option<&str>) -> std::io::Result<(u16, Value)> {
    let auth = token_for(port).map(|t| format!("Authorization: Bearer {t}\r\n"));
    http_raw(
        method,
        port,
        path,
        body,
        auth.as_deref().unwrap_or(""),
        "application/json",
    )
}

/// One read, again when a signal interrupted it (the suite's children come and go).
fn read_some(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// One request with the given extra header lines (each ending in CRLF) and content type.
pub fn http_raw(
    method: &str,
    port: u16,
    path: &str,
    body: Option<&str>,
    headers: &str,
    content_type: &str,
) -> std::io::Result<(u16, Value)> {
    let mut s = crate::connect_local(port)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n{headers}Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    // Read the head, then exactly Content-Length bytes: some servers (chromedriver) keep the
    // connection open despite `Connection: close`.
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = read_some(&mut s, &mut buf)?;
        if n == 0 {
            break raw.len();
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    match length {
        Some(len) => {
            while raw.len() < head_end + len {
                let n = read_some(&mut s, &mut buf)?;
                if n == 0 {
                    break;
                }
                raw.extend_from_slice(&buf[..n]);
            }
        }
        None => {
            s.read_to_end(&mut raw)?;
        }
    }
    let rest = String::from_utf8_lossy(&raw[head_end.min(raw.len())..]).into_owned();
    let rest = rest.as_str();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {head}")))?;
    let v = serde_json::from_str(rest).unwrap_or(Value::String(rest.to_string()));
    Ok((code, v))
}

/// A TCP proxy between an agent and its broker that a test can cut: `cut` closes every
/// connection and blackholes new ones (accepted, never answered); `restore` forwards again.
pub struct Proxy {
    /// Port agents connect to.
    pub port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    /// Forwards 127.0.0.1:`port` → 127.0.0.1:`target`.
    pub fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listen");
        let port = listener.local_addr().expect("addr").port();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (up2, conns2) = (up.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !up2.load(Ordering::SeqCst) {
                    // Blackhole: hold the socket open and say nothing.
                    conns2.lock().unwrap().push(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                for s in [&client, &server] {
                    if let Ok(c) = s.try_clone() {
                        conns2.lock().unwrap().push(c);
                    }
                }
                pipe(client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                pipe(server, client);
            }
        });
        Proxy { port, up, conns }
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Drops every connection and blackholes new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Forwards new connections again (blackholed ones are closed so clients retry).
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// GETs a console page as text.
pub fn http_text(port: u16, path: &str) -> String {
    let (code, v) = http("GET", port, path, None).expect("console page");
    assert_eq!(code, 200, "GET {path}: {v}");
    v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())
}
