//! One task per client connection: the handshake, then a loop that reads frames,
//! hands each to its channel, and watches heartbeats, broker shutdown and memory
//! pressure. A second task per connection writes (see `outbox`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{channel, connection, AMQPClass};
use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::session::transport::{split_tcp, split_tls, Reader};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, warn, Instrument};

mod handshake;

use super::channel::{After, Channel};
use super::context::BrokerState;
use super::shared::{ConnEvent, ConnShared};
use crate::error::AmqpError;
use crate::model::vhost::Vhost;

use crate::protocol::{read_frame_with, short, write_heartbeat, write_method, Frame, TableLimits};

/// Idle time before the kernel starts probing a silent peer.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// How long a paused connection waits for a peer that reads nothing at all.
const SEND_STALL: Duration = Duration::from_secs(60);

/// What a connection ends with when the broker shuts down (RabbitMQ's 320).
fn shutting_down() -> End {
    End::Error(AmqpError::connection_forced(
        "broker forced connection closure with reason 'shutdown'".into(),
    ))
}

/// A reply held back until the store has synced: channel, method, cancellations.
/// Input that must wait before the connection reads on.
enum Pending {
    /// A durable change: its reply (channel, method, cancellations) waits for the store.
    Sync(u16, AMQPClass, Option<crate::model::change::Cancellations>),
    /// A method to handle again once the receiver resolves.
    Retry(u16, tokio::sync::oneshot::Receiver<()>, AMQPClass),
}

/// Why the connection loop ended.
enum End {
    /// The peer went away or the socket failed.
    Gone,
    /// A connection error: send connection.close with it.
    Error(AmqpError),
    /// The handshake or heartbeat deadline passed.
    Timeout,
    /// Closed cleanly (close/close-ok exchanged), or refused before the handshake.
    Done,
    /// The client sent connection.close and we answered close-ok.
    ClientClosed,
}

impl From<AmqpError> for End {
    fn from(e: AmqpError) -> End {
        End::Error(e)
    }
}

/// Serves one client: over TLS when `tls` is given (the handshake runs here, in
/// the connection's own task, within the handshake timeout).
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    broker: Arc<BrokerState>,
    shutdown: watch::Receiver<bool>,
) {
    let id = broker.next_connection_id();
    let counted = broker.connection_opened();
    let max = broker.config.limits.max_connections as usize;
    let over_broker_limit = (max != 0 && counted.open > max).then_some(max);
    let span = tracing::info_span!("conn", id, %peer);
    async move {
        // Counted as open until this task ends.
        let _counted = counted;
        let _ = stream.set_nodelay(true);
        // Finds peers that vanished without a FIN (power loss, a dropped route) even
        // when heartbeats were negotiated off.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(Duration::from_secs(10))
            .with_retries(6);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let info = crate::session::shared::ConnInfo {
            peer,
            local: stream.local_addr().unwrap_or(peer),
            tls: tls.is_some(),
            connected_at: crate::store::wall_ms(),
        };
        let (reader, writer, client_cn) = match tls {
            None => {
                let (r, w) = split_tcp(stream);
                (r, w, None)
            }
            Some(acceptor) => {
                let limit = Duration::from_secs(broker.config.limits.handshake_timeout);
                let stream = match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return debug!("TLS handshake failed: {e}"),
                    Err(_) => return debug!("TLS handshake timed out"),
                };
                // Only a certificate the verifier accepted gets this far.
                let cn = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .and_then(crate::tls::common_name);
                let (r, w) = split_tls(stream);
                (r, w, Some(cn))
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(ConnShared::new(
            id,
            broker.config.limits.frame_max,
            tx,
            info,
        ));
        let _registered = broker.register_connection(&shared);
        let writer_shared = shared.clone();
        let writer_task = tokio::spawn(
            async move { writer_shared.outbox.run_writer(writer).await }.in_current_span(),
        );
        let mut conn = Connection {
            frame_max: broker.config.limits.frame_max,
            channel_max: broker.config.limits.channel_max,
            tables: TableLimits {
                max_depth: broker.config.limits.max_header_depth.max(1) as usize,
                max_fields: broker.config.limits.max_table_fields.max(1) as usize,
            },
            broker,
            shared: shared.clone(),
            peer,
            client_cn,
            input: Input {
                shared: shared.clone(),
                reader,
                buf: BytesMut::with_capacity(READ_MIN),
                chunk: READ_MIN,
            },
            events: rx,
            channels: HashMap::new(),
            vhost: None,
            heartbeat: 0,
            over_broker_limit,
            counted_user: None,
            counted_vhost: None,
            channel_limit: None,
            published: false,
            blocked_capable: false,
            shutdown,
        };
        conn.run().await;
        conn.cleanup();
        shared.outbox.close();
        // A peer that never reads would keep the writer (and its socket and
        // outbox) forever: it gets a few seconds to take what is left, no more.
        let writer_abort = writer_task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), writer_task)
            .await
            .is_err()
        {
            writer_abort.abort();
        }
        debug!("connection closed");
    }
    .instrument(span)
    .await
}

