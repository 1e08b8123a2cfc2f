//! A real headless Chromium, driven over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`: commands on fd 3, answers and events on
//! fd 4, each message a JSON text ended by a NUL byte).
//!
//! Debian's `chromium` package; `.ci/run` installs it. Without it the
//! browser tests say they were skipped, except in CI, where they fail.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

/// How long one DevTools command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Browser {
    child: Child,
    commands: File,
    shared: Arc<Shared>,
    next_id: u64,
    /// The page's session (flattened target attachment).
    session: String,
    _profile: tempfile::TempDir,
}

#[derive(Default)]
struct Shared {
    state: Mutex<Received>,
    arrived: Condvar,
}

#[derive(Default)]
struct Received {
    replies: HashMap<u64, Value>,
    events: Vec<Value>,
    closed: bool,
}

/// Chromium's path, or `None` (and a line saying the test was skipped)
/// when it is not installed. In CI a missing browser fails the test.
pub fn chromium() -> Option<PathBuf> {
    let found = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .into_iter()
        .chain(["/usr/bin/chromium", "/usr/bin/chromium-browser"].map(PathBuf::from))
        .find(|path| path.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is missing in CI (.ci/run installs it)"
        );
        eprintln!("skipped: chromium is not installed (apt-get install chromium)");
    }
    found
}

impl Browser {
    /// Starts Chromium with one empty page, 1280×900.
    pub fn launch(chromium: &Path) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let (to_browser_read, to_browser_write) = pipe();
        let (from_browser_read, from_browser_write) = pipe();
        let mut command = Command::new(chromium);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-dev-shm-usage",
                "--remote-debugging-pipe",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // Moved out of the way first, so that neither lands on 3
                // or 4 before it is used.
                let read = libc::fcntl(to_browser_read, libc::F_DUPFD, 10);
                let write = libc::fcntl(from_browser_write, libc::F_DUPFD, 10);
                if read < 0 || write < 0 || libc::dup2(read, 3) < 0 || libc::dup2(write, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("start chromium");
        // SAFETY: these descriptors came from pipe2 and are owned here.
        unsafe {
            libc::close(to_browser_read);
            libc::close(from_browser_write);
        }
        let commands = unsafe { File::from_raw_fd(to_browser_write) };
        let answers = unsafe { File::from_raw_fd(from_browser_read) };
        let shared = Arc::new(Shared::default());
        {
            let shared = shared.clone();
            std::thread::spawn(move || read_messages(answers, &shared));
        }
        let mut browser = Browser {
            child,
            commands,
            shared,
            next_id: 1,
            session: String::new(),
            _profile: profile,
        };
        let target = browser.command(None, "Target.createTarget", json!({ "url": "about:blank" }));
        let attached = browser.command(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        );
        browser.session = attached["sessionId"].as_str().unwrap().to_owned();
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            browser.call(domain, json!({}));
        }
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
        );
        browser
    }

    /// A command to the page; its result.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.command(Some(&session), method, params)
    }

    fn command(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = message.to_string().into_bytes();
        bytes.push(0);
        self.commands.write_all(&bytes).expect("write to chromium");
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let mut received = self.shared.state.lock().unwrap();
        loop {
            if let Some(reply) = received.replies.remove(&id) {
                if let Some(error) = reply.get("error") {
                    panic!("{method}: {error}");
                }
                return reply["result"].clone();
            }
            assert!(!received.closed, "chromium went away during {method}");
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{method}: no answer within {COMMAND_TIMEOUT:?}"
            );
            received = self.shared.arrived.wait_timeout(received, left).unwrap().0;
        }
    }

    pub fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url }));
    }

    /// Evaluates `expression` in the page (promises awaited); its value.
    pub fn eval(&mut self, expression: &str) -> Value {
        self.try_eval(expression)
            .unwrap_or_else(|exception| panic!("{expression}: {exception}"))
    }

    /// The value, or the exception the expression threw.
    pub fn try_eval(&mut self, expression: &str) -> Result<Value, Value> {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
        );
        match result.get("exceptionDetails") {
            Some(exception) => Err(exception.clone()),
            None => Ok(result["result"]["value"].clone()),
        }
    }

    /// Polls `expression` until it is truthy (an exception counts as not
    /// yet: the page may still be loading); its value. Panics with `what`
    /// and the page's text after `within`.
    pub fn wait_for(&mut self, what: &str, expression: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let value = self.try_eval(expression);
            let truthy = value.as_ref().is_ok_and(|value| {
                !matches!(value, Value::Null | Value::Bool(false))
                    && *value != json!(0)
                    && *value != json!("")
            });
            if truthy {
                return value.unwrap();
            }
            if Instant::now() > deadline {
                let text = self.eval("document.body ? document.body.innerText : ''");
                panic!(
                    "{what}: not within {within:?} (last: {value:?}); script errors: {:?}; \
                     the page shows:\n{}",
                    self.page_errors(),
                    text.as_str().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Saves a PNG of the whole page.
    pub fn screenshot(&mut self, path: &Path) {
        let shot = self.call(
            "Page.captureScreenshot",
            json!({ "format": "png", "captureBeyondViewport": true }),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// Events of `method` received so far (`Page.javascriptDialogOpening`,
    /// `Runtime.exceptionThrown`, `Log.entryAdded`…).
    pub fn events(&self, method: &str) -> Vec<Value> {
        let received = self.shared.state.lock().unwrap();
        received
            .events
            .iter()
            .filter(|e| e["method"] == method)
            .map(|e| e["params"].clone())
            .collect()
    }

    /// Script errors the page threw and Content-Security-Policy refusals:
    /// a working page has none.
    pub fn page_errors(&self) -> Vec<String> {
        let thrown = self
            .events("Runtime.exceptionThrown")
            .into_iter()
            .map(|e| e["exceptionDetails"].to_string());
        let refused = self
            .events("Log.entryAdded")
            .into_iter()
            .map(|e| e["entry"]["text"].as_str().unwrap_or_default().to_owned())
            .filter(|text| text.contains("Content Security Policy"));
        thrown.chain(refused).collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pipe() -> (RawFd, RawFd) {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors.
    let result = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(result, 0, "pipe2: {}", std::io::Error::last_os_error());
    (fds[0], fds[1])
}

fn read_messages(answers: File, shared: &Shared) {
    let mut reader = BufReader::new(answers);
    let mut message = Vec::new();
    loop {
        message.clear();
        match reader.read_until(0, &mut message) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if message.last() == Some(&0) {
            message.pop();
        }
        let Ok(value) = serde_json::from_slice::<Value>(&message) else {
            continue;
        };
        let mut received = shared.state.lock().unwrap();
        match value.get("id").and_then(Value::as_u64) {
            Some(id) => {
                received.replies.insert(id, value);
            }
            None => received.events.push(value),
        }
        shared.arrived.notify_all();
    }
    shared.state.lock().unwrap().closed = true;
    shared.arrived.notify_all();
}
