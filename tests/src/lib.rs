//! Harness for end-to-end tests: start the real `outpost` binary, talk to it through its CLI,
//! kill it with SIGKILL, restart it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod browser;
pub mod chaos;
pub mod cloud;

/// Path of the `outpost` binary: `$OUTPOST_BIN`, or the one cargo built next to this test.
pub fn outpost_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("OUTPOST_BIN") {
        return PathBuf::from(p);
    }
    let bin = bin_dir().join("outpost");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (which builds it) or set OUTPOST_BIN",
        bin.display()
    );
    bin
}

/// The directory cargo puts binaries in: a test runs from `target/<profile>/deps/`, the chaos
/// binary from `target/<profile>/` itself.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("executable directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// A command that runs the `outpost` binary: the binary itself, or `$OUTPOST_RUNNER` with the
/// binary as its argument (e.g. `qemu-aarch64 -L /usr/aarch64-linux-gnu` to test an ARM build).
pub fn outpost_command() -> Command {
    let bin = outpost_bin();
    match std::env::var("OUTPOST_RUNNER") {
        Ok(runner) if !runner.trim().is_empty() => {
            let mut parts = runner.split_whitespace();
            let mut cmd = Command::new(parts.next().unwrap_or_default());
            cmd.args(parts).arg(bin);
            cmd
        }
        _ => Command::new(bin),
    }
}

/// A running `outpost run` process with its own data directory.
pub struct Agent {
    /// Data directory.
    pub dir: PathBuf,
    child: Option<Child>,
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

impl Agent {
    /// Starts an agent on `dir` and waits until its API answers.
    pub fn start(dir: &Path, extra: &[&str]) -> Agent {
        Self::start_with_env(dir, extra, &[])
    }

    /// Starts an agent with extra environment variables.
    pub fn start_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        let mut a = Agent {
            dir: dir.to_path_buf(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        a.restart();
        a
    }

    /// Starts the process again (after a kill).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        std::fs::create_dir_all(&self.dir).expect("data dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("agent log");
        // Tests that are not about security sync unsigned over loopback; a gateway enrolled by
        // the test (it has identity/device.key) runs as shipped: signed, and TLS if its URL says.
        let mut extra = self.extra.clone();
        if extra.iter().any(|a| a == "--broker") && !self.dir.join("identity/device.key").exists() {
            extra.push("--insecure-unsigned".into());
        }
        let child = outpost_command()
            .arg("run")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(&extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn outpost run");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.cli(&["status"]).status.success() {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("agent exited during start-up with {status}; log:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "agent did not come up; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// SIGKILL, and reap the process.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            c.wait().expect("reap");
        }
    }

    /// SIGTERM, and wait for the process to exit; returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        c.wait().ok()
    }

    /// Runs an `outpost` CLI command against this agent. A command the agent answers with
    /// "try again" (its journal is reopening after a storage error, a moment's state while a
    /// disk is full) is run again for up to 10 s, as its user would.
    pub fn cli(&self, args: &[&str]) -> Output {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = cli(&self.dir, args);
            let transient = !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("; try again");
            if !transient || Instant::now() > deadline {
                return out;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a CLI command with `--json`, asserts success, returns the parsed output.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "outpost {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON output")
    }

    /// CPU time (user + system) the process has used, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("proc stat");
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A running `outpost modbus-sim` (an in-memory PLC) on a free loopback port, with its write log.
pub struct ModbusSim {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
}

/// Starts an `outpost` simulator subcommand; returns it, its first (listening) line and a log
/// of every later JSON line it prints.
fn spawn_sim(args: &[&str]) -> (Child, Value, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use std::io::BufRead;
    let mut child = outpost_command()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn simulator");
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first: Value = serde_json::from_str(&lines.next().expect("listening line").expect("read")).expect("JSON");
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                sink.lock().unwrap().push(v);
            }
        }
    });
    (child, first, log)
}

impl ModbusSim {
    /// Starts the simulator with extra flags (`--busy-first`, `--delay-ms`, `--limit`, `--clamp`).
    pub fn start(flags: &[&str]) -> ModbusSim {
        let mut args = vec!["modbus-sim", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(flags);
        let (child, first, log) = spawn_sim(&args);
        let addr = first["listening"].as_str().expect("listening address").to_string();
        ModbusSim { child, addr, log }
    }

    /// Every write so far, in order.
    pub fn writes(&self) -> Vec<Value> {
        self.log.lock().unwrap().clone()
    }
}

/// A running `outpost opcua-sim` (an OPC UA server) with its write log.
pub struct OpcuaSim {
    child: Child,
    /// `opc.tcp://127.0.0.1:PORT/`.
    pub url: String,
    /// The port, to start it again on the same one.
    pub port: u16,
    log: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
}

impl OpcuaSim {
    /// Starts the simulator on `port` (0: a free one) with its flags (`--node`, `--clamp`, `--user`).
    pub fn start(port: u16, flags: &[&str]) -> OpcuaSim {
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["opcua-sim", "--listen", &listen];
        args.extend_from_slice(flags);
        let (child, first, log) = spawn_sim(&args);
        let url = first["listening"].as_str().expect("listening url").to_string();
        let port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse().ok())
            .expect("port");
        OpcuaSim { child, url, port, log }
    }

