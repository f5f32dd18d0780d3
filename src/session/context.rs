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
    /// Who may log in, replaced whole on reload; a login reads it without a lock.
    pub users: arc_swap::ArcSwap<Vec<crate::config::User>>,
    /// Permissions per (user, vhost), replaced whole on reload.
    pub permissions: arc_swap::ArcSwap<crate::auth::PermissionTable>,
    /// Topic permissions per (user, vhost), replaced whole on reload.
    pub topic_permissions: arc_swap::ArcSwap<crate::auth::TopicTable>,
    pub vhosts: HashMap<String, Arc<Vhost>>,
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
    /// Open connections per user, for `limits.max_connections_per_user`.
    pub(crate) user_connections: Mutex<HashMap<String, u32>>,
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

    /// Counts a connection of `user`; Err(limit) when the user has reached its limit.
    pub fn user_connected(&self, user: &str) -> Result<(), u32> {
        let limit = self.config.limits.max_connections_per_user;
        let mut map = self
            .user_connections
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = map.entry(user.to_string()).or_insert(0);
        if limit != 0 && *n >= limit {
            return Err(limit);
        }
        *n += 1;
        Ok(())
    }

    pub fn user_disconnected(&self, user: &str) {
        let mut map = self
            .user_connections
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(user);
            }
        }
    }
}

impl BrokerState {
    pub fn next_connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed) + 1
    }
}
