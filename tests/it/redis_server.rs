//! A throwaway `redis-server` (Debian package `redis-server`) on a free loopback port, in
//! its own temp dir, without persistence; stopped on drop, restartable for fault tests.
//!
//! Missing binary: [`RedisServer::start`] returns `None` after a loud line naming the
//! package, unless `LLMGW_REQUIRE_ENGINES=1` (scripts/test sets it), where it fails.
//!
//! Benchmarks only: `LLMGW_BENCH_REDIS_CPU=LIST` (e.g. `1`) starts redis-server under
//! `taskset -c LIST`, so that it has a core of its own as on its own host; run the test
//! binary under `taskset -c` of the other cores (e.g. `taskset -c 0 cargo test ...`).
//! Never set by the tests themselves, and nothing of it is in the server.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A running redis-server.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

fn binary() -> Option<PathBuf> {
    ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .or_else(|| {
            let out = Command::new("sh")
                .args(["-c", "command -v redis-server"])
                .output()
                .ok()?;
            let path = String::from_utf8(out.stdout).ok()?;
            let path = path.trim();
            (!path.is_empty()).then(|| PathBuf::from(path))
        })
}

/// The CPU list redis-server is pinned to (`LLMGW_BENCH_REDIS_CPU`), if any.
pub fn pinned_cpu() -> Option<String> {
    std::env::var("LLMGW_BENCH_REDIS_CPU")
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends one inline command and reads the reply (enough for PING and INFO).
fn command(port: u16, cmd: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(format!("{cmd}\r\n").as_bytes())?;
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        // A simple reply ends at its first CRLF; a bulk reply after its announced length.
        if let Some(rest) = text.strip_prefix('$') {
            if let Some((len, body)) = rest.split_once("\r\n")
                && let Ok(len) = len.parse::<usize>()
                && body.len() >= len + 2
            {
                return Ok(body[..len].to_owned());
            }
        } else if text.ends_with("\r\n") {
            return Ok(text.trim_end().to_owned());
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

impl RedisServer {
    /// Starts a server, or `None` (after a loud skip line) when redis-server is not
    /// installed and `LLMGW_REQUIRE_ENGINES` is not `1`.
    pub fn start() -> Option<RedisServer> {
        let Some(_) = binary() else {
            assert!(
                std::env::var("LLMGW_REQUIRE_ENGINES").as_deref() != Ok("1"),
                "redis-server is not installed (Debian package `redis-server`) and LLMGW_REQUIRE_ENGINES=1"
            );
            #[expect(clippy::print_stderr, reason = "a skipped engine test says so loudly")]
            {
                eprintln!(
                    "SKIPPED: redis-server is not installed; install the Debian package `redis-server` (scripts/test does) to run the Redis tests"
                );
            }
            return None;
        };
        let mut server = RedisServer {
            child: None,
            port: 0,
            dir: tempfile::tempdir().unwrap(),
        };
        // Another process may take the free port before redis-server binds it: try again.
        for _ in 0..5 {
            server.port = free_port();
            if server.spawn() {
                return Some(server);
            }
        }
        panic!("redis-server did not start on a free port in 5 tries");
    }

    /// Starts redis-server on `self.port`; whether it answers PING.
    fn spawn(&mut self) -> bool {
        let mut cmd = match pinned_cpu() {
            Some(cpus) => {
                // taskset execs redis-server: the child's pid stays redis-server's.
                let mut cmd = Command::new("taskset");
                cmd.args(["-c", &cpus]).arg(binary().unwrap());
                cmd
            }
            None => Command::new(binary().unwrap()),
        };
        let child = cmd
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Some(child) = self.child.as_mut()
                && child.try_wait().unwrap().is_some()
            {
                self.child = None;
                return false;
            }
            if command(self.port, "PING").is_ok_and(|r| r == "+PONG") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: like a crash) and waits for it; its data is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        for _ in 0..50 {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server did not restart on port {}", self.port);
    }

    /// Calls per command since start (`INFO commandstats`), e.g. `evalsha`.
    pub fn command_calls(&self) -> HashMap<String, u64> {
        let info = command(self.port, "INFO commandstats").unwrap();
        info.lines()
            .filter_map(|l| l.strip_prefix("cmdstat_"))
            .filter_map(|l| {
                let (name, rest) = l.split_once(':')?;
                let calls = rest.split(',').find_map(|f| f.strip_prefix("calls="))?;
                Some((name.to_owned(), calls.parse().ok()?))
            })
            .collect()
    }

    /// The fields of a hash (`HGETALL key`).
    pub fn hash(&self, key: &str) -> HashMap<String, String> {
        let reply = command(self.port, &format!("HGETALL {key}")).unwrap();
        let mut lines = reply.split("\r\n");
        let n: usize = lines
            .next()
            .and_then(|l| l.strip_prefix('*'))
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| panic!("HGETALL {key}: {reply:?}"));
        let values: Vec<&str> = lines.skip(1).step_by(2).take(n).collect();
        assert_eq!(values.len(), n, "HGETALL {key}: {reply:?}");
        values
            .chunks(2)
            .map(|kv| (kv[0].to_owned(), kv[1].to_owned()))
            .collect()
    }

    /// The sum over replicas of a subject's lease field (`s` streams, `r` reserved USD).
    pub fn leased(&self, key: &str, what: &str) -> f64 {
        self.hash(key)
            .iter()
            .filter(|(f, _)| f.strip_prefix(what).is_some_and(|r| r.starts_with(':')))
            .map(|(_, v)| v.parse::<f64>().unwrap())
            .sum()
    }

    /// The reply to one inline command (e.g. `ZCARD key`), as text.
    pub fn command(&self, cmd: &str) -> String {
        command(self.port, cmd).unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn the_harness_starts_restarts_and_counts_commands() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    assert_eq!(redis.command("SET a 1"), "+OK");
    assert_eq!(redis.command("GET a"), "1");
    assert!(redis.command_calls().get("set").is_some_and(|n| *n >= 1));
    redis.restart();
    // Restarted empty (no persistence).
    assert_eq!(redis.command("EXISTS a"), ":0");
}
