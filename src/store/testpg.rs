//! A private PostgreSQL for tests, from Debian's `postgresql` binaries
//! (installed with apt-get when missing, as the browser tests install
//! Chromium): `initdb` into a temporary directory, `pg_ctl` on a free
//! loopback port, run as the `postgres` user when the tests run as root.
//!
//! [`shared`] starts one server per test process and hands each test a fresh
//! database ([`PgServer::database`]); [`PgServer::start`] gives a test its own
//! server to stop and start again (an outage). A watcher process stops the
//! server and removes its directory when the test process exits, however it
//! exits (panic, abort, SIGKILL): nothing is left running.
//!
//! This one file is compiled into the library's unit tests (the Store
//! contract) and into the end-to-end tests (`#[path]`), so it uses only std
//! and `tempfile`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// A running PostgreSQL owned by this test process.
pub struct PgServer {
    bin: PathBuf,
    /// Holds `data/`, the log and the socket; owned by `postgres` when root.
    dir: PathBuf,
    pub port: u16,
    as_postgres: bool,
    /// Server options beside the port and socket (TLS, more addresses).
    options: String,
}

/// The server every test of this process shares (started on first use).
pub fn shared() -> &'static PgServer {
    static SHARED: OnceLock<PgServer> = OnceLock::new();
    SHARED.get_or_init(PgServer::start)
}

/// A fresh, empty database on the shared server; its URL.
pub fn database() -> String {
    shared().database()
}

/// The newest `/usr/lib/postgresql/N/bin`, installing Debian's `postgresql`
/// package when no version is there.
pub fn binaries() -> PathBuf {
    fn newest() -> Option<PathBuf> {
        let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .flatten()
            .filter_map(|e| {
                let version = e.file_name().to_str()?.parse().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").exists().then_some((version, bin))
            })
            .collect();
        found.sort();
        found.pop().map(|(_, bin)| bin)
    }
    if let Some(bin) = newest() {
        return bin;
    }
    let _ = Command::new("apt-get").args(["update", "-qq"]).status();
    let _ = Command::new("apt-get")
        .args(["install", "-y", "-qq", "postgresql"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    newest().expect(
        "these tests need PostgreSQL's server binaries (apt-get install postgresql) in /usr/lib/postgresql/N/bin",
    )
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn unique() -> String {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{}_{}_{nanos}",
        std::process::id(),
        COUNT.fetch_add(1, Ordering::Relaxed)
    )
}

impl PgServer {
    /// Makes a cluster in a new temporary directory and starts it.
    pub fn start() -> PgServer {
        PgServer::start_with(None)
    }

    /// [`PgServer::start`] with TLS on (`ssl=on`): `cert` and `key` (PEM
    /// files) are copied into the server's directory, readable by it alone.
    /// It listens on 127.0.0.1 and 127.0.0.2, so that a test can reach it
    /// under an address its certificate does not name.
    pub fn start_tls(cert: &Path, key: &Path) -> PgServer {
        PgServer::start_with(Some((cert, key)))
    }

    fn start_with(tls: Option<(&Path, &Path)>) -> PgServer {
        let bin = binaries();
        let as_postgres = running_as_root();
        let dir = std::env::temp_dir().join(format!("ferry-pg-{}", unique()));
        std::fs::create_dir_all(&dir).expect("the server's temporary directory");
        if as_postgres {
            let ok = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .status();
            assert!(
                ok.is_ok_and(|s| s.success()),
                "chown postgres {}",
                dir.display()
            );
        }
        let mut server = PgServer {
            bin,
            dir,
            port: 0,
            as_postgres,
            options: String::new(),
        };
        if let Some((cert, key)) = tls {
            server.options = server.tls_files(cert, key);
        }
        server.watch_parent();
        server.run_ok(
            "initdb",
            &[
                "-D",
                &server.data().display().to_string(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        // A port found free may be taken before the server binds it: retry.
        for _ in 0..5 {
            server.port = free_port();
            if server.try_start() {
                return server;
            }
        }
        panic!(
            "the test PostgreSQL did not start; its log:\n{}",
            std::fs::read_to_string(server.dir.join("log")).unwrap_or_default()
        );
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Copies the certificate and key where the server reads them (owned
    /// by it, mode 0600 as PostgreSQL insists); the options that turn TLS on.
    fn tls_files(&self, cert: &Path, key: &Path) -> String {
        use std::os::unix::fs::PermissionsExt;
        let (c, k) = (self.dir.join("server.crt"), self.dir.join("server.key"));
        std::fs::copy(cert, &c).expect("the test certificate");
        std::fs::copy(key, &k).expect("the test key");
        for f in [&c, &k] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
            if self.as_postgres {
                let ok = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(f)
                    .status();
                assert!(ok.is_ok_and(|s| s.success()), "chown {}", f.display());
            }
        }
        format!(
            " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={} -c listen_addresses=127.0.0.1,127.0.0.2",
            c.display(),
            k.display()
        )
    }

    /// A command running the server binary `name` (as `postgres` when root).
    fn command(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        c.current_dir(&self.dir).stdin(Stdio::null());
        c
    }

    fn run_ok(&self, name: &str, args: &[&str]) {
        let out = self
            .command(name)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{name} cannot run: {e}"));
        assert!(
            out.status.success(),
            "{name} {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn try_start(&self) -> bool {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=400{}",
            self.port,
            self.dir.display(),
            self.options
        );
        self.command("pg_ctl")
            .args(["-D", &self.data().display().to_string(), "-l"])
            .arg(self.dir.join("log"))
            .args(["-w", "-t", "30", "-o", &options, "start"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Starts the server again on the same port (after [`PgServer::stop`]).
    pub fn restart(&self) {
        assert!(self.try_start(), "the test PostgreSQL did not start again");
    }

    /// Stops the server (`fast`: a clean shutdown; `immediate`: a crash).
    pub fn stop(&self, mode: &str) {
        self.run_ok(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-m",
                mode,
                "-w",
                "stop",
            ],
        );
    }

    /// The server's URL for `database` (as user `postgres`, no password).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs SQL on `database` through psql; returns what it printed (tuples
    /// only, unaligned).
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.url(database))
            .args(["-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Creates an empty database `t_<unique>` and returns its URL.
    pub fn database(&self) -> String {
        let name = format!("t_{}", unique());
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// A small shell process that waits for this test process to end, then
    /// stops the server (immediately: its data is thrown away) and removes
    /// the directory.
    fn watch_parent(&self) {
        let stop = format!(
            "{} {} -D {} -m immediate -w stop",
            if self.as_postgres {
                "runuser -u postgres --"
            } else {
                ""
            },
            self.bin.join("pg_ctl").display(),
            self.data().display()
        );
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; if [ -f {data}/postmaster.pid ]; then {stop} >/dev/null 2>&1; fi; rm -rf {dir}",
            pid = std::process::id(),
            data = self.data().display(),
            dir = self.dir.display(),
        );
        let mut watcher = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the server's watcher starts");
        // It outlives this process; a thread reaps it should it end first.
        std::thread::spawn(move || watcher.wait());
    }

    /// Where the server's files live.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PgServer {
    /// A server owned by a test stops when the test ends (the shared one,
    /// a static, is stopped by its watcher when the process exits).
    fn drop(&mut self) {
        if self.data().join("postmaster.pid").exists() {
            let _ = self
                .command("pg_ctl")
                .args(["-D", &self.data().display().to_string()])
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
