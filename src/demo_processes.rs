//! `snaps demo --processes`: the demo network as a real deployment — every
//! global controller and every site a process of its own (`snaps global
//! serve`, `snaps site serve`), started from the configuration files this
//! writes into the demo folder, which a user can read and reuse.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use snaps_global::StoreLocation;
use snaps_schema::NetworkConfig;

use crate::demo::{DEMO_PASSWORD, DEMO_USER, DemoOptions, demo_users};

/// A child process of the demo, stopped (SIGTERM, then SIGKILL) when the
/// demo ends or fails.
struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    fn start(name: &str, args: &[&str], log: PathBuf) -> Result<Process> {
        let exe = std::env::current_exe().context("the path of this snaps binary")?;
        let out =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        Ok(Process {
            name: name.into(),
            child,
            log,
        })
    }

    /// Waits until the process accepts connections on `addr`.
    async fn listening(&mut self, addr: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(12).collect();
                bail!(
                    "{} exited ({status}) before listening on {addr}; its log ({}) ends:\n{}",
                    self.name,
                    self.log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} does not listen on {addr} after 60 s (log: {})",
                    self.name,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SAFETY: kill(2) with a pid this process started and has not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

fn toml_str(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// Runs the network as processes until `shutdown` completes.
pub(crate) async fn run(
    opts: &DemoOptions,
    network_dir: &Path,
    network: &NetworkConfig,
    store: &StoreLocation,
    certs: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let dir = std::fs::canonicalize(&opts.dir)
        .with_context(|| format!("the demo folder {}", opts.dir.display()))?;
    let network_dir = std::fs::canonicalize(network_dir)?;
    let certs = std::fs::canonicalize(certs)?;
    let port = |i: usize| -> Result<u16> {
        opts.port_base
            .checked_add(i as u16)
            .context("--port-base is too high for the network's controllers and sites")
    };
    let store_line = match store {
        StoreLocation::Sqlite(p) => toml_str(&std::path::absolute(p)?),
        StoreLocation::Postgres(url) => format!("{url:?}"),
    };
    let mut processes: Vec<Process> = Vec::new();
    let mut globals = Vec::new();
    for k in 1..=opts.globals {
        let addr: SocketAddr = format!("127.0.0.1:{}", port(k - 1)?).parse()?;
        let folder = dir.join(format!("global-{k}"));
        std::fs::create_dir_all(&folder)?;
        let config = folder.join("global.toml");
        std::fs::write(
            &config,
            format!(
                "# global controller {k} of the demo (snaps demo --processes)\n\
                 listen = \"{addr}\"\nstore = {store_line}\nnetwork = {}\n\n\
                 [indexes]\npatient = [[\"surname\"]]\nvisit = [[\"pno\"]]\n\n\
                 [tls]\ndir = {}\n",
                toml_str(&network_dir),
                toml_str(&certs.join("global"))
            ),
        )?;
        let config_arg = config.display().to_string();
        let mut p = Process::start(
            &format!("global-{k}"),
            &["global", "serve", "--config", &config_arg],
            folder.join("global.log"),
        )?;
        p.listening(addr).await?;
        globals.push((k, p.child.id(), format!("https://{addr}")));
        processes.push(p);
    }
    let urls: Vec<String> = globals.iter().map(|(_, _, u)| format!("{u:?}")).collect();
    let mut sites = Vec::new();
    for (i, s) in network.sites.iter().enumerate() {
        let code = s.code.as_str();
        let addr: SocketAddr = format!("127.0.0.1:{}", port(opts.globals + i)?).parse()?;
        let folder = dir.join(code);
        demo_users(&dir, code)?;
        let sql_tls = certs.join(format!("{code}-sql"));
        let config = folder.join("site.toml");
        std::fs::write(
            &config,
            format!(
                "# site {code} of the demo (snaps demo --processes)\n\
                 site = \"{code}\"\nnetwork = {}\ndatabase = \"local.db\"\nlisten = \"{addr}\"\n\
                 global = [{}]\ntls = {}\nusers_file = \"users.toml\"\n{}",
                toml_str(&network_dir),
                urls.join(", "),
                toml_str(&certs.join(code)),
                if sql_tls.exists() {
                    // Offered, not required: a client on this machine may
                    // also come without TLS, as in the one-process demo.
                    format!(
                        "sql_tls = {}\nsql_tls_required = false\n",
                        toml_str(&sql_tls)
                    )
                } else {
                    String::new()
                }
            ),
        )?;
        let config_arg = config.display().to_string();
        let mut p = Process::start(
            code,
            &["site", "serve", "--config", &config_arg],
            folder.join("site.log"),
        )?;
        p.listening(addr).await?;
        sites.push((code.to_string(), p.child.id(), addr));
        processes.push(p);
    }
    for (k, pid, url) in &globals {
        println!("global-{k}: pid {pid} {url}");
    }
    for (code, pid, _) in &sites {
        println!("{code}: pid {pid}");
    }
    println!(
        "refresh now: snaps refresh --global {} --tls {}",
        globals[0].2,
        certs.join("admin").display()
    );
    println!(
        "password of user {DEMO_USER} at every site: {DEMO_PASSWORD} (PGPASSWORD={DEMO_PASSWORD})"
    );
    for (code, _, addr) in &sites {
        println!(
            "{code}: psql -h 127.0.0.1 -p {} -U {DEMO_USER} {code}",
            addr.port()
        );
    }
    println!(
        "logs and configuration: {}/global-K/, {}/<SITE>/",
        dir.display(),
        dir.display()
    );
    println!("ready");
    shutdown.await;
    println!("stopping");
    // Sites first, so none is left without its controllers.
    for p in processes.iter_mut().rev() {
        p.stop();
    }
    Ok(())
}
