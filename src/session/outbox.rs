//! The outgoing side of a connection. Channels, queues and the connection task
//! append frames to the outbox; one writer task drains it with vectored writes, so
//! many frames leave in one syscall. Small frames are copied into a contiguous
//! buffer, large bodies stay as the shared `Bytes` they arrived in.
//!
//! The outbox is also how a slow consumer pushes back: queues stop delivering to a
//! connection whose outbox holds more than `HIGH_WATER` bytes, and the writer wakes
//! the connection when it drains, so that it can kick those queues again.

use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

use crate::protocol::{body_frame_header, write_content_header, write_deliver, FRAME_END};

/// Bodies at least this large are sent from their own buffer rather than copied.
const COPY_LIMIT: usize = 4096;
/// Above this many queued bytes, queues stop delivering to the connection.
pub const HIGH_WATER: usize = 1 << 20;
/// At most this many buffers go to one writev call.
const MAX_IOV: usize = 64;
/// Above this many queued bytes (plus the largest delivery since the outbox was last
/// nearly empty), the connection stops reading its socket. Deliveries stop at
/// `HIGH_WATER`, so only what a client provokes without reading its answers
/// (get-ok, returns, confirms, method replies) gets here.
pub const HARD_LIMIT: usize = 4 * HIGH_WATER;

#[derive(Default)]
pub struct Outbox {
    inner: Mutex<Inner>,
    pending: AtomicUsize,
    closed: AtomicBool,
    /// Wakes the writer task.
    wake_writer: Notify,
    /// Wakes the connection task when a full outbox has drained.
    pub drained: Notify,
    /// Someone was refused room and waits for `drained`. Set by the refused side
    /// before it reads `pending` again; cleared by the writer after it lowered
    /// `pending`: with both in SeqCst order, one of them always sees the other.
    full: AtomicBool,
    /// The largest delivery queued since the outbox was last nearly empty: a single
    /// large message may overshoot `HIGH_WATER` without being a client's abuse.
    allowance: AtomicUsize,
    /// Bytes written to the socket so far, for telling a slow peer from a stalled one.
    written: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
pub struct Inner {
    buf: BytesMut,
    chunks: Vec<Bytes>,
}

impl Inner {
    /// Buffer for small frames; write methods from `protocol` into it.
    pub fn buf(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    fn push_bytes(&mut self, b: &Bytes) {
        if b.len() < COPY_LIMIT {
            self.buf.extend_from_slice(b);
        } else {
            if !self.buf.is_empty() {
                let small = self.buf.split().freeze();
                self.chunks.push(small);
            }
            self.chunks.push(b.clone());
        }
    }

    /// Writes a message's content: its raw header, then its body cut to frame_max.
    pub fn content(&mut self, channel: u16, header: &[u8], body: &Bytes, frame_max: u32) {
        write_content_header(&mut self.buf, channel, header);
        let max = (frame_max as usize)
            .saturating_sub(crate::protocol::FRAME_OVERHEAD)
            .max(1);
        let mut offset = 0;
        while offset < body.len() {
            let n = max.min(body.len() - offset);
            self.buf.extend_from_slice(&body_frame_header(channel, n));
            self.push_bytes(&body.slice(offset..offset + n));
            self.buf.extend_from_slice(&[FRAME_END]);
            offset += n;
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn deliver(
        &mut self,
        channel: u16,
        consumer_tag: &str,
        delivery_tag: u64,
        redelivered: bool,
        exchange: &str,
        routing_key: &str,
        header: &[u8],
        body: &Bytes,
        frame_max: u32,
    ) {
        write_deliver(
            &mut self.buf,
            channel,
            consumer_tag,
            delivery_tag,
            redelivered,
            exchange,
            routing_key,
        );
        self.content(channel, header, body, frame_max);
    }

    fn len(&self) -> usize {
        self.buf.len() + self.chunks.iter().map(|c| c.len()).sum::<usize>()
    }
}

/// Appends under the lock; on drop, accounts the bytes and wakes the writer.
pub struct Append<'a> {
    outbox: &'a Outbox,
    guard: MutexGuard<'a, Inner>,
    before: usize,
}

impl std::ops::Deref for Append<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.guard
    }
}

impl std::ops::DerefMut for Append<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.guard
    }
}

