//! What every connection shares: the configuration, the vhosts, the store, the
//! memory gauge, the login throttle and the connection counts that the limits
//! are checked against. The broker builds it once; connections only read it,
//! apart from the counts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::auth::LoginThrottle;
use crate::config::Config;
use crate::model::message::MemoryGauge;
use crate::model::vhost::Vhost;
use crate::store::Store;

/// State every connection shares. Only read on the publish path.
pub struct BrokerState {
    /// As the broker started; `users` is the part a reload (SIGHUP) replaces.
    pub config: Config,
    /// The configuration file as last read (without what the API added).
    pub file_config: arc_swap::ArcSwap<Config>,
    /// Users, permissions and policies made through the management API; held
    /// while one is changed, so changes apply one at a time.
    pub live: Mutex<crate::live::Live>,
    /// Free bytes in the data directory's file system at the last check.
    pub disk_free: Arc<std::sync::atomic::AtomicU64>,
    /// The configuration as last loaded (start-up or SIGHUP), for listings of
    /// what it defines (permissions, policies, definitions).
    pub current: arc_swap::ArcSwap<Config>,
    /// Who may log in, replaced whole on reload; a login reads it without a lock.
    pub users: arc_swap::ArcSwap<Vec<crate::config::User>>,
    /// Permissions per (user, vhost), replaced whole on reload.
    pub permissions: arc_swap::ArcSwap<crate::auth::PermissionTable>,
    /// Topic permissions per (user, vhost), replaced whole on reload.
    pub topic_permissions: arc_swap::ArcSwap<crate::auth::TopicTable>,
    /// The vhosts by name; replaced whole when one is added or deleted (rare),
    /// read without a lock.
    pub vhosts: arc_swap::ArcSwap<HashMap<String, Arc<Vhost>>>,
    /// What `amqps` listeners serve with; a reload replaces it (new certificates
    /// for new connections, the open ones keep theirs).
    pub tls: arc_swap::ArcSwapOption<tokio_rustls::rustls::ServerConfig>,
    pub gauge: Arc<MemoryGauge>,
    pub store: Arc<dyn Store>,
    /// Paces failed logins per client address.
    pub login_throttle: LoginThrottle,
    pub(crate) next_connection: AtomicU64,
    /// Client connections open now, handshakes included.
    pub(crate) open_connections: AtomicUsize,
    /// Open connections per user (user limit max-connections, or
    /// `limits.max_connections_per_user`).
    pub(crate) user_connections: Tally,
    /// Open connections per vhost (vhost limit max-connections).
    pub(crate) vhost_connections: Tally,
    /// Open channels per user, counted for users with a max-channels limit.
    pub(crate) user_channels: Tally,
    /// Every connection being served, for listings and closing by the management API.
    pub(crate) connections: Mutex<HashMap<u64, Arc<crate::session::shared::ConnShared>>>,
    /// Counts of closed connections (their channels' included), and of what the
    /// management API published and fetched (as through a channel of its own).
    pub closed: crate::session::shared::MessageCounts,
    /// The broker-wide message rates (/api/overview), sampled with the others.
    pub rates: crate::model::stats::Rates<11>,
    pub churn: Churn,
    /// What listens, as bound: ("amqp" | "amqp/ssl" | "http", address).
    pub listening: Vec<(&'static str, std::net::SocketAddr)>,
    /// Wall-clock milliseconds when the broker started serving.
    pub started_at: u64,
    /// What the configuration file created (for `prune`), kept in the store too.
    pub config_created: Mutex<crate::declare::Created>,
    /// The vhosts' limits as last configured (a reload replaces them).
    pub vhost_configs: arc_swap::ArcSwap<Vec<crate::config::VhostConfig>>,
}

/// Connections and channels opened and closed since start.
#[derive(Default)]
pub struct Churn {
    pub connections_opened: std::sync::atomic::AtomicU64,
    pub connections_closed: std::sync::atomic::AtomicU64,
    pub channels_opened: std::sync::atomic::AtomicU64,
    pub channels_closed: std::sync::atomic::AtomicU64,
}

/// Counts per name (user or vhost) of things open now.
#[derive(Default)]
pub struct Tally(Mutex<HashMap<String, u32>>);

impl Tally {
    /// Counts one more under `key` unless `limit` is reached; Err(limit) then.
    pub fn add(&self, key: &str, limit: Option<u32>) -> Result<(), u32> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key.to_string()).or_insert(0);
        if let Some(limit) = limit.filter(|l| *n >= *l) {
            if *n == 0 {
                map.remove(key);
            }
            return Err(limit);
        }
        *n += 1;
        Ok(())
    }

    pub fn remove(&self, key: &str) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(key);
            }
        }
    }
}