    /// Every write so far, in order.
    pub fn writes(&self) -> Vec<Value> {
        self.lines("write")
    }

    /// Every method call so far (`--method`), in order.
    pub fn calls(&self) -> Vec<Value> {
        self.lines("call")
    }

    fn lines(&self, key: &str) -> Vec<Value> {
        let log = self.log.lock().unwrap();
        log.iter().filter(|l| l.get(key).is_some()).cloned().collect()
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OpcuaSim {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Drop for ModbusSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs an `outpost` CLI command with `OUTPOST_DATA_DIR=dir`.
pub fn cli(dir: &Path, args: &[&str]) -> Output {
    outpost_command()
        .args(args)
        .env("OUTPOST_DATA_DIR", dir)
        .env_remove("OUTPOST_SOCKET")
        .output()
        .expect("run outpost")
}

/// Writes a file into `dir` and returns its path as a string.
pub fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write file");
    p.to_string_lossy().into_owned()
}

/// Connects to a local port, refusing the connection a socket makes to itself.
///
/// Polling a port nobody listens on yet can succeed: when the kernel picks that very port as
/// the probe's own source port, TCP's simultaneous open connects the socket to itself. A harness
/// that took that for "listening" raced the service it waited for.
pub fn connect_local(port: u16) -> std::io::Result<std::net::TcpStream> {
    let s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    if s.local_addr()? == s.peer_addr()? {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("port {port}: connected to itself, nobody listens"),
        ));
    }
    Ok(s)
}

/// Polls `f` until it returns `Some`, or panics after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The events of a run's history of one type for one step.
pub fn events<'a>(run: &'a Value, kind: &str, step: &str) -> Vec<&'a Value> {
    run["history"]
        .as_array()
        .map(|h| h.iter().filter(|e| e["type"] == kind && e["step"] == step).collect())
        .unwrap_or_default()
}

/// A run's history events of type `kind`, whatever their step (or none).
pub fn events_of<'a>(run: &'a Value, kind: &str) -> Vec<&'a Value> {
    run["history"]
        .as_array()
        .map(|h| h.iter().filter(|e| e["type"] == kind).collect())
        .unwrap_or_default()
}

/// Milliseconds since the epoch of an RFC 3339 timestamp as printed by the agent.
pub fn ts_ms(v: &Value) -> u64 {
    let s = v.as_str().expect("timestamp string");
    humantime_parse(s)
}

fn humantime_parse(s: &str) -> u64 {
    // 2026-11-25T12:54:25.354Z
    let (date, time) = s.trim_end_matches('Z').split_once('T').expect("RFC 3339");
    let d: Vec<i64> = date.split('-').map(|x| x.parse().expect("date")).collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms.split(':').map(|x| x.parse().expect("time")).collect();
    let ms: i64 = format!("{frac:0<3}")[..3].parse().expect("millis");
    // Days from civil date (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2]) * 1000 + ms) as u64
}

/// A Mosquitto broker on a free loopback port, with persistence in its own directory, stopped on
/// drop. Panics with how to install it when the binary is missing: no test skips silently.
pub struct Mosquitto {
    /// Port it listens on.
    pub port: u16,
    child: Option<Child>,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

fn mosquitto_bin() -> &'static str {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("mosquitto is required for the MQTT tests: apt-get install mosquitto (.ci/run installs it)")
}

