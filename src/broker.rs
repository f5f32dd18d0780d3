//! The broker: its vhosts, its listeners and its shutdown. `start` binds every
//! listen address first, so a busy port fails start-up, then accepts connections
//! until `BrokerHandle::shutdown` (or a signal, in the binary) stops it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{error, info};

use crate::auth::LoginThrottle;
use crate::config::Config;
use crate::model::message::MemoryGauge;
use crate::model::vhost::Vhost;
use crate::session::connection;
use crate::session::context::BrokerState;
use crate::store::{SledStore, Store, StoreError};
use std::time::Instant;
use tracing::warn;

/// A running broker.
pub struct BrokerHandle {
    addrs: Vec<SocketAddr>,
    /// Where the management HTTP API listens, if configured.
    management_addrs: Vec<SocketAddr>,
    /// Where Prometheus metrics are served, if configured.
    prometheus_addrs: Vec<SocketAddr>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    store: std::sync::Weak<dyn Store>,
    /// What connections share; weak, so that shutdown still sees the store go.
    state: std::sync::Weak<BrokerState>,
    /// The store's thread: it ends, releasing the database, once the store is dropped.
    store_thread: Option<std::thread::JoinHandle<()>>,
}

impl BrokerHandle {
    /// The first address it listens on (with the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Where Prometheus metrics are served (empty when off).
    pub fn prometheus_addrs(&self) -> &[SocketAddr] {
        &self.prometheus_addrs
    }

    /// Where the management HTTP API listens (empty when it is off).
    pub fn management_addrs(&self) -> &[SocketAddr] {
        &self.management_addrs
    }

    /// Applies a re-read configuration to the running broker (SIGHUP): the users
    /// are replaced, and the file's exchanges, queues and bindings declared (what is
    /// missing is created; a refused entry is logged and left). What cannot change
    /// while running (listeners, data directory, limits, vhosts) is logged as
    /// waiting for a restart.
    pub fn reload(&self, file: Config) {
        let Some(state) = self.state.upgrade() else {
            return;
        };
        for w in &file.warnings {
            warn!("{w}");
        }
        // What the management API made joins the file's, as at start-up.
        let config = {
            let live = state.live.lock().unwrap_or_else(|p| p.into_inner());
            state.file_config.store(Arc::new(file.clone()));
            live.join(&file)
        };
        let old = &state.config;
        let mut later = Vec::new();
        if config.listen != old.listen {
            later.push("listen");
        }
        let tls_listen = |c: &Config| c.tls.as_ref().map(|t| t.listen.clone());
        if tls_listen(&config) != tls_listen(old) {
            later.push("tls.listen (or adding or removing [tls])");
        } else if let Some(server) = &config.tls_server {
            // Certificates, key, CA and verification apply to the next connection.
            state.tls.store(Some(server.clone()));
        }
        if config.data_dir != old.data_dir {
            later.push("data_dir");
        }
        if format!("{:?}", config.limits) != format!("{:?}", old.limits) {
            later.push("[limits]");
        }
        let vhosts_changed = config.vhosts.len() != old.vhosts.len()
            || config.vhosts.iter().any(|v| state.vhost(&v.name).is_none());
        if vhosts_changed {
            later.push("[[vhosts]]");
        }
        if !later.is_empty() {
            warn!(
                "configuration reload: {} take effect at the next start",
                later.join(", ")
            );
        }
        state.refresh(&config);
        let (applied, refused) = {
            let mut created = state
                .config_created
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let before = created.clone();
            let vhosts = state.vhost_map();
            let counts = crate::declare::apply_live(&config, &vhosts, &mut created);
            if config.prune {
                crate::declare::prune(&config, &vhosts, &mut created);
            }
            if *created != before {
                created.save(&*state.store);
            }
            counts
        };
        info!(
            "configuration reloaded: {} users; {applied} declarations applied, {refused} refused",
            config.users.len()
        );
    }