/// Read buffer sizes: an idle connection keeps the smallest; one whose reads fill
/// the buffer doubles it, up to the largest, so that a busy publisher reads in
/// large chunks and ten thousand idle ones cost little.
const READ_MIN: usize = 4 * 1024;
const READ_MAX: usize = 64 * 1024;

/// The read half and what has been read but not yet parsed.
struct Input {
    /// Counts the bytes read, for listings.
    shared: Arc<ConnShared>,
    reader: Reader,
    buf: BytesMut,
    /// How much room the next read gets.
    chunk: usize,
}

impl Input {
    /// Reads more bytes; EOF and errors end the connection.
    async fn fill(&mut self, deadline: Option<Instant>) -> Result<(), End> {
        if self.buf.capacity() - self.buf.len() < self.chunk / 4 {
            self.buf.reserve(self.chunk);
        }
        let room = self.buf.capacity() - self.buf.len();
        let read = self.reader.read_buf(&mut self.buf);
        let n = match deadline {
            Some(d) => tokio::time::timeout_at(d, read)
                .await
                .map_err(|_| End::Timeout)?,
            None => read.await,
        };
        match n {
            Ok(0) | Err(_) => Err(End::Gone),
            Ok(n) => {
                self.shared
                    .received
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                if n == room {
                    self.chunk = (self.chunk * 2).min(READ_MAX);
                }
                Ok(())
            }
        }
    }
}

struct Connection {
    broker: Arc<BrokerState>,
    shared: Arc<ConnShared>,
    peer: SocketAddr,
    /// Over TLS: the verified client certificate's common name, if any (for
    /// EXTERNAL). None on plain TCP.
    client_cn: Option<Option<String>>,
    input: Input,
    events: mpsc::UnboundedReceiver<ConnEvent>,
    channels: HashMap<u16, Channel>,
    vhost: Option<Arc<Vhost>>,
    frame_max: u32,
    channel_max: u16,
    /// Bounds on field tables, checked before decoding.
    tables: TableLimits,
    heartbeat: u16,
    /// Opened past `limits.max_connections`: refused once connection.start is out.
    over_broker_limit: Option<usize>,
    /// The user this connection counts against, once open.
    counted_user: Option<String>,
    /// The vhost this connection counts against, once open.
    counted_vhost: Option<String>,
    /// The user's max-channels limit (over all its connections), if it has one.
    channel_limit: Option<u32>,
    published: bool,
    blocked_capable: bool,
    shutdown: watch::Receiver<bool>,
}

impl Connection {
    async fn run(&mut self) {
        let end = match self.handshake().await {
            Ok(()) => self.main_loop().await,
            Err(e) => e,
        };
        match end {
            End::Error(e) => {
                if e.code != 320 {
                    warn!("closing connection: {e}");
                }
                self.close_with(e).await;
            }
            End::Timeout => warn!("closing connection: timed out"),
            End::ClientClosed => self.linger().await,
            End::Gone | End::Done => {}
        }
    }

    fn send(&self, channel: u16, class: &AMQPClass) {
        write_method(self.shared.outbox.append().buf(), channel, class);
    }

    async fn next_frame(&mut self, deadline: Instant) -> Result<Frame, End> {
        loop {
            if let Some(f) = read_frame_with(&mut self.input.buf, self.frame_max, &self.tables)? {
                return Ok(f);
            }
            self.input.fill(Some(deadline)).await?;
        }
    }

