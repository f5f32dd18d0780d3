//! What a connection shares with other tasks: its outbox, negotiated settings and
//! the events queues and the store's committer send it. Channels and queues hold
//! this, never the connection task itself.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use amq_protocol::types::FieldTable;

use tokio::sync::mpsc;

use super::outbox::Outbox;

/// Things other tasks tell a connection. Each names the channel by number and by
/// generation: a channel number closed and opened again is another channel, and
/// must not receive what was meant for the old one (a confirm above all).
pub enum ConnEvent {
    /// A consumer's queue was deleted; the channel forgets the consumer.
    ConsumerGone {
        channel: u16,
        generation: u64,
        tag: Arc<str>,
    },
    /// Close the connection (see `ConnShared::request_close`).
    Close,
    /// The store flushed what a publisher confirm waited for.
    Synced {
        channel: u16,
        generation: u64,
        confirm: Synced,
        ok: bool,
    },
}

/// The confirm a store flush releases.
#[derive(Debug, Clone, Copy)]
pub enum Synced {
    /// basic.ack multiple=true up to this tag (a nack when the flush failed).
    AckUpTo(u64),
    /// basic.nack of one publish, held back so that it follows earlier acks.
    Nack(u64),
}

pub use crate::model::stats::MessageCounts;

/// What listings show of a connection, fixed when it was accepted.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
    /// Wall-clock milliseconds since the Unix epoch.
    pub connected_at: u64,
}

/// What the handshake settled, for listings.
#[derive(Debug, Clone)]
pub struct Opened {
    pub vhost: String,
    pub mechanism: String,
    pub client_properties: FieldTable,
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
}

/// The parts of a connection that queues and channels reach from other tasks.
pub struct ConnShared {
    pub info: ConnInfo,
    /// Set once connection.open was accepted.
    opened: OnceLock<Opened>,
    /// Bytes read from the client.
    pub received: AtomicU64,
    /// Its channels, for listings (closed ones are dropped as new ones open).
    channels: Mutex<Vec<Weak<crate::session::delivery::ChannelShared>>>,
    /// Counts of its closed channels.
    pub closed_channels: MessageCounts,
    /// Channels it opened and closed.
    pub channels_opened: AtomicU64,
    pub channels_closed: AtomicU64,
    /// A request to close the connection from outside (the management API).
    close: OnceLock<String>,
    pub id: u64,
    pub outbox: Outbox,
    frame_max: AtomicU32,
    cancel_notify: AtomicBool,
    events: mpsc::UnboundedSender<ConnEvent>,
    /// The authenticated user, once the handshake got that far.
    user: OnceLock<String>,
    /// Numbers every channel this connection opens.
    generations: AtomicU64,
    /// What the user may do in the vhost, once connection.open was accepted.
    permissions: OnceLock<Arc<crate::auth::Permissions>>,
    /// Topic permissions in this vhost; none set = every routing key allowed.
    topics: OnceLock<Arc<crate::auth::TopicPermissions>>,
}

impl ConnShared {
    pub fn new(
        id: u64,
        frame_max: u32,
        events: mpsc::UnboundedSender<ConnEvent>,
        info: ConnInfo,
    ) -> ConnShared {
        ConnShared {
            info,
            opened: OnceLock::new(),
            received: AtomicU64::new(0),
            channels: Mutex::new(Vec::new()),
            close: OnceLock::new(),
            closed_channels: MessageCounts::default(),
            channels_opened: AtomicU64::new(0),
            channels_closed: AtomicU64::new(0),
            id,
            outbox: Outbox::default(),
            frame_max: AtomicU32::new(frame_max),
            cancel_notify: AtomicBool::new(false),
            events,
            user: OnceLock::new(),
            generations: AtomicU64::new(0),
            permissions: OnceLock::new(),
            topics: OnceLock::new(),
        }
    }

    /// RabbitMQ's name for a connection: "peer -> local".
    pub fn name(&self) -> String {
        format!("{} -> {}", self.info.peer, self.info.local)
    }

    pub fn set_opened(&self, o: Opened) {
        let _ = self.opened.set(o);
    }

    pub fn opened(&self) -> Option<&Opened> {
        self.opened.get()
    }

    pub fn add_channel(&self, ch: &Arc<crate::session::delivery::ChannelShared>) {
        let mut list = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|w| w.upgrade().is_some_and(|c| c.is_open()));
        list.push(Arc::downgrade(ch));
        self.channels_opened.fetch_add(1, Ordering::Relaxed);
    }

    /// Its counts: the open channels' and the closed ones'.
    pub fn counts_into(&self, into: &MessageCounts) {
        self.closed_channels.add_to(into);
        for ch in self.channels() {
            ch.counts.add_to(into);
        }
    }

    /// The open channels, by number.
    pub fn channels(&self) -> Vec<Arc<crate::session::delivery::ChannelShared>> {
        let list = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = list
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|c| c.is_open())
            .collect();
        out.sort_by_key(|c| c.id);
        out
    }

    /// Asks the connection to close with 320 CONNECTION_FORCED and this reason.
    pub fn request_close(&self, reason: String) {
        if self.close.set(reason).is_ok() {
            let _ = self.events.send(ConnEvent::Close);
        }
    }

    pub fn close_reason(&self) -> Option<&str> {
        self.close.get().map(|s| s.as_str())
    }

    pub fn set_permissions(&self, p: Arc<crate::auth::Permissions>) {
        let _ = self.permissions.set(p);
    }

    pub fn set_topic_permissions(&self, t: Arc<crate::auth::TopicPermissions>) {
        let _ = self.topics.set(t);
    }

    /// The user's topic permissions, if it has any in this vhost.
    pub fn topic_permissions(&self) -> Option<&crate::auth::TopicPermissions> {
        self.topics.get().map(|t| &**t).filter(|t| !t.is_empty())
    }

    /// Whether the user may do `access` on the named exchange or queue.
    pub fn allows(&self, access: crate::auth::Access, name: &str) -> bool {
        self.permissions
            .get()
            .is_some_and(|p| p.allows(access, name))
    }

    pub fn set_frame_max(&self, frame_max: u32) {
        self.frame_max.store(frame_max, Ordering::Relaxed);
    }

    pub fn set_consumer_cancel_notify(&self, on: bool) {
        self.cancel_notify.store(on, Ordering::Relaxed);
    }

    pub fn set_user(&self, user: &str) {
        let _ = self.user.set(user.to_string());
    }

    /// A number for a channel being opened, never used before on this connection.
    pub fn next_generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn frame_max(&self) -> u32 {
        self.frame_max.load(Ordering::Relaxed)
    }

    pub fn consumer_cancel_notify(&self) -> bool {
        self.cancel_notify.load(Ordering::Relaxed)
    }

    pub fn user(&self) -> &str {
        self.user.get().map(|s| s.as_str()).unwrap_or("")
    }

    pub fn event(&self, e: ConnEvent) {
        let _ = self.events.send(e);
    }
}