    /// Stops accepting, closes every connection with 320 CONNECTION_FORCED and waits for them.
    /// When it returns, the data directory is released and may be opened again.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        // The store goes once the last connection and queue let go of it; its
        // thread then syncs what is left and ends, and with it the database.
        for _ in 0..500 {
            if self.store.strong_count() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(t) = self.store_thread {
            let joined = tokio::task::spawn_blocking(move || t.join());
            let _ = tokio::time::timeout(Duration::from_secs(5), joined).await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("recovery failed: {0}")]
    Recovery(String),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub async fn start(config: Config) -> Result<BrokerHandle, StartError> {
    for w in &config.warnings {
        warn!("{w}");
    }
    // Recover before listening, so that no client sees a half-loaded broker.
    let l = &config.limits;
    let watermark = crate::memory::effective_watermark(
        l.memory_high_watermark,
        l.memory_high_watermark_relative,
        crate::memory::available_bytes(),
    );
    if watermark < l.memory_high_watermark {
        info!(
            "memory high watermark: {watermark} bytes ({} of the memory available)",
            l.memory_high_watermark_relative
        );
    }
    let gauge = Arc::new(MemoryGauge::with_strategy(
        watermark as usize,
        l.memory_calculation_strategy == crate::config::MemoryStrategy::Rss,
    ));
    let started = Instant::now();
    // Opening the store and reading it back is disk work: off the async workers.
    let recovery = {
        let (config, gauge) = (config.clone(), gauge.clone());
        tokio::task::spawn_blocking(move || recover(&config, &gauge))
    };
    let Recovery {
        store,
        thread,
        vhosts,
        queues,
        counts: (nq, nm, skipped),
        created: recorded,
        live,
    } = recovery
        .await
        .map_err(|e| StartError::Recovery(e.to_string()))??;
    // What the management API made joins the file's configuration.
    let file_config = arc_swap::ArcSwap::from_pointee(config.clone());
    let config = live.join(&config);
    for vhost in vhosts.values() {
        vhost.start_housekeeping();
    }
    // Policies first, as RabbitMQ's definitions order them: the file's queues and
    // exchanges are declared under them.
    crate::declare::apply_policies(&config, &vhosts);
    // The file's topology goes through the same path as a client's declarations,
    // and is on disk before anyone connects.
    let mut created = recorded;
    let before = created.clone();
    let declared = match crate::declare::apply(&config, &vhosts, &mut created) {
        Ok(n) => n,
        Err(e) => {
            // Refused before serving: release the data directory before saying so,
            // so that a corrected configuration can start on it right away.
            drop(vhosts);
            drop(store);
            if let Some(t) = thread {
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
            return Err(e.into());
        }
    };
    let pruned = if config.prune {
        crate::declare::prune(&config, &vhosts, &mut created)
    } else {
        0
    };
    if created != before {
        created.save(&*store);
    }
    if pruned > 0 {
        info!("pruned {pruned} exchanges, queues and bindings the configuration no longer lists");
    }
    if declared > 0 || created != before {
        store.synced().await.map_err(StartError::Recovery)?;
        info!("declared {declared} exchanges, queues and bindings from the configuration");
    }
    for q in queues.iter().filter(|q| !vhosts.contains_key(&q.vhost)) {
        warn!(
            "queue '{}' is stored for vhost '{}', which is not configured: left on disk",
            q.name, q.vhost
        );
    }
    info!(
        "recovered {nq} durable queues and {nm} messages from {} in {:.3}s",
        config.data_dir.display(),
        started.elapsed().as_secs_f64()
    );
    if nm > 0 {
        // What the backlog's scan read and dropped goes back at once.
        crate::memory::trim();
    }
    if skipped > 0 {
        error!(
            "{skipped} stored messages could not be read and were left out (logged above); their records stay in {}",
            config.data_dir.display()
        );
    }

    // The disk alarm is known before anyone can publish.
    let disk_free = Arc::new(std::sync::atomic::AtomicU64::new(0));
    if config.limits.disk_free_limit > 0 {
        if let Some(n) = crate::disk::check(&config.data_dir, config.limits.disk_free_limit, &gauge)
        {
            disk_free.store(n, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let mut listeners = Vec::new();
    let mut addrs = Vec::new();
    bind_all(
        &config.listen,
        false,
        "AMQP 0-9-1",
        &mut listeners,
        &mut addrs,
    )
    .await?;
    let plain = addrs.len();
    if let Some(tls) = &config.tls {
        bind_all(
            &tls.listen,
            true,
            "AMQP 0-9-1 over TLS",
            &mut listeners,
            &mut addrs,
        )
        .await?;
    }
    let mut management = Vec::new();
    let (mut management_addrs, mut management_tls_addrs) = (Vec::new(), Vec::new());
    if let Some(m) = &config.management {
        bind_all(
            &m.listen,
            false,
            "the management HTTP API",
            &mut management,
            &mut management_addrs,
        )
        .await?;
        bind_all(
            &m.tls_listen,
            true,
            "the management HTTP API over TLS",
            &mut management,
            &mut management_tls_addrs,
        )
        .await?;
    }
    let mut prometheus = Vec::new();
    let (mut prometheus_addrs, mut prometheus_tls_addrs) = (Vec::new(), Vec::new());
    if let Some(m) = &config.prometheus {
        bind_all(
            &m.listen,
            false,
            "Prometheus metrics",
            &mut prometheus,
            &mut prometheus_addrs,
        )
        .await?;
        bind_all(
            &m.tls_listen,
            true,
            "Prometheus metrics over TLS",
            &mut prometheus,
            &mut prometheus_tls_addrs,
        )
        .await?;
    }
    let listening: Vec<(&'static str, SocketAddr)> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| (if i < plain { "amqp" } else { "amqp/ssl" }, *a))
        .chain(management_addrs.iter().map(|a| ("http", *a)))
        .chain(management_tls_addrs.iter().map(|a| ("https", *a)))
        .chain(prometheus_addrs.iter().map(|a| ("http/prometheus", *a)))
        .chain(
            prometheus_tls_addrs
                .iter()
                .map(|a| ("https/prometheus", *a)),
        )
        .collect();
    management_addrs.extend(management_tls_addrs);
    prometheus_addrs.extend(prometheus_tls_addrs);
    let tls = arc_swap::ArcSwapOption::new(config.tls_server.clone());
    let vhost_configs = arc_swap::ArcSwap::from_pointee(config.vhosts.clone());
    let current = arc_swap::ArcSwap::from_pointee(config.clone());
    let state = Arc::new(BrokerState {
        file_config,
        live: std::sync::Mutex::new(live),
        disk_free,
        tls,
        current,
        users: arc_swap::ArcSwap::from_pointee(config.users.clone()),
        permissions: arc_swap::ArcSwap::from_pointee(crate::auth::permission_table(
            &config.permissions,
        )),
        topic_permissions: arc_swap::ArcSwap::from_pointee(crate::auth::topic_table(
            &config.topic_permissions,
        )),
        store: store.clone(),
        gauge,
        config,
        vhosts: arc_swap::ArcSwap::from_pointee(vhosts),
        login_throttle: LoginThrottle::default(),
        next_connection: AtomicU64::new(0),
        open_connections: Default::default(),
        user_connections: Default::default(),
        vhost_connections: Default::default(),
        user_channels: Default::default(),
        vhost_configs,
        config_created: std::sync::Mutex::new(created),
        connections: Default::default(),
        closed: Default::default(),
        rates: Default::default(),
        churn: Default::default(),
        listening,
        started_at: crate::store::wall_ms(),
    });
    // One line an operator can read the broker's state from: what it serves,
    // where, and within which limits.
    let queues_now: usize = state
        .vhost_map()
        .values()
        .map(|v| v.topology().queues().count())
        .sum();
    let listening = state
        .listening
        .iter()
        .map(|(p, a)| format!("{p} {a}"))
        .collect::<Vec<_>>()
        .join(", ");
    info!(
        "WarrenMQ {} ready in {:.3}s: {} vhosts, {queues_now} queues, {nm} messages recovered; \
         listening: {listening}; memory high watermark {} bytes ({}), disk_free_limit {} bytes",
        env!("CARGO_PKG_VERSION"),
        started.elapsed().as_secs_f64(),
        state.vhost_map().len(),
        state.gauge.high(),
        if state.gauge.counts_resident() {
            "resident memory"
        } else {
            "message bodies"
        },
        state.config.limits.disk_free_limit,
    );
    let (stop, stop_rx) = watch::channel(false);
    let weak_store = Arc::downgrade(&store);
    drop(store);
    let weak_state = Arc::downgrade(&state);
    let task = tokio::spawn(accept_all(
        listeners,
        (management, prometheus),
        state,
        stop_rx,
    ));
    Ok(BrokerHandle {
        state: weak_state,
        addrs,
        management_addrs,
        prometheus_addrs,
        stop,
        task,
        store: weak_store,
        store_thread: thread,
    })
}

/// What start-up read back from the store.
struct Recovery {
    store: Arc<dyn Store>,
    thread: Option<std::thread::JoinHandle<()>>,
    vhosts: HashMap<String, Arc<Vhost>>,
    queues: Vec<crate::store::StoredQueue>,
    /// Queues, messages, and message records that could not be read.
    counts: (usize, usize, usize),
    /// What the configuration file created before.
    created: crate::declare::Created,
    /// Users, permissions and policies made through the management API.
    live: crate::live::Live,
}

/// A vhost's limits: its own max_queues, else the broker-wide ones.
pub(crate) fn vhost_limits(
    config: &Config,
    v: &crate::config::VhostConfig,
) -> crate::model::vhost::VhostLimits {
    // In [limits], 0 is unlimited; a vhost's own max_queues = 0 allows none.
    let global = |n: u32| (n != 0).then_some(n as usize);
    crate::model::vhost::VhostLimits {
        queues: v
            .max_queues
            .map(|n| n as usize)
            .or(global(config.limits.max_queues_per_vhost)),
        exchanges: global(config.limits.max_exchanges_per_vhost),
        bindings: global(config.limits.max_bindings_per_exchange),
    }
}

/// Opens the store and rebuilds every configured vhost from it.
fn recover(config: &Config, gauge: &Arc<MemoryGauge>) -> Result<Recovery, StoreError> {
    let sled = SledStore::open_with(&config.data_dir, config.limits.segment_size)?;
    gauge.watch_store_alarm(sled.write_alarm());
    let thread = sled.take_thread();
    let store: Arc<dyn Store> = sled;
    let (exchanges, queues, bindings) = (store.exchanges()?, store.queues()?, store.bindings()?);
    // Vhosts the management API made are recovered with the file's.
    let live = crate::live::Live::load(&*store);
    let joined = live.join(config);
    let mut vhosts = HashMap::new();
    let (mut nq, mut nm, mut skipped) = (0, 0, 0);
    let mut progress = crate::model::recovery::Progress::new(queues.len());
    for v in &joined.vhosts {
        let vhost = Arc::new(Vhost::new(
            &v.name,
            Some(store.clone()),
            gauge.clone(),
            config.limits.queue_memory_budget as usize,
        ));
        vhost.set_limits(vhost_limits(config, v));
        let r = vhost.recover(&exchanges, &queues, &bindings, gauge, &mut progress)?;
        nq += r.queues;
        nm += r.messages;
        skipped += r.skipped;
        vhosts.insert(v.name.clone(), vhost);
    }
    let created = crate::declare::Created::load(&*store);
    Ok(Recovery {
        store,
        thread,
        vhosts,
        queues,
        counts: (nq, nm, skipped),
        created,
        live,
    })
}

/// A listening socket, and whether it is for `amqps`.
type Listener = (TcpListener, bool);

/// Binds every address of one kind of listener (all before any accepts, so a busy
/// port fails start-up).
async fn bind_all(
    wanted: &[SocketAddr],
    tls: bool,
    what: &str,
    listeners: &mut Vec<Listener>,
    addrs: &mut Vec<SocketAddr>,
) -> Result<(), StartError> {
    for addr in wanted {
        let l = match TcpListener::bind(addr).await {
            Ok(l) => l,
            // `[::]` is dual-stack where IPv6 exists; where it does not, fall back to IPv4.
            Err(e) if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED && !ipv6_available() => {
                let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port()));
                warn!("cannot listen on {addr} ({e}): no IPv6 here, listening on {v4} instead");
                TcpListener::bind(v4)
                    .await
                    .map_err(|source| StartError::Listen { addr: v4, source })?
            }
            Err(source) => {
                return Err(StartError::Listen {
                    addr: *addr,
                    source,
                })
            }
        };
        let local = l.local_addr().map_err(|source| StartError::Listen {
            addr: *addr,
            source,
        })?;
        info!("listening for {what} on {local}");
        addrs.push(local);
        listeners.push((l, tls));
        // Where `[::]` is IPv6-only (net.ipv6.bindv6only=1), IPv4 needs its own socket;
        // where it is dual-stack, this bind fails with "address in use" and is not needed.
        if local.ip() == std::net::Ipv6Addr::UNSPECIFIED {
            if let Ok(v4) = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], local.port()))).await
            {
                if let Ok(a) = v4.local_addr() {
                    info!("listening for {what} on {a}");
                }
                listeners.push((v4, tls));
            }
        }
    }
    Ok(())
}

fn ipv6_available() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

async fn accept_all(
    listeners: Vec<Listener>,
    (management, prometheus): (Vec<Listener>, Vec<Listener>),
    state: Arc<BrokerState>,
    stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    let mut acceptors = JoinSet::new();
    if !management.is_empty() {
        acceptors.spawn(crate::management::serve(
            management,
            state.clone(),
            stop.clone(),
        ));
    }
    acceptors.spawn(crate::memory::watch(state.gauge.clone(), stop.clone()));
    let limit = state.config.limits.disk_free_limit;
    if limit > 0 {
        acceptors.spawn(crate::disk::watch(
            state.config.data_dir.clone(),
            limit,
            state.gauge.clone(),
            state.disk_free.clone(),
            stop.clone(),
        ));
    }
    if !prometheus.is_empty() {
        acceptors.spawn(crate::management::metrics::serve(
            prometheus,
            state.clone(),
            stop.clone(),
        ));
    }
    for (l, tls) in listeners {
        let state = state.clone();
        let stop = stop.clone();
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        acceptors.spawn(accept_loop(l, tx, stop.clone()));
        // Connections run in a JoinSet here so that shutdown can wait for all of
        // them; each is reaped as it ends, so a finished task's memory goes with
        // it rather than lingering until the next accept.
        connections.spawn(async move {
            let mut live = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = rx.recv() => match accepted {
                        Some((sock, peer)) => {
                            // Read per connection, so that a reload's certificates apply to the next one.
                            let tls = if tls {
                                match state.tls.load_full() {
                                    Some(server) => Some(tokio_rustls::TlsAcceptor::from(server)),
                                    None => continue,
                                }
                            } else {
                                None
                            };
                            live.spawn(connection::serve(sock, peer, tls, state.clone(), stop.clone()));
                        }
                        None => break,
                    },
                    Some(_) = live.join_next(), if !live.is_empty() => {}
                }
            }
            while live.join_next().await.is_some() {}
        });
    }
    while acceptors.join_next().await.is_some() {}
    // Connections see the same stop signal and close themselves with 320.
    let wait = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .is_err()
    {
        error!("some connections did not close within 10s of shutdown");
    }
    // Whatever the connections did last is on disk before the process goes.
    if let Err(e) = state.store.synced().await {
        error!("final flush of the store failed: {e}");
    }
    info!("broker stopped");
}

async fn accept_loop(
    listener: TcpListener,
    out: tokio::sync::mpsc::Sender<(tokio::net::TcpStream, SocketAddr)>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            r = listener.accept() => match r {
                Ok(pair) => {
                    if out.send(pair).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    // Usually EMFILE: back off rather than spin.
                    error!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}
