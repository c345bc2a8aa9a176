//! The global snapshot controller: the one process every site talks to. It
//! holds the global snapshot (the union of what the sites export, with the
//! status of appendix B per tuple), loads each site's export, answers mapped
//! queries with their semi-join projections, and grants primary-copy locks.
//!
//! * [`config`] — `global.toml`;
//! * [`acl`] — access rules and the audit trail;
//! * [`query`] — requests decoded and checked against the global catalog;
//! * [`compile`] — checked fetches as parameterised SQL;
//! * [`store`] — the store trait and its results; [`sql_store`] — the store
//!   on SQL, over [`db`]: an embedded SQLite file or a PostgreSQL server;
//! * [`epochs`] — the refresh coordinator: epochs, their phases, the
//!   daily schedule;
//! * [`service`] — the gRPC service; [`GlobalController`] runs it;
//! * [`transport`] — TLS with client certificates, or plain TCP.

pub mod acl;
pub mod compile;
pub mod config;
pub mod db;
pub mod epochs;
pub mod error;
pub mod matching;
pub mod query;
pub mod service;
pub mod sql_store;
pub mod store;
pub mod transport;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use snaps_proto::v1::global_snapshot_server::GlobalSnapshotServer;
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;

pub use config::GlobalConfig;
pub use config::StoreLocation;
pub use error::{Error, Result};
pub use service::{MAX_MESSAGE_BYTES, Service};
pub use sql_store::{PgStore, SqliteStore};
pub use store::GlobalStore;

/// How often counted bytes and last-seen times are written to the store.
const ACTIVITY_FLUSH: Duration = Duration::from_secs(2);

/// A global controller ready to serve: configuration and open store.
pub struct GlobalController {
    config: Arc<GlobalConfig>,
    store: Arc<dyn GlobalStore>,
    halt: Option<epochs::Halt>,
}

impl GlobalController {
    /// Opens the store named in the configuration (creating it on first
    /// start).
    pub fn open(config: GlobalConfig) -> Result<GlobalController> {
        let store: Arc<dyn GlobalStore> = match &config.store {
            StoreLocation::Sqlite(path) => Arc::new(SqliteStore::open(path, &config)?),
            StoreLocation::Postgres(url) => Arc::new(PgStore::connect(url, &config)?),
        };
        Ok(GlobalController {
            config: Arc::new(config),
            store,
            halt: None,
        })
    }

    /// Makes the controller stop its epochs at `at`, as a crash would (for
    /// tests of crash safety); `reached` is notified when it gets there.
    pub fn halt_at(&mut self, halt: epochs::Halt) {
        self.halt = Some(halt);
    }

    /// The configuration.
    pub fn config(&self) -> &GlobalConfig {
        &self.config
    }

    /// Serves on `listener` until `shutdown` completes, then finishes the
    /// requests under way and writes the counters.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let coordinator =
            epochs::Coordinator::new(self.store.clone(), self.config.clone(), self.halt.clone())?;
        let schedule = tokio::spawn(coordinator.clone().schedule());
        let watch = tokio::spawn(coordinator.clone().watch());
        let service = Service::new(self.config.clone(), self.store.clone(), coordinator.clone())?;
        let shutdown = async move {
            shutdown.await;
            coordinator.close();
        };
        let flush = Arc::new(service.flusher());
        let ticker = {
            let flush = flush.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(ACTIVITY_FLUSH);
                loop {
                    every.tick().await;
                    let f = flush.clone();
                    match tokio::task::spawn_blocking(move || f()).await {
                        Ok(Err(e)) => tracing::warn!(error = %e, "writing counters failed"),
                        Err(e) => tracing::warn!(error = %e, "counter task failed"),
                        Ok(Ok(())) => {}
                    }
                }
            })
        };
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<GlobalSnapshotServer<Service>>().await;
        let server = GlobalSnapshotServer::new(service)
            .accept_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let addr = listener.local_addr()?;
        let router = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(server);
        let result = match &self.config.tls {
            Some(credentials) => {
                let revocation =
                    transport::Revocation::new(credentials.clone(), self.config.revoked.clone())
                        .map_err(|e| Error::Config(e.to_string()))?;
                tracing::info!(%addr, network = %self.config.network.name, revoked = ?self.config.revoked, "global controller serving (TLS, client certificates required)");
                let (incoming, acceptor) =
                    transport::tls_incoming(listener, std::sync::Arc::new(revocation));
                let served = router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await;
                acceptor.abort();
                served
            }
            None => {
                for site in self.config.sites_without_token() {
                    tracing::warn!(%site, "no token: the site cannot connect in plain-text mode");
                }
                tracing::warn!(%addr, network = %self.config.network.name, "global controller serving PLAIN TEXT (--insecure): data and tokens cross the network readable");
                let (incoming, acceptor) = transport::plain_incoming(listener);
                let served = router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await;
                acceptor.abort();
                served
            }
        };
        ticker.abort();
        schedule.abort();
        watch.abort();
        let f = flush.clone();
        tokio::task::spawn_blocking(move || f())
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        tracing::info!("global controller stopped");
        result.map_err(|e| Error::Io(std::io::Error::other(e)))
    }

    /// Listens on the configured address and serves until SIGINT or SIGTERM.
    pub async fn run(self) -> Result<()> {
        let listener = TcpListener::bind(self.config.listen).await?;
        self.serve(listener, shutdown_signal()).await
    }
}

/// Completes on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
    }
}
