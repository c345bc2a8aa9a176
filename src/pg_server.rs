//! A throwaway PostgreSQL server for benchmarks and tests: a fresh cluster
//! in a temporary folder, on a free loopback port, stopped (and its folder
//! removed) when dropped.
//!
//! The binaries (`initdb`, `pg_ctl`, `postgres`) are looked for in
//! `$SNAPS_PG_BIN`, then on `PATH`, then in `/usr/lib/postgresql/<version>/bin`
//! (newest version first). `initdb` refuses to run as root: as root the
//! server runs as the `postgres` user (through `runuser`), which the
//! Debian package creates.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// What to install when the binaries are missing.
pub const INSTALL_HINT: &str = "install the PostgreSQL server (Debian/Ubuntu: `apt-get install -y postgresql`), \
     or point SNAPS_PG_BIN at the folder holding initdb and pg_ctl";

/// Finds the folder holding `initdb` and `pg_ctl`, or says what to install.
pub fn find_binaries() -> Result<PathBuf> {
    let has = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("SNAPS_PG_BIN") {
        let dir = PathBuf::from(dir);
        if has(&dir) {
            return Ok(dir);
        }
        bail!(
            "SNAPS_PG_BIN={} holds no initdb and pg_ctl: {INSTALL_HINT}",
            dir.display()
        );
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has(&dir) {
                return Ok(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!("no PostgreSQL server binaries (initdb, pg_ctl) found: {INSTALL_HINT}"),
    }
}

/// A running throwaway server.
pub struct PgServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// As whom the server runs (`None`: as this process's user).
    run_as: Option<String>,
    running: bool,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The uid and gid of `user`.
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let name = std::ffi::CString::new(user).ok()?;
    // SAFETY: `name` is a valid C string; getpwnam returns NULL or a pointer
    // to a static record we read at once.
    unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        if pw.is_null() {
            None
        } else {
            Some(((*pw).pw_uid, (*pw).pw_gid))
        }
    }
}

impl PgServer {
    /// Creates a cluster (trust authentication, user `postgres`) and starts
    /// it on a free port.
    pub fn start() -> Result<PgServer> {
        PgServer::start_with(None, false)
    }

    /// As [`PgServer::start`], with every commit synced to disk as a
    /// production server's (fsync and synchronous commit on): for
    /// comparisons with a store that syncs its commits.
    pub fn start_durable() -> Result<PgServer> {
        PgServer::start_with(None, true)
    }

    /// As [`PgServer::start`], also offering TLS with the certificate and
    /// key in `tls` (PEM files).
    pub fn start_tls(cert: &Path, key: &Path) -> Result<PgServer> {
        PgServer::start_with(Some((cert, key)), false)
    }