    async fn main_loop(&mut self) -> End {
        let hb = Duration::from_secs(self.heartbeat as u64);
        let frame_timeout = Duration::from_secs(self.broker.config.limits.frame_timeout.max(1));
        // One timer for heartbeats and the frame deadline, checked on each tick rather
        // than armed per read: a deadline is then enforced within half its length late.
        let mut period = frame_timeout / 2;
        if self.heartbeat > 0 {
            period = period.min(hb / 2);
        }
        let consumer_timeout = self.broker.config.limits.consumer_timeout;
        if consumer_timeout > 0 {
            period = period.min(Duration::from_millis(consumer_timeout / 2));
        }
        let mut ticker = tokio::time::interval_at(
            Instant::now() + period,
            period.max(Duration::from_millis(100)),
        );
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_beat = Instant::now();
        let mut last_read = Instant::now();
        // When the frame now in the read buffer began to arrive.
        let mut partial_since: Option<Instant> = None;
        loop {
            if let Some(end) = self.forced() {
                return end;
            }
            // Frames that arrived together may hold more than one full frame.
            if let Err(e) = self.process_frames().await {
                return e;
            }
            if self.input.buf.is_empty() {
                partial_since = None;
            } else if partial_since.is_none() {
                partial_since = Some(Instant::now());
            }
            // When a queue we publish to outpaces its consumers, let their tasks
            // (acks free credit, credit frees deliveries) run before reading more.
            // Costs nothing when the broker is idle; shares it fairly when it is not.
            let mut backlogged = false;
            for ch in self.channels.values_mut() {
                backlogged |= std::mem::take(&mut ch.backlogged);
            }
            if backlogged {
                tokio::task::yield_now().await;
            }
            if self.published && self.broker.gauge.over() {
                if let Some(end) = self.wait_for_memory().await {
                    return end;
                }
                last_read = Instant::now();
                partial_since = partial_since.map(|_| last_read);
            }
            // A client that keeps asking without reading the answers stops being read.
            if self.shared.outbox.over_hard_limit() {
                if let Some(end) = self.wait_for_outbox().await {
                    return end;
                }
                last_read = Instant::now();
                partial_since = partial_since.map(|_| last_read);
            }
            tokio::select! {
                _ = self.shutdown.changed() => return shutting_down(),
                Some(ev) = self.events.recv() => self.on_event(ev),
                _ = self.shared.outbox.drained.notified() => {
                    if self.shared.outbox.is_closed() {
                        return End::Gone;
                    }
                    for ch in self.channels.values() {
                        ch.resume();
                    }
                }
                r = self.input.fill(None) => {
                    if let Err(e) = r {
                        return e;
                    }
                    last_read = Instant::now();
                }
                _ = ticker.tick() => {
                    let now = crate::model::queue::refresh_coarse();
                    self.close_overdue_channels(now, consumer_timeout);
                    if partial_since.is_some_and(|t| t.elapsed() > frame_timeout) {
                        warn!("a frame did not arrive whole within {}s", frame_timeout.as_secs());
                        return End::Timeout;
                    }
                    if self.heartbeat > 0 {
                        if last_read.elapsed() > hb * 2 {
                            warn!("missed heartbeats from client, timeout: {}s", self.heartbeat);
                            return End::Timeout;
                        }
                        if last_beat.elapsed() >= hb / 2 {
                            write_heartbeat(self.shared.outbox.append().buf());
                            last_beat = Instant::now();
                        }
                    }
                }
            }
        }
    }