impl Mosquitto {
    /// Starts a broker and waits until it accepts connections.
    pub fn start() -> Mosquitto {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = cloud::free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nautosave_interval 1\nmax_inflight_messages 100\nmax_queued_messages 100000\nmax_packet_size {}\nlog_dest stderr\n",
                dir.path().display(),
                outpost_shared::protocol::MAX_PACKET_BYTES
            ),
        )
        .expect("write mosquitto.conf");
        let mut m = Mosquitto {
            port,
            child: None,
            conf,
            _dir: dir,
        };
        m.restart();
        m
    }

    /// Starts a broker from the shipped `packaging/mosquitto/outpost-tls.conf`, with its paths
    /// pointed at `pki` (the fleet PKI directory) and `acl`, on a free port.
    pub fn start_tls(pki: &Path, acl: &Path) -> Mosquitto {
        Self::start_shipped("outpost-tls.conf", pki, acl)
    }

    /// Starts a broker from the shipped `packaging/mosquitto/CONF` (`outpost-tls.conf`,
    /// `outpost-replicas.conf`), with its paths pointed at `pki` and `acl`.
    pub fn start_shipped(conf: &str, pki: &Path, acl: &Path) -> Mosquitto {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = cloud::free_port();
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../packaging/mosquitto")
            .join(conf);
        let text = std::fs::read_to_string(&shipped).expect("packaging/mosquitto/ configuration");
        let text = text
            .replace("/etc/outpost/pki/", &format!("{}/", pki.display()))
            .replace("/etc/mosquitto/conf.d/outpost.acl", &acl.display().to_string())
            .replace("listener 8883", &format!("listener {port} 127.0.0.1"))
            .replace(
                "persistence true",
                &format!("persistence true\npersistence_location {}/", dir.path().display()),
            );
        let conf = dir.path().join("mosquitto.conf");
        // `user root`: as root, Mosquitto would switch to its own user, which cannot read the
        // test's 0600 keys (as any other user the setting does nothing).
        std::fs::write(
            &conf,
            format!(
                "{text}\nuser root\nlog_dest file {}/mosquitto.log\n",
                dir.path().display()
            ),
        )
        .expect("write mosquitto.conf");
        let mut m = Mosquitto {
            port,
            child: None,
            conf,
            _dir: dir,
        };
        m.restart();
        m
    }

    /// The broker's log (for `start_tls`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Starts the broker again after `stop` (sessions and retained messages persist).
    pub fn restart(&mut self) {
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        let port = self.port;
        eventually(Duration::from_secs(10), "mosquitto to listen", || {
            connect_local(port).ok()
        });
    }

    /// Stops the broker gracefully (it saves its persistence file).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Publishes one QoS 1 message and waits for the broker's acknowledgement.
    pub fn publish(&self, topic: &str, payload: &str) {
        mqtt_publish(self.port, topic, payload.as_bytes().to_vec());
    }
}

/// Publishes one QoS 1 message to the broker on `port` and waits for its acknowledgement.
pub fn mqtt_publish(port: u16, topic: &str, payload: Vec<u8>) {
    if let Err(e) = mqtt_try_publish(port, topic, payload) {
        panic!("publish to the broker failed: {e}");
    }
}

/// Publishes one QoS 1 message with no client-side size limit; `Err` says how the broker
/// refused it (an oversized packet gets the connection closed).
pub fn mqtt_try_publish(port: u16, topic: &str, payload: Vec<u8>) -> Result<(), String> {
    let id = format!("test-pub-{}", fastrand::u32(..));
    let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    opts.set_max_packet_size(64 << 20, 64 << 20);
    let (client, mut conn) = rumqttc::Client::new(opts, 10);
    client
        .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let outcome = loop {
        match conn.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => break Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => break Err(e.to_string()),
            Err(_) if std::time::Instant::now() > deadline => break Err("no acknowledgement".into()),
            Err(_) => {}
        }
    };
    let _ = client.disconnect();
    outcome
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A raw MQTT session as an attacker (or any client) would open it: over TLS with the given
/// CA, certificate and key when `tls` is given, else in plain text. Returns the client and
/// its connection (the caller polls it).
pub fn mqtt_session(
    port: u16,
    client_id: &str,
    tls: Option<&outpost_shared::tls::TlsFiles>,
) -> Result<(rumqttc::Client, rumqttc::Connection), String> {
    let mut opts = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_max_packet_size(64 << 20, 64 << 20);
    opts.set_keep_alive(Duration::from_secs(30));
    if let Some(files) = tls {
        let config = outpost_shared::tls::client_config(files).map_err(|e| e.to_string())?;
        opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
            config,
        )));
    }
    Ok(rumqttc::Client::new(opts, 100))
}

/// How a session ended up within `wait`: connected (`Ok`) or the error that closed it.
pub fn mqtt_connects(conn: &mut rumqttc::Connection, wait: Duration) -> Result<(), String> {
    let deadline = Instant::now() + wait;
    loop {
        match conn.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) if Instant::now() > deadline => return Err("no answer".into()),
            Err(_) => {}
        }
    }
}

/// Publishes one QoS 1 message on an open session and says whether the broker acknowledged it
/// (`Err`: it closed the connection instead).
pub fn mqtt_session_publish(
    client: &rumqttc::Client,
    conn: &mut rumqttc::Connection,
    topic: &str,
    payload: Vec<u8>,
) -> Result<(), String> {
    client
        .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match conn.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) if Instant::now() > deadline => return Err("no acknowledgement".into()),
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_timestamps() {
        assert_eq!(super::humantime_parse("1970-01-01T00:00:01.500Z"), 1500);
        assert_eq!(super::humantime_parse("2023-11-14T22:13:20.000Z"), 1_700_000_000_000);
    }
}