    fn start_with(tls: Option<(&Path, &Path)>, durable: bool) -> Result<PgServer> {
        let bin = find_binaries()?;
        let dir = tempfile::Builder::new().prefix("snaps-pg-").tempdir()?;
        let run_as = if is_root() {
            let (uid, gid) = user_ids("postgres").context(
                "initdb refuses to run as root and there is no user `postgres` to run it as: \
                 create one (the Debian package `postgresql` does) or run as another user",
            )?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .with_context(|| format!("give {} to postgres", dir.path().display()))?;
            Some("postgres".to_string())
        } else {
            None
        };
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut server = PgServer {
            bin,
            dir,
            port,
            run_as,
            running: false,
        };
        let data = server.dir.path().join("data");
        server.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        let mut options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200{}",
            server.dir.path().display(),
            if durable {
                ""
            } else {
                " -c fsync=off -c synchronous_commit=off"
            }
        );
        if let Some((cert, key)) = tls {
            // The server reads them as its own user, the key private to it.
            let (c, k) = (
                server.dir.path().join("server.crt"),
                server.dir.path().join("server.key"),
            );
            std::fs::copy(cert, &c).with_context(|| format!("copy {}", cert.display()))?;
            std::fs::copy(key, &k).with_context(|| format!("copy {}", key.display()))?;
            std::fs::set_permissions(&k, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            if server.run_as.is_some() {
                let (uid, gid) = user_ids("postgres").context("no user postgres")?;
                for f in [&c, &k] {
                    std::os::unix::fs::chown(f, Some(uid), Some(gid))?;
                }
            }
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                c.display(),
                k.display()
            ));
        }
        let log = server.dir.path().join("log");
        server.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
                "-w".as_ref(),
                "start".as_ref(),
            ],
        )?;
        server.running = true;
        Ok(server)
    }

    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
        let path = self.bin.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&path);
                c
            }
            None => Command::new(&path),
        };
        cmd.args(args).current_dir(self.dir.path());
        let out = cmd
            .output()
            .with_context(|| format!("run {}", path.display()))?;
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
            bail!(
                "{} failed ({}): {}{}{}",
                path.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                if log.is_empty() {
                    ""
                } else {
                    "\nserver log:\n"
                },
                log.trim()
            );
        }
        Ok(())
    }

    /// A tokio-postgres connection string for database `db`.
    pub fn conninfo(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db}",
            self.port
        )
    }

    /// A `postgresql://` URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates an empty database named `db`; returns its URL.
    pub fn create_database(&self, db: &str) -> Result<String> {
        let conninfo = self.conninfo("postgres");
        let sql = format!("CREATE DATABASE \"{db}\"");
        // On a thread of its own: the caller may be inside a runtime.
        std::thread::scope(|s| {
            s.spawn(|| -> Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                        .await
                        .context("connect to the PostgreSQL server")?;
                    tokio::spawn(conn);
                    client
                        .batch_execute(&sql)
                        .await
                        .with_context(|| format!("create database {db}"))
                })
            })
            .join()
            .map_err(|_| anyhow::anyhow!("creating database {db} panicked"))?
        })?;
        Ok(self.url(db))
    }

    /// One server for the whole of this process, started at the first call:
    /// test binaries share it between their tests, each test in a database
    /// of its own. A watcher process stops it and removes its folder once
    /// this process has ended (a static is never dropped).
    pub fn shared() -> Result<&'static PgServer> {
        static SHARED: std::sync::OnceLock<std::result::Result<PgServer, String>> =
            std::sync::OnceLock::new();
        let server = SHARED.get_or_init(|| {
            let server = PgServer::start().map_err(|e| format!("{e:#}"))?;
            server.watch_owner().map_err(|e| format!("{e:#}"))?;
            Ok(server)
        });
        server
            .as_ref()
            .map_err(|e| anyhow::anyhow!("the shared PostgreSQL server: {e}"))
    }

    fn watch_owner(&self) -> Result<()> {
        let data = self.dir.path().join("data");
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = match &self.run_as {
            Some(user) => format!(
                "runuser -u {user} -- '{}' -D '{}' -m immediate stop",
                pg_ctl.display(),
                data.display()
            ),
            None => format!(
                "'{}' -D '{}' -m immediate stop",
                pg_ctl.display(),
                data.display()
            ),
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            dir = self.dir.path().display()
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("start the watcher of the shared PostgreSQL server")?;
        Ok(())
    }

    /// The server's version line, e.g. `PostgreSQL 15.8`.
    pub fn version(&self) -> String {
        let out = Command::new(self.bin.join("postgres"))
            .arg("--version")
            .output();
        match out {
            Ok(o) => String::from_utf8_lossy(&o.stdout).trim().to_string(),
            Err(_) => "PostgreSQL (version unknown)".into(),
        }
    }

    /// Stops the server.
    pub fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        self.running = false;
        let data = self.dir.path().join("data");
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                "fast".as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ],
        )
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            eprintln!("stopping the benchmark's PostgreSQL server: {e:#}");
        }
    }
}