    /// Stops reading from a publisher while the broker is over its memory watermark.
    async fn wait_for_memory(&mut self) -> Option<End> {
        let disk = self.broker.gauge.disk_alarm() && !self.broker.gauge.memory_over();
        if disk {
            warn!("free disk space below the limit, blocking publisher");
        } else {
            warn!(
                "memory high watermark exceeded ({} bytes held), blocking publisher",
                self.broker.gauge.used()
            );
        }
        if self.blocked_capable {
            self.send(
                0,
                &AMQPClass::Connection(connection::AMQPMethod::Blocked(connection::Blocked {
                    reason: short(if disk { "low on disk" } else { "low on memory" }),
                })),
            );
        }
        // Not reading is the backpressure; the client still hears heartbeats meanwhile.
        let beat = Duration::from_secs(self.heartbeat.max(1) as u64) / 2;
        let mut last_beat = Instant::now();
        while self.broker.gauge.over() {
            if self.heartbeat > 0 && last_beat.elapsed() >= beat {
                write_heartbeat(self.shared.outbox.append().buf());
                last_beat = Instant::now();
            }
            tokio::select! {
                _ = self.shutdown.changed() => return Some(shutting_down()),
                Some(ev) = self.events.recv() => {
                    self.on_event(ev);
                    if let Some(end) = self.forced() {
                        return Some(end);
                    }
                }
                _ = self.shared.outbox.drained.notified() => {
                    for ch in self.channels.values() {
                        ch.resume();
                    }
                }
                _ = self.broker.gauge.below.notified() => {}
                _ = self.input.reader.hung_up() => return Some(End::Gone),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        if self.blocked_capable {
            self.send(
                0,
                &AMQPClass::Connection(connection::AMQPMethod::Unblocked(connection::Unblocked {})),
            );
        }
        None
    }

    /// Stops reading until the peer has read enough of what it asked for; a peer
    /// that reads nothing for `SEND_STALL` is dropped.
    async fn wait_for_outbox(&mut self) -> Option<End> {
        debug!("outbox over its limit: not reading until the client reads");
        let mut written = self.shared.outbox.written();
        let mut progress = Instant::now();
        while self.shared.outbox.over_hard_limit() {
            tokio::select! {
                _ = self.shutdown.changed() => return Some(shutting_down()),
                Some(ev) = self.events.recv() => {
                    self.on_event(ev);
                    if let Some(end) = self.forced() {
                        return Some(end);
                    }
                }
                _ = self.shared.outbox.drained.notified() => {
                    if self.shared.outbox.is_closed() {
                        return Some(End::Gone);
                    }
                    for ch in self.channels.values() {
                        ch.resume();
                    }
                }
                _ = self.input.reader.hung_up() => return Some(End::Gone),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    let now = self.shared.outbox.written();
                    if now != written {
                        written = now;
                        progress = Instant::now();
                    } else if progress.elapsed() >= SEND_STALL {
                        warn!("client read nothing for {}s with its answers pending", SEND_STALL.as_secs());
                        return Some(End::Timeout);
                    }
                }
            }
        }
        None
    }

    /// The channel with this number, if it is still the same channel.
    fn channel_of(&mut self, id: u16, generation: u64) -> Option<&mut Channel> {
        self.channels
            .get_mut(&id)
            .filter(|c| c.shared.generation == generation)
    }

    /// A close asked for from outside (the management API): 320, as RabbitMQ.
    fn forced(&self) -> Option<End> {
        self.shared
            .close_reason()
            .map(|reason| End::Error(AmqpError::connection_forced(reason.to_string())))
    }

    fn on_event(&mut self, ev: ConnEvent) {
        match ev {
            ConnEvent::Close => {}
            ConnEvent::ConsumerGone {
                channel,
                generation,
                tag,
            } => {
                if let Some(ch) = self.channel_of(channel, generation) {
                    ch.consumer_gone(&tag);
                }
            }
            ConnEvent::Synced {
                channel,
                generation,
                confirm,
                ok,
            } => {
                if let Some(ch) = self.channel_of(channel, generation) {
                    ch.synced(confirm, ok);
                }
            }
        }
    }

    async fn process_frames(&mut self) -> Result<(), End> {
        let mut any = false;
        while let Some(frame) = read_frame_with(&mut self.input.buf, self.frame_max, &self.tables)?
        {
            any = true;
            let mut pending = self.handle_frame(frame)?;
            while let Some(Pending::Retry(channel, ready, class)) = pending {
                // A closed channel or a dropped sender: the retry just finds out.
                let _ = ready.await;
                pending = self.handle_frame(Frame::Method(channel, Box::new(class)))?;
            }
            if let Some(Pending::Sync(channel, reply, cancel)) = pending {
                // A durable change: the reply waits for the store, and so does the
                // rest of this connection's input, which keeps replies in order.
                let synced = match self.vhost.as_ref().and_then(|v| v.store.clone()) {
                    Some(store) => store.synced().await,
                    None => Ok(()),
                };
                if let Err(e) = synced {
                    return Err(AmqpError::internal_error(format!("store sync failed: {e}")).into());
                }
                if self.channels.get(&channel).is_some_and(|c| !c.closing) {
                    self.send(channel, &reply);
                }
                if let Some(c) = cancel {
                    c.notify();
                }
            }
        }
        if any {
            for ch in self.channels.values_mut() {
                ch.flush_confirms();
            }
        }
        Ok(())
    }

    /// Handles one frame; returns a reply that must wait for a store sync, if any.
    fn handle_frame(&mut self, frame: Frame) -> Result<Option<Pending>, End> {
        tracing::trace!(?frame, "frame");
        let channel_id = match &frame {
            Frame::Method(c, _)
            | Frame::Body(c, _)
            | Frame::Heartbeat(c)
            | Frame::Refused(c, _) => *c,
            Frame::Header { channel, .. } => *channel,
        };
        if channel_id == 0 {
            return self.connection_frame(frame).map(|_| None);
        }
        if let Frame::Heartbeat(_) = frame {
            return Err(AmqpError::unexpected_frame("type 8, all octets = <<>>".into()).into());
        }
        let Some(ch) = self.channels.get_mut(&channel_id) else {
            return self.open_channel(channel_id, frame).map(|_| None);
        };
        if ch.closing {
            // After channel.close, RabbitMQ discards all but close and close-ok.
            if let Frame::Method(_, class) = frame {
                match *class {
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
                        self.channels.remove(&channel_id);
                    }
                    AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                        self.send(
                            channel_id,
                            &AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                        );
                    }
                    _ => {}
                }
            }
            return Ok(None);
        }
        let result = match frame {
            Frame::Method(_, class) => {
                if let Err(e) = ch.check_not_mid_content() {
                    return Err(e.into());
                }
                if matches!(
                    *class,
                    AMQPClass::Basic(amq_protocol::protocol::basic::AMQPMethod::Publish(_))
                ) {
                    self.published = true;
                }
                ch.handle(*class)
            }
            Frame::Header {
                raw,
                body_size,
                properties,
                ..
            } => ch
                .handle_header(raw, body_size, *properties)
                .map(|_| After::Nothing),
            Frame::Body(_, body) => ch.handle_body(body).map(|_| After::Nothing),
            Frame::Heartbeat(_) => Ok(After::Nothing),
            Frame::Refused(_, e) => Err(e),
        };
        match result {
            Ok(After::Nothing) => Ok(None),
            Ok(After::SyncThenReply(reply, cancel)) => {
                Ok(Some(Pending::Sync(channel_id, reply, cancel)))
            }
            Ok(After::Retry(ready, class)) => Ok(Some(Pending::Retry(channel_id, ready, class))),
            Ok(After::Closed) => {
                self.channels.remove(&channel_id);
                Ok(None)
            }
            Err(e) if e.is_channel_error() => {
                self.close_channel(channel_id, e);
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Closes a channel for `e` (a channel error): its unconfirmed publishes are
    /// answered, its deliveries go back, and it waits for close-ok.
    fn close_channel(&mut self, channel_id: u16, e: AmqpError) {
        let Some(ch) = self.channels.get_mut(&channel_id) else {
            return;
        };
        debug!(channel = channel_id, "closing channel: {e}");
        ch.flush_confirms();
        ch.release();
        ch.closing = true;
        self.send(
            channel_id,
            &AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: e.code,
                reply_text: short(e.text),
                class_id: e.class_id,
                method_id: e.method_id,
            })),
        );
    }

    /// RabbitMQ's consumer timeout: a channel whose oldest unacknowledged
    /// delivery is older than its queue's timeout (x-consumer-timeout or policy),
    /// else the broker's (`global` ms, 0 for none), is closed with its text.
    fn close_overdue_channels(&mut self, now: u64, global: u64) {
        let overdue: Vec<(u16, u64)> = self
            .channels
            .iter()
            .filter(|(_, ch)| !ch.closing)
            .filter_map(|(id, ch)| {
                let (at, queue) = ch.shared.oldest_unacked()?;
                let timeout = queue.or((global > 0).then_some(global))?;
                (now.saturating_sub(at) > timeout).then_some((*id, timeout))
            })
            .collect();
        for (id, timeout) in overdue {
            warn!(
                channel = id,
                "a consumer on channel {id} has timed out waiting for delivery acknowledgement ({timeout} ms)"
            );
            self.close_channel(
                id,
                AmqpError::precondition_failed(format!(
                    "delivery acknowledgement on channel {id} timed out. Timeout value used: {timeout} ms. \
                     This timeout value can be configured, see consumers doc guide to learn more"
                )),
            );
        }
    }

    fn open_channel(&mut self, id: u16, frame: Frame) -> Result<(), End> {
        let class = match frame {
            Frame::Method(_, class) => class,
            // The channel's error comes before the method's own.
            Frame::Refused(_, e) => {
                return Err(AmqpError::channel_error("expected 'channel.open'".into())
                    .with_method(e.class_id, e.method_id)
                    .into())
            }
            _ => return Err(AmqpError::channel_error("expected 'channel.open'".into()).into()),
        };
        if !matches!(*class, AMQPClass::Channel(channel::AMQPMethod::Open(_))) {
            return Err(AmqpError::channel_error("expected 'channel.open'".into())
                .with_method(class.get_amqp_class_id(), class.get_amqp_method_id())
                .into());
        }
        // As RabbitMQ: channel_max bounds how many channels are open, not their
        // numbers (any of 1..=65535 may be used).
        let open = self.channels.len();
        if self.channel_max != 0 && open >= self.channel_max as usize {
            return Err(AmqpError::not_allowed(format!(
                "number of channels opened ({open}) has reached the negotiated channel_max ({})",
                self.channel_max
            ))
            .into());
        }
        let Some(vhost) = self.vhost.clone() else {
            return Err(AmqpError::channel_error("connection not open".into()).into());
        };
        let counted = match self.channel_limit {
            None => None,
            Some(limit) => {
                let user = self.shared.user();
                match self.broker.channel_opened(user, limit) {
                    Ok(c) => Some(c),
                    Err(limit) => {
                        return Err(AmqpError::not_allowed(format!(
                            "number of channels opened for user '{user}' has reached the maximum allowed user limit of ({limit})"
                        ))
                        .with_method(20, 10)
                        .into())
                    }
                }
            }
        };
        let generation = self.shared.next_generation();
        let mut ch = Channel::new(
            (id, generation),
            self.shared.clone(),
            vhost,
            self.broker.gauge.clone(),
            (
                self.broker.config.limits.max_message_size,
                self.broker.config.limits.max_consumers_per_channel,
            ),
        );
        ch.counted = counted;
        self.channels.insert(id, ch);
        self.send(
            id,
            &AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
        );
        Ok(())
    }

    fn connection_frame(&mut self, frame: Frame) -> Result<(), End> {
        let class = match frame {
            Frame::Heartbeat(_) => return Ok(()),
            Frame::Method(_, class) => class,
            Frame::Refused(_, e) => return Err(e.into()),
            _ => {
                return Err(AmqpError::unexpected_frame("content frame on channel 0".into()).into())
            }
        };
        match *class {
            AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                debug!(
                    code = c.reply_code,
                    text = c.reply_text.as_str(),
                    "client closed connection"
                );
                self.cleanup();
                self.send(
                    0,
                    &AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                );
                Err(End::ClientClosed)
            }
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => Err(End::Done),
            AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(_)) => {
                self.send(
                    0,
                    &AMQPClass::Connection(connection::AMQPMethod::UpdateSecretOk(
                        connection::UpdateSecretOk {},
                    )),
                );
                Ok(())
            }
            AMQPClass::Connection(connection::AMQPMethod::Blocked(_))
            | AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)) => Ok(()),
            other => Err(AmqpError::channel_error(
                "unexpected method in connection state running".into(),
            )
            .with_method(other.get_amqp_class_id(), other.get_amqp_method_id())
            .into()),
        }
    }

    fn release_channels(&mut self) {
        for (_, mut ch) in self.channels.drain() {
            ch.release();
        }
    }

    /// Sends connection.close and waits briefly for close-ok, discarding other frames.
    async fn close_with(&mut self, e: AmqpError) {
        self.release_channels();
        self.send(
            0,
            &AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: e.code,
                reply_text: short(e.text),
                class_id: e.class_id,
                method_id: e.method_id,
            })),
        );
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match read_frame_with(&mut self.input.buf, self.frame_max, &self.tables) {
                Ok(Some(Frame::Method(0, class)))
                    if matches!(
                        *class,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))
                            | AMQPClass::Connection(connection::AMQPMethod::Close(_))
                    ) =>
                {
                    return
                }
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(_) => {
                    // Unparseable input after an error: nothing more can be read sensibly.
                    return;
                }
            }
            if self.input.fill(Some(deadline)).await.is_err() {
                return;
            }
        }
    }

    /// After close-ok, leave closing the socket to the client, as RabbitMQ does, so
    /// that clients see a clean end rather than a reset; give up after a second.
    async fn linger(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            self.input.buf.clear();
            if self.input.fill(Some(deadline)).await.is_err() {
                return;
            }
        }
    }

    fn cleanup(&mut self) {
        self.release_channels();
        if let Some(user) = self.counted_user.take() {
            self.broker.user_disconnected(&user);
        }
        if let Some(vhost) = self.counted_vhost.take() {
            self.broker.vhost_disconnected(&vhost);
        }
        if let Some(v) = &self.vhost {
            v.connection_closed(self.shared.id);
        }
    }
}
