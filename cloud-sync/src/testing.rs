//! A throwaway Postgres server for tests and benchmarks: `initdb` on a temporary directory and
//! `pg_ctl start` on a free port, as the tests start Mosquitto. Needs Debian's `postgresql`
//! package (`.ci/run` installs it). As root, the server runs as the `postgres` user, since
//! Postgres refuses to run as root.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running Postgres server; stopped (immediately) when dropped.
pub struct TestPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// The user the server runs as when we are root.
    run_as: Option<String>,
    fsync: bool,
}

/// Where `initdb` and `pg_ctl` are: on `PATH`, else the newest `/usr/lib/postgresql/*/bin`.
fn bin_dir() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            // Debian links a few tools onto PATH; the rest (createdb) sit beside the real one.
            if let Ok(real) = std::fs::canonicalize(dir.join("initdb"))
                && let Some(parent) = real.parent()
                && parent.join("pg_ctl").is_file()
                && parent.join("createdb").is_file()
            {
                return Ok(parent.to_path_buf());
            }
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| "Postgres is required: apt-get install postgresql (.ci/run installs it)".to_string())?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    found.sort();
    found
        .pop()
        .ok_or_else(|| "no initdb under /usr/lib/postgresql: apt-get install postgresql".into())
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

impl TestPostgres {
    /// Starts a server with fsync off (tests: nothing here survives a power cut anyway).
    pub fn start() -> Result<TestPostgres, String> {
        Self::start_with(false)
    }

    /// Starts a server; `fsync` as a production server has it (benchmarks).
    pub fn start_with(fsync: bool) -> Result<TestPostgres, String> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("outpost-pg")
            .tempdir()
            .map_err(|e| e.to_string())?;
        // SAFETY: geteuid has no preconditions.
        let run_as = (unsafe { libc::geteuid() } == 0).then(|| "postgres".to_string());
        if run_as.is_some() {
            let status = Command::new("chown")
                .args(["postgres:", &dir.path().display().to_string()])
                .status()
                .map_err(|e| e.to_string())?;
            if !status.success() {
                return Err("cannot hand the test cluster's directory to the postgres user".into());
            }
        }
        let pg = TestPostgres {
            dir,
            bin,
            port: free_port()?,
            run_as,
            fsync,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data().display().to_string(),
                "-U",
                "outpost",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-instructions",
            ],
        )?;
        pg.start_again()?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory the cluster lives in (its log is `log` there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(tool);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd.args(args).output().map_err(|e| format!("{tool}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{tool} {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Starts the server (again, after `stop`), waiting until it accepts connections.
    pub fn start_again(&self) -> Result<(), String> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync={}",
            self.port,
            self.dir.path().display(),
            if self.fsync { "on" } else { "off" }
        );
        let log = self.dir.path().join("log").display().to_string();
        let data = self.data().display().to_string();
        self.run(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-o", &opts, "-w", "-t", "60", "start"],
        )
    }

    /// Stops the server (fast shutdown: connections are cut, committed data stays).
    pub fn stop(&self) -> Result<(), String> {
        let data = self.data().display().to_string();
        self.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"])
    }

    /// A new, empty database; returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "outpost", name])
            .output()
            .map_err(|e| format!("createdb: {e}"))?;
        if !out.status.success() {
            return Err(format!("createdb {name}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(self.url(name))
    }

    /// The URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://outpost@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let data = self.data().display().to_string();
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }
}