/// A connection listed in `BrokerState::connections` until dropped.
pub struct Registered {
    broker: Arc<BrokerState>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let gone = self
            .broker
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        // Its counts stay in the broker's totals.
        if let Some(c) = gone {
            c.counts_into(&self.broker.closed);
            if let Some(v) = c.opened().and_then(|o| self.broker.vhost(&o.vhost)) {
                c.counts_into(&v.closed_counts);
            }
            let churn = &self.broker.churn;
            let add = |a: &std::sync::atomic::AtomicU64, n: u64| {
                a.fetch_add(n, Ordering::Relaxed);
            };
            add(&churn.connections_closed, 1);
            add(
                &churn.channels_opened,
                c.channels_opened.load(Ordering::Relaxed),
            );
            // Channels still open when the connection went close with it.
            add(
                &churn.channels_closed,
                c.channels_closed.load(Ordering::Relaxed) + c.channels().len() as u64,
            );
        }
    }
}

/// A channel counted against its user's max-channels until dropped.
pub struct CountedChannel {
    broker: Arc<BrokerState>,
    user: String,
}

impl Drop for CountedChannel {
    fn drop(&mut self) {
        self.broker.user_channels.remove(&self.user);
    }
}

/// Counts a connection as open until dropped.
pub struct OpenConnection {
    broker: Arc<BrokerState>,
    /// How many were open with this one, itself included.
    pub open: usize,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.broker.open_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

impl BrokerState {
    pub fn connection_opened(self: &Arc<Self>) -> OpenConnection {
        let open = self.open_connections.fetch_add(1, Ordering::AcqRel) + 1;
        OpenConnection {
            broker: self.clone(),
            open,
        }
    }

    /// Counts a connection of `user`; Err(limit) when the user has reached its
    /// limit (its own max_connections, else `limits.max_connections_per_user`).
    pub fn user_connected(&self, user: &crate::config::User) -> Result<(), u32> {
        let global = self.config.limits.max_connections_per_user;
        let limit = user.max_connections.or((global != 0).then_some(global));
        self.user_connections.add(&user.name, limit)
    }

    pub fn user_disconnected(&self, user: &str) {
        self.user_connections.remove(user)
    }

    /// Counts a connection to `vhost`; Err(limit) at its max_connections.
    pub fn vhost_connected(&self, vhost: &str) -> Result<(), u32> {
        let limit = self
            .vhost_configs
            .load()
            .iter()
            .find(|v| v.name == vhost)
            .and_then(|v| v.max_connections);
        self.vhost_connections.add(vhost, limit)
    }

    pub fn vhost_disconnected(&self, vhost: &str) {
        self.vhost_connections.remove(vhost)
    }

    /// What `user` may do in `vhost`: its permissions entry there governs; without
    /// one, a vhost in its `vhosts` list allows everything; otherwise None (the
    /// vhost is refused).
    pub fn permissions_for(
        &self,
        user: &crate::config::User,
        vhost: &str,
    ) -> Option<Arc<crate::auth::Permissions>> {
        let key = (user.name.clone(), vhost.to_string());
        match self.permissions.load().get(&key) {
            Some(p) => Some(p.clone()),
            None if user.vhosts.iter().any(|v| v == vhost) => {
                Some(Arc::new(crate::auth::Permissions::all()))
            }
            None => None,
        }
    }

