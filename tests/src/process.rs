//! A service binary run as its own process, as deployments run it.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

/// A running service binary, killed when dropped.
pub struct ServiceProcess {
    child: Child,
    pub base: String,
    /// Everything it logged so far (stdout and stderr), for failure messages.
    log: mpsc::Receiver<String>,
}

impl ServiceProcess {
    /// Starts `binary` with `env` (`RT_BIND` is set to a free loopback port)
    /// and waits until it logs the address it listens on.
    pub fn start(binary: &str, env: &[(&str, &str)]) -> ServiceProcess {
        let mut child = Command::new(binary)
            .env("RT_BIND", "127.0.0.1:0")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        let (tx, log) = mpsc::channel();
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match log.recv_timeout(left) {
                Ok(line) => {
                    if let Some(at) = line.find("listening on http://") {
                        let url = line[at + "listening on ".len()..]
                            .split(|c: char| c.is_whitespace() || c == '"')
                            .next()
                            .unwrap_or_default()
                            .to_owned();
                        return ServiceProcess {
                            child,
                            base: url,
                            log,
                        };
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "{binary} did not report its address within 30 s; it logged:\n{}",
                        seen.join("\n")
                    );
                }
            }
        }
    }

    /// The process's resident memory now (`VmRSS`), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the process's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS in /proc status")
            * 1024
    }

    /// What it logged since the last call (stdout and stderr lines).
    pub fn take_log(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends SIGTERM and waits (up to 20 s) for the process to exit; fails
    /// when it panicked on the way out, even if it exited cleanly.
    pub fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid} failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the process") {
                self.assert_no_panic();
                return status;
            }
            if Instant::now() > deadline {
                let log: Vec<String> = self.log.try_iter().collect();
                panic!(
                    "the process did not stop within 20 s of SIGTERM; it logged:\n{}",
                    log.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Reads what an exited process logged to the end of its output, and
    /// fails if a thread of it panicked (a task that panics is dropped, and
    /// what it owed its client with it).
    fn assert_no_panic(&self) {
        let mut rest = Vec::new();
        // The readers stop at the end of the pipes, which the exit closes.
        while let Ok(line) = self.log.recv_timeout(Duration::from_secs(5)) {
            rest.push(line);
        }
        if let Some(at) = rest.iter().position(|l| l.contains("panicked at")) {
            panic!(
                "the process panicked while it ran or stopped:\n{}",
                rest[at..].join("\n")
            );
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
