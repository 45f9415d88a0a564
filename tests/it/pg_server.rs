//! Throwaway PostgreSQL servers for the tests, from the installed Debian package
//! (`postgresql`: initdb and pg_ctl under /usr/lib/postgresql/*/bin).
//!
//! [`shared`] starts one server per test binary run (lazily, on first use) and each test
//! takes a database of its own ([`PgServer::database`]); a test that stops and starts its
//! server takes one of its own ([`PgServer::start`]). PostgreSQL refuses to run as root, so
//! as root the server runs as the `postgres` system user in a temp dir it owns. It listens on
//! 127.0.0.1 only (no unix socket), with fsync off. A watchdog process stops the server and
//! removes its dir when the test binary exits, however it exits; dropping a [`PgServer`]
//! does the same at once.
//!
//! Without the binaries a test skips with a line naming the package, unless
//! `LLMGW_REQUIRE_ENGINES=1` (scripts/test sets it): then it fails.

// A skipped test says so on stderr; so do the tools that fail to start a server.
#![allow(clippy::print_stderr)]

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

/// A running PostgreSQL server; dropping it stops it.
pub struct PgServer(Engine);

/// Where a server lives and how its tools run.
#[derive(Clone)]
struct Engine {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    /// Run the tools as `postgres` (we are root).
    as_postgres: bool,
}

/// The directory of the newest installed PostgreSQL's binaries.
fn bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
        .collect();
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
}

/// Whether the engines are required (a skip fails).
pub fn required() -> bool {
    std::env::var("LLMGW_REQUIRE_ENGINES").is_ok_and(|v| v == "1")
}

/// Says loudly that a test is skipped, or fails it when engines are required.
fn skip(what: &str) {
    if required() {
        panic!(
            "LLMGW_REQUIRE_ENGINES=1 but PostgreSQL is unavailable: {what} (install the Debian package `postgresql`)"
        );
    }
    eprintln!(
        "SKIPPED: PostgreSQL test: {what}; install the Debian package `postgresql` (scripts/test does)"
    );
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn ids(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, user]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

static SHARED: OnceLock<Option<Arc<PgServer>>> = OnceLock::new();

/// The server shared by this test binary run; `None` (after saying so) when PostgreSQL is
/// not installed.
pub async fn shared() -> Option<Arc<PgServer>> {
    tokio::task::spawn_blocking(|| {
        SHARED
            .get_or_init(|| PgServer::start_blocking().map(Arc::new))
            .clone()
    })
    .await
    .unwrap()
}

/// A fresh database on the shared server: its URL, or `None` when PostgreSQL is missing.
pub async fn database() -> Option<String> {
    Some(shared().await?.database().await)
}

impl PgServer {
    /// A server of its own (for tests that stop and start it); `None` when PostgreSQL is
    /// missing.
    pub async fn start() -> Option<PgServer> {
        tokio::task::spawn_blocking(PgServer::start_blocking)
            .await
            .unwrap()
    }

    fn start_blocking() -> Option<PgServer> {
        let Some(bin) = bin_dir() else {
            skip("no initdb/pg_ctl under /usr/lib/postgresql/*/bin");
            return None;
        };
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("llmgw-pg-")
            .tempdir()
            .unwrap()
            .keep();
        if as_postgres {
            let Some((uid, gid)) = ids("postgres") else {
                skip("running as root and there is no `postgres` system user");
                return None;
            };
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        let mut server = Engine {
            bin,
            dir,
            port: 0,
            as_postgres,
        };
        server.run(
            "initdb",
            &[
                "-D",
                &server.data().display().to_string(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        server.watchdog();
        // A free port can be taken between the probe and the bind: try a few.
        for _ in 0..5 {
            server.port = free_port();
            if server.try_start() {
                return Some(PgServer(server));
            }
        }
        panic!(
            "postgresql did not start; its log:\n{}",
            std::fs::read_to_string(server.dir.join("log")).unwrap_or_default()
        );
    }
}

impl Engine {
    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(path);
            cmd
        } else {
            Command::new(path)
        };
        // Nothing inherits the test's pipes (the harness waits for them to close).
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .current_dir(&self.dir);
        cmd
    }

    fn run(&self, tool: &str, args: &[&str]) -> bool {
        let out = self.command(tool).args(args).output().unwrap();
        if !out.status.success() {
            eprintln!(
                "{tool} {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out.status.success()
    }

    /// Stops the server and removes its dir once this test process is gone.
    fn watchdog(&self) {
        let script = format!(
            "while [ -d /proc/{pid} ]; do sleep 1; done; {pg_ctl} -D {data} stop -m immediate; rm -rf {dir}",
            pid = std::process::id(),
            pg_ctl = self.bin.join("pg_ctl").display(),
            data = self.data().display(),
            dir = self.dir.display(),
        );
        let mut cmd = if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--", "sh", "-c", &script]);
            cmd
        } else {
            let mut cmd = Command::new("sh");
            cmd.args(["-c", &script]);
            cmd
        };
        // Never waited for: it outlives this process on purpose (and is reaped by init).
        #[expect(
            clippy::zombie_processes,
            reason = "the watchdog outlives the test process"
        )]
        let _watchdog = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
    }

    fn try_start(&self) -> bool {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories= -c fsync=off \
             -c full_page_writes=off -c max_connections=400 -c shared_buffers=32MB",
            self.port
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-l",
                &self.dir.join("log").display().to_string(),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }
}

impl PgServer {
    /// Stops the server (`pg_ctl stop -m fast`: connections end, what committed stays).
    pub async fn stop(&self) {
        let engine = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let data = engine.data().display().to_string();
            assert!(
                engine.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]),
                "pg_ctl stop failed"
            );
        })
        .await
        .unwrap();
    }

    /// Starts the stopped server again on the same port.
    pub async fn restart(&self) {
        let engine = self.0.clone();
        let started = tokio::task::spawn_blocking(move || engine.try_start())
            .await
            .unwrap();
        assert!(started, "postgresql did not start again on its port");
    }

    /// The URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.0.port)
    }

    /// A new, empty database: its URL.
    pub async fn database(&self) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let client = self.connect("postgres").await;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        self.url(&name)
    }

    /// A client of database `name` (for tests that look inside).
    pub async fn connect(&self, name: &str) -> tokio_postgres::Client {
        connect(&self.url(name)).await
    }
}

/// A client of the database at `url`; its connection runs on a task of the caller's runtime.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                return client;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("connecting to {url}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot connect to {url}: {e}"),
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.0.data().display().to_string();
        let _ = self
            .0
            .command("pg_ctl")
            .args(["-D", &data, "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.0.dir);
    }
}

#[tokio::test]
async fn the_shared_server_hands_out_fresh_databases() {
    let Some(server) = shared().await else { return };
    let (a, b) = (server.database().await, server.database().await);
    assert_ne!(a, b);
    let client = connect(&a).await;
    let row = client.query_one("SELECT 1 + 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
}