    pub fn vhost(&self, name: &str) -> Option<Arc<Vhost>> {
        self.vhosts.load().get(name).cloned()
    }

    /// Adds a vhost made at run time (the management API), with whatever the store
    /// holds for it from before; its limits and policies come with the next refresh.
    pub async fn add_vhost(&self, name: &str) -> Result<Arc<Vhost>, String> {
        let vhost = Arc::new(Vhost::new(
            name,
            Some(self.store.clone()),
            self.gauge.clone(),
            self.config.limits.queue_memory_budget as usize,
        ));
        // Reading the store back is disk work: off the async workers.
        let (store, gauge, v) = (self.store.clone(), self.gauge.clone(), vhost.clone());
        tokio::task::spawn_blocking(move || {
            let (x, q, b) = (store.exchanges()?, store.queues()?, store.bindings()?);
            let mut progress = crate::model::recovery::Progress::new(q.len());
            v.recover(&x, &q, &b, &gauge, &mut progress).map(|_| ())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        vhost.start_housekeeping();
        self.vhosts.rcu(|map| {
            let mut next = (**map).clone();
            next.insert(name.to_string(), vhost.clone());
            next
        });
        Ok(vhost)
    }

    /// Removes a vhost made at run time: its connections are closed, its queues
    /// (and their messages) and exchanges deleted from the store.
    pub fn remove_vhost(&self, name: &str) {
        let Some(vhost) = self.vhost(name) else {
            return;
        };
        self.vhosts.rcu(|map| {
            let mut next = (**map).clone();
            next.remove(name);
            next
        });
        for c in self.connections() {
            if c.opened().is_some_and(|o| o.vhost == name) {
                c.request_close(format!("vhost '{name}' is deleted"));
            }
        }
        vhost.delete_everything();
    }

    /// Every vhost now.
    pub fn vhost_map(&self) -> Arc<HashMap<String, Arc<Vhost>>> {
        self.vhosts.load_full()
    }

    /// Applies a configuration's users, permissions, topic permissions, vhost
    /// limits and policies (SIGHUP, or a change made through the management API).
    pub fn refresh(&self, config: &Config) {
        self.users.store(Arc::new(config.users.clone()));
        self.current.store(Arc::new(config.clone()));
        self.vhost_configs.store(Arc::new(config.vhosts.clone()));
        for v in &config.vhosts {
            if let Some(vhost) = self.vhost(&v.name) {
                vhost.set_limits(crate::broker::vhost_limits(config, v));
            }
        }
        self.permissions
            .store(Arc::new(crate::auth::permission_table(&config.permissions)));
        self.topic_permissions
            .store(Arc::new(crate::auth::topic_table(
                &config.topic_permissions,
            )));
        crate::declare::apply_policies(config, &self.vhost_map());
    }

    /// Lists a connection until the returned guard is dropped.
    pub fn register_connection(
        self: &Arc<Self>,
        c: &Arc<crate::session::shared::ConnShared>,
    ) -> Registered {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(c.id, c.clone());
        self.churn
            .connections_opened
            .fetch_add(1, Ordering::Relaxed);
        Registered {
            broker: self.clone(),
            id: c.id,
        }
    }

    /// The connections being served, by id.
    pub fn connections(&self) -> Vec<Arc<crate::session::shared::ConnShared>> {
        let mut v: Vec<_> = self
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Counts a channel of a user with a max-channels limit; Err(limit) when reached.
    pub fn channel_opened(self: &Arc<Self>, user: &str, limit: u32) -> Result<CountedChannel, u32> {
        self.user_channels.add(user, Some(limit))?;
        Ok(CountedChannel {
            broker: self.clone(),
            user: user.to_string(),
        })
    }
}

impl BrokerState {
    pub fn next_connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed) + 1
    }
}
