//! What a connection shares with other tasks: its outbox, negotiated settings and
//! the events queues and the store's committer send it. Channels and queues hold
//! this, never the connection task itself.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

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

/// The parts of a connection that queues and channels reach from other tasks.
pub struct ConnShared {
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
    pub fn new(id: u64, frame_max: u32, events: mpsc::UnboundedSender<ConnEvent>) -> ConnShared {
        ConnShared {
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
