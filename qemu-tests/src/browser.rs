//! A headless Chromium (Debian's `chromium` and `chromium-driver`) driven through WebDriver, on the
//! lab's private network: `chromedriver` runs inside the lab's namespace and starts the browser
//! there, so the page is loaded from the bootserver on the lab's bridge and nothing leaves it.
//!
//! The WebDriver client (`fantoccini`) talks to `chromedriver` on the namespace's loopback: its
//! sockets are made on a thread of its own that entered the namespace (a network namespace is a
//! property of a thread), which runs every command; tests call the blocking methods here.
//! Dropping the [`Browser`] ends the session, then kills `chromedriver` and every process it
//! started, by PID.

use crate::Lab;
use fantoccini::{Client, ClientBuilder, Locator};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The port `chromedriver` listens on, on the lab namespace's loopback (private to the lab).
const DRIVER_PORT: u16 = 9515;

/// The size the page is shown at.
#[derive(Debug, Clone, Copy)]
pub enum Viewport {
    /// A desktop window.
    Desktop { width: u32, height: u32 },
    /// A phone: Chromium's mobile emulation (its window cannot be narrower than 500 px).
    Phone { width: u32, height: u32 },
}

type Job = Box<dyn FnOnce(&tokio::runtime::Runtime, &Client) + Send>;

pub struct Browser {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    driver: Child,
    profile: PathBuf,
    /// `http://SERVER:8080`, where the bootserver's console is.
    pub base: String,
}

impl Browser {
    /// Starts `chromedriver` in `lab`'s namespace and a browser session at `viewport`.
    pub fn start(lab: &Lab, viewport: Viewport) -> Self {
        let tag = match viewport {
            Viewport::Desktop { .. } => "desktop",
            Viewport::Phone { .. } => "phone",
        };
        let profile = lab.dir.join(format!("chromium-{tag}"));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).unwrap();
        let driver = lab
            .command_in_lab("chromedriver")
            .arg(format!("--port={DRIVER_PORT}"))
            .arg(format!(
                "--log-path={}",
                lab.dir.join(format!("chromedriver-{tag}.log")).display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "starting chromedriver (run scripts/setup: packages chromium, chromium-driver)",
            );
        let capabilities = capabilities(viewport, &profile);
        let netns = Path::new("/run/netns").join(&lab.netns);
        let (jobs, receive) = mpsc::channel::<Job>();
        let (ready, started) = mpsc::channel::<Result<(), String>>();
        let thread = std::thread::Builder::new()
            .name("webdriver".into())
            .spawn(move || {
                let runtime = match enter_and_connect(&netns, capabilities) {
                    Ok((runtime, client)) => {
                        let _ = ready.send(Ok(()));
                        (runtime, client)
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let (runtime, client) = runtime;
                for job in receive {
                    job(&runtime, &client);
                }
                let _ = runtime.block_on(client.close());
            })
            .unwrap();
        let mut browser = Self {
            jobs: Some(jobs),
            thread: Some(thread),
            driver,
            profile,
            base: format!("http://{}:8080", lab.server_ip),
        };
        match started.recv() {
            Ok(Ok(())) => browser,
            Ok(Err(e)) => {
                browser.stop();
                panic!("no browser session: {e}");
            }
            Err(_) => {
                browser.stop();
                panic!("the WebDriver thread died");
            }
        }
    }

    /// Runs `f` with the session on the WebDriver thread; its result.
    pub fn run<T, F, Fut>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(Client) -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move |runtime, client| {
            let _ = tx.send(runtime.block_on(f(client.clone())));
        });
        self.jobs
            .as_ref()
            .expect("the browser is running")
            .send(job)
            .expect("the WebDriver thread ended");
        rx.recv().expect("a WebDriver command panicked")
    }

    /// Opens `path` on the bootserver.
    pub fn open(&self, path: &str) {
        let url = format!("{}{path}", self.base);
        self.run(move |c| async move { c.goto(&url).await })
            .unwrap_or_else(|e| panic!("opening the page: {e}"));
    }

    /// The value of a JavaScript expression (a promise is waited for).
    pub fn eval(&self, expression: &str) -> serde_json::Value {
        let script = format!("return ({expression});");
        let shown = expression.to_string();
        self.run(move |c| async move { c.execute(&script, Vec::new()).await })
            .unwrap_or_else(|e| panic!("evaluating {shown}: {e}"))
    }

