//! A real headless Chromium driven over W3C WebDriver (Debian's `chromium` and `chromium-driver`).
//! The protocol is a handful of JSON calls over HTTP, so the harness speaks it with the same small
//! client it uses for the cloud's API instead of pulling in a WebDriver crate and its URL stack.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::cloud::{free_port, http};

/// The W3C key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process and one browser session.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    /// Where screenshots go (`target/console-screenshots`).
    pub shots: PathBuf,
    _profile: tempfile::TempDir,
}

fn find(bins: &[&str]) -> Option<PathBuf> {
    bins.iter().map(PathBuf::from).find(|p| p.exists())
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session with a 1400×`height` window.
    pub fn start(height: u32) -> Browser {
        Self::start_in(height, None)
    }

    /// As `start`, with the browser's time zone set (`TZ`, e.g. `Asia/Tokyo`).
    pub fn start_in(height: u32, time_zone: Option<&str>) -> Browser {
        let driver_bin = find(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"])
            .expect("chromedriver is missing: apt-get install chromium chromium-driver (.ci/run does)");
        let chromium = find(&["/usr/bin/chromium", "/usr/lib/chromium/chromium"])
            .expect("chromium is missing: apt-get install chromium chromium-driver (.ci/run does)");
        let port = free_port();
        let mut driver = Command::new(driver_bin);
        if let Some(tz) = time_zone {
            // Chromium inherits it from chromedriver.
            driver.env("TZ", tz);
        }
        let driver = driver
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let profile = tempfile::tempdir().expect("profile dir");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, v)) = http("GET", port, "/status", None)
                && v["value"]["ready"] == true
            {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        // The flags keep Chromium from reaching out to Google's services, which this machine's
        // closed network refuses (slowly).
        let args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            format!("--window-size=1400,{height}"),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let (code, v) = http("POST", port, "/session", Some(&caps.to_string())).expect("new session");
        assert_eq!(code, 200, "cannot open a browser session: {v}");
        let session = v["value"]["sessionId"].as_str().expect("session id").to_string();
        let exe = std::env::current_exe().expect("test executable");
        let shots = exe
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .expect("target dir")
            .join("console-screenshots");
        std::fs::create_dir_all(&shots).expect("screenshot dir");
        Browser {
            driver,
            port,
            session,
            shots,
            _profile: profile,
        }
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let body = (method == "POST").then(|| body.to_string());
        let path = format!("/session/{}{path}", self.session);
        let (code, v) = http(method, self.port, &path, body.as_deref()).expect("webdriver call");
        assert_eq!(code, 200, "webdriver {method} {path}: {v}");
        v["value"].clone()
    }

    /// Opens a URL and waits for the page to load.
    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", json!({"url": url}));
    }

    /// The current URL.
    pub fn url(&self) -> String {
        self.call("GET", "/url", Value::Null).as_str().unwrap_or("").to_string()
    }

    /// Elements matching a CSS selector (references).
    pub fn all(&self, css: &str) -> Vec<String> {
        let v = self.call("POST", "/elements", json!({"using": "css selector", "value": css}));
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until a CSS selector matches, returns the first element.
    pub fn wait_for(&self, css: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.all(css).into_iter().next() {
                return e;
            }
            if Instant::now() > deadline {
                let _ = self.screenshot(&format!(
                    "timeout-{}",
                    css.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
                ));
                panic!("{css} did not appear within {timeout:?} on {}", self.url());
            }
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    /// The visible text of an element.
    pub fn text(&self, element: &str) -> String {
        self.call("GET", &format!("/element/{element}/text"), Value::Null)
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// The text of the first match of a selector ("" when none). Read in one script: a live
    /// refresh may swap the element between finding it and reading it (a stale reference).
    pub fn text_of(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/execute/sync",
            json!({"script": "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", "args": [css]}),
        );
        v.as_str().unwrap_or("").to_string()
    }

    /// Clicks an element.
    pub fn click(&self, element: &str) {
        self.call("POST", &format!("/element/{element}/click"), json!({}));
    }

    /// Types into an element (for a file input: a path to upload).
    pub fn type_into(&self, element: &str, text: &str) {
        self.call("POST", &format!("/element/{element}/value"), json!({"text": text}));
    }

    /// Clears a text field.
    pub fn clear(&self, element: &str) {
        self.call("POST", &format!("/element/{element}/clear"), json!({}));
    }

    /// Runs JavaScript in the page and returns its value.
    pub fn js(&self, script: &str) -> Value {
        self.call("POST", "/execute/sync", json!({"script": script, "args": []}))
    }

    /// Saves a PNG of the whole page as `target/console-screenshots/NAME.png` (the window grows
    /// to the page's height for the shot, then shrinks back); returns its path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let rect = self.call("GET", "/window/rect", Value::Null);
        let page = self
            .js("return Math.ceil(document.documentElement.scrollHeight)")
            .as_u64()
            .unwrap_or(0);
        let chrome = rect["height"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(self.js("return window.innerHeight").as_u64().unwrap_or(0));
        let tall = (page + chrome).clamp(rect["height"].as_u64().unwrap_or(0), 6000);
        self.call("POST", "/window/rect", json!({"width": rect["width"], "height": tall}));
        let b64 = self.call("GET", "/screenshot", Value::Null);
        self.call(
            "POST",
            "/window/rect",
            json!({"width": rect["width"], "height": rect["height"]}),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap_or(""))
            .expect("screenshot is base64");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let path = format!("/session/{}", self.session);
        let _ = http("DELETE", self.port, &path, None);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