impl Drop for Append<'_> {
    fn drop(&mut self) {
        let added = self.guard.len().saturating_sub(self.before);
        if added > 0 {
            self.outbox.pending.fetch_add(added, Ordering::SeqCst);
            self.outbox.wake_writer.notify_one();
        }
    }
}

impl Outbox {
    pub fn append(&self) -> Append<'_> {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let before = guard.len();
        Append {
            outbox: self,
            guard,
            before,
        }
    }

    /// Whether queues may deliver more to this connection now. A refusal registers
    /// for a `drained` wake-up, so the refused queue is kicked again.
    pub fn has_room(&self) -> bool {
        !self.closed.load(Ordering::Acquire) && self.below(HIGH_WATER)
    }

    /// Whether the connection should stop reading until the peer reads its answers.
    pub fn over_hard_limit(&self) -> bool {
        let limit = HARD_LIMIT + self.allowance.load(Ordering::Acquire);
        !self.closed.load(Ordering::Acquire) && !self.below(limit)
    }

    /// `pending <= limit`; when not, asks the writer for a `drained` wake-up.
    fn below(&self, limit: usize) -> bool {
        if self.pending.load(Ordering::SeqCst) <= limit {
            return true;
        }
        self.full.store(true, Ordering::SeqCst);
        // The writer may have drained between the two reads without seeing the flag.
        self.pending.load(Ordering::SeqCst) <= limit
    }

    /// A delivery of `size` bytes was queued: it may overshoot the limits once.
    pub fn note_delivery(&self, size: usize) {
        if size > HIGH_WATER {
            self.allowance.fetch_max(size, Ordering::AcqRel);
        }
    }

    /// Bytes the writer has put on the socket so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Stops the writer once what is queued has been written.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake_writer.notify_one();
    }

    fn take(&self) -> (Vec<Bytes>, usize) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut chunks = std::mem::take(&mut inner.chunks);
        if !inner.buf.is_empty() {
            let rest = inner.buf.split().freeze();
            chunks.push(rest);
        }
        let n = chunks.iter().map(|c| c.len()).sum();
        (chunks, n)
    }

    /// The writer task: drains the outbox into the socket until closed.
    pub async fn run_writer(&self, mut socket: crate::session::transport::Writer) {
        loop {
            let (mut chunks, n) = self.take();
            if n == 0 {
                if self.closed.load(Ordering::Acquire) {
                    break;
                }
                self.wake_writer.notified().await;
                continue;
            }
            // TLS keeps what the socket would not take in its own buffer: the flush
            // sends it (for plain TCP it does nothing).
            let written = match write_all_vectored(&mut socket, &mut chunks, &self.written).await {
                Ok(()) => socket.flush().await,
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                tracing::debug!("write failed: {e}");
                self.closed.store(true, Ordering::Release);
                self.pending.store(0, Ordering::Release);
                self.drained.notify_one();
                break;
            }
            let left = self.pending.fetch_sub(n, Ordering::SeqCst) - n;
            if left <= HIGH_WATER / 2 {
                self.allowance.store(0, Ordering::Release);
            }
            if left <= HIGH_WATER / 2 && self.full.swap(false, Ordering::SeqCst) {
                self.drained.notify_one();
            }
        }
        let _ = socket.shutdown().await;
    }
}

async fn write_all_vectored(
    socket: &mut crate::session::transport::Writer,
    chunks: &mut [Bytes],
    progress: &std::sync::atomic::AtomicU64,
) -> std::io::Result<()> {
    let mut first = 0;
    while first < chunks.len() {
        let slices: Vec<IoSlice<'_>> = chunks[first..]
            .iter()
            .take(MAX_IOV)
            .map(|c| IoSlice::new(c))
            .collect();
        let mut written = socket.write_vectored(&slices).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        progress.fetch_add(written as u64, Ordering::AcqRel);
        while written > 0 && first < chunks.len() {
            let len = chunks[first].len();
            if written >= len {
                written -= len;
                first += 1;
            } else {
                chunks[first].advance(written);
                written = 0;
            }
        }
    }
    Ok(())
}