    /// Waits until `expression` is truthy; its last value when it does.
    pub fn wait_until(&self, expression: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.eval(expression);
            let truthy = match &value {
                serde_json::Value::Null => false,
                serde_json::Value::Bool(b) => *b,
                serde_json::Value::Number(n) => n.as_f64() != Some(0.0),
                serde_json::Value::String(s) => !s.is_empty(),
                serde_json::Value::Array(_) | serde_json::Value::Object(_) => true,
            };
            if truthy {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "the page never showed `{expression}` within {} s; it shows:\n{}",
                timeout.as_secs(),
                self.eval("document.body.innerText")
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Clicks the element `css` selects.
    pub fn click(&self, css: &str) {
        let selector = css.to_string();
        self.run(move |c| async move { c.find(Locator::Css(&selector)).await?.click().await })
            .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
    }

    /// Types `text` into the field `css` selects.
    pub fn type_into(&self, css: &str, text: &str) {
        let (selector, text) = (css.to_string(), text.to_string());
        self.run(move |c| async move {
            c.find(Locator::Css(&selector))
                .await?
                .send_keys(&text)
                .await
        })
        .unwrap_or_else(|e| panic!("typing into {css}: {e}"));
    }

    /// Chooses the option with `value` in the `<select>` `css` selects.
    pub fn select(&self, css: &str, value: &str) {
        let (selector, wanted) = (css.to_string(), value.to_string());
        self.run(move |c| async move {
            c.find(Locator::Css(&selector))
                .await?
                .select_by_value(&wanted)
                .await
        })
        .unwrap_or_else(|e| panic!("choosing {value} in {css}: {e}"));
    }

    /// Saves what the browser shows as a PNG.
    pub fn screenshot(&self, path: &Path) {
        let png = self
            .run(|c| async move { c.screenshot().await })
            .unwrap_or_else(|e| panic!("taking a screenshot: {e}"));
        std::fs::write(path, png).unwrap();
    }

    fn stop(&mut self) {
        if let Some(jobs) = self.jobs.take() {
            drop(jobs);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
        // Whatever the session left running (a crash, a hung renderer): chromedriver and every
        // process under it, by PID, children first.
        let mut processes = descendants(self.driver.id());
        processes.reverse();
        for pid in processes {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.stop();
    }
}

fn capabilities(viewport: Viewport, profile: &Path) -> serde_json::Map<String, serde_json::Value> {
    let mut args = vec![
        "--headless=new".to_string(),
        // As root Chromium refuses to start sandboxed.
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--no-first-run".into(),
        "--disable-background-networking".into(),
        "--disable-component-update".into(),
        "--disable-default-apps".into(),
        "--disable-extensions".into(),
        "--disable-sync".into(),
        format!("--user-data-dir={}", profile.display()),
    ];
    let mut options = serde_json::json!({ "binary": "/usr/bin/chromium" });
    match viewport {
        Viewport::Desktop { width, height } => args.push(format!("--window-size={width},{height}")),
        Viewport::Phone { width, height } => {
            options["mobileEmulation"] = serde_json::json!({
                "deviceMetrics": { "width": width, "height": height, "pixelRatio": 1 }
            });
        }
    }
    options["args"] = serde_json::json!(args);
    let capabilities = serde_json::json!({
        "browserName": "chrome",
        "goog:chromeOptions": options,
    });
    match capabilities {
        serde_json::Value::Object(map) => map,
        _ => unreachable!("an object"),
    }
}

/// On the calling thread: enters the namespace at `netns`, then opens a session with
/// `chromedriver` (waiting for it to listen).
fn enter_and_connect(
    netns: &Path,
    capabilities: serde_json::Map<String, serde_json::Value>,
) -> Result<(tokio::runtime::Runtime, Client), String> {
    let ns = std::fs::File::open(netns).map_err(|e| format!("{}: {e}", netns.display()))?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("entering {}: {e}", netns.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!("http://127.0.0.1:{DRIVER_PORT}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", DRIVER_PORT)).is_err() {
        if Instant::now() > deadline {
            return Err("chromedriver did not listen within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let started = Instant::now();
    let client = runtime
        .block_on(
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(capabilities)
                .connect(&url),
        )
        .map_err(|e| format!("starting Chromium through chromedriver: {e}"))?;
    eprintln!(
        "browser: session started in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok((runtime, client))
}

/// Every process below `root`, parents before their children.
fn descendants(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter_map(|entry| {
                    let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
                    let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
                    // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
                    let after = &stat[stat.rfind(')')? + 1..];
                    let ppid = after.split_whitespace().nth(1)?.parse().ok()?;
                    Some((pid, ppid))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid) in &parents {
            if ppid == parent && !found.contains(&pid) {
                found.push(pid);
                frontier.push(pid);
            }
        }
    }
    found
}
