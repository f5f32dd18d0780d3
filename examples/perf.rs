//! A load generator for any AMQP 0-9-1 broker, to compare WarrenMQ with RabbitMQ on
//! the same machine. It speaks the protocol directly (pipelined writes, batched acks)
//! so that the client is not what limits the figures.
//!
//! cargo run --release --example perf -- --port 5672 --seconds 10 --size 1024 \
//!     --publishers 1 --consumers 1 --confirm 256 --prefetch 256 [--persistent]
//!
//! Prints one line of key=value figures: publish and consume rates, confirm latency
//! and end-to-end latency percentiles. By default it runs for a warm-up second plus
//! `--seconds`, measures only the latter, and deletes its queue at exit.
//!
//! Other modes, for durability measurements:
//!
//! - `--count N`: publish exactly N messages (split across publishers) and stop once
//!   all are confirmed (or, without confirms, once the broker has answered a
//!   `channel.close` sent after them) and, with consumers, once N are consumed and
//!   acked. With `--consumers 0` this builds a backlog. Rates cover the whole run.
//! - `--drain`: no publishers; consume (and ack) the number of messages the queue
//!   held when declared, then stop. Reports the consume rate.
//! - `--queue NAME`: queue to use (default `perf-PID`); `--persistent` makes it
//!   durable and publishes with delivery_mode 2.
//! - `--no-delete`: keep the queue at exit (to build a backlog, or drain it later).
//! - `--probe`: retry connecting every 5 ms for up to `--seconds` until the AMQP
//!   handshake succeeds (a broker that is starting up), then passively declare
//!   `--queue` if one was given, and print `ready_ms=` and `message_count=`.
//!
//! Finite modes append `messages=`, `published=`, `consumed=` and `elapsed_s=` to the
//! line and print progress to stderr every 10 s. Consumers in finite modes ack their
//! last delivery and close their channel (waiting for close-ok) before the run ends,
//! so every ack has reached the broker when the figures are printed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amq_protocol::protocol::{basic, channel, confirm, connection, queue, AMQPClass};
use amq_protocol::types::{FieldTable, LongString, ShortString};
use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use warrenmq::protocol::{body_frame_header, read_frame, write_method, Frame, FRAME_END};

#[derive(Clone)]
struct Opts {
    host: String,
    port: u16,
    seconds: u64,
    size: usize,
    publishers: usize,
    consumers: usize,
    confirm: usize,
    prefetch: u16,
    persistent: bool,
    queue: String,
    /// Publish exactly this many messages (0: run for `seconds`).
    count: u64,
    /// Consume what the queue holds, publish nothing.
    drain: bool,
    /// Keep the queue at exit.
    no_delete: bool,
    /// Wait for the broker to accept a connection, report the queue's depth.
    probe: bool,
    /// `--queue` was given.
    named: bool,
    /// `--fanout N`: publish to a fanout exchange bound to N queues `QUEUE.0` ..
    /// `QUEUE.N-1`; consumer k reads `QUEUE.(k mod N)`.
    fanout: usize,
}

impl Opts {
    fn exchange(&self) -> String {
        if self.fanout > 0 {
            format!("{}.x", self.queue)
        } else {
            String::new()
        }
    }

    /// The queues to declare: the one queue, or the fanout's.
    fn queues(&self) -> Vec<String> {
        if self.fanout > 0 {
            (0..self.fanout)
                .map(|i| format!("{}.{i}", self.queue))
                .collect()
        } else {
            vec![self.queue.clone()]
        }
    }
}

fn parse() -> Opts {
    let mut o = Opts {
        host: "127.0.0.1".into(),
        port: 5672,
        seconds: 10,
        size: 1024,
        publishers: 1,
        consumers: 1,
        confirm: 0,
        prefetch: 256,
        persistent: false,
        queue: format!("perf-{}", std::process::id()),
        count: 0,
        drain: false,
        no_delete: false,
        probe: false,
        named: false,
        fanout: 0,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--host" => o.host = v,
            "--port" => o.port = v.parse().expect("--port"),
            "--seconds" => o.seconds = v.parse().expect("--seconds"),
            "--size" => o.size = v.parse().expect("--size"),
            "--publishers" => o.publishers = v.parse().expect("--publishers"),
            "--consumers" => o.consumers = v.parse().expect("--consumers"),
            "--confirm" => o.confirm = v.parse().expect("--confirm"),
            "--prefetch" => o.prefetch = v.parse().expect("--prefetch"),
            "--queue" => {
                o.queue = v;
                o.named = true;
            }
            "--count" => o.count = v.parse().expect("--count"),
            "--fanout" => o.fanout = v.parse().expect("--fanout"),
            "--persistent" | "--drain" | "--no-delete" | "--probe" => {
                match args[i].as_str() {
                    "--persistent" => o.persistent = true,
                    "--drain" => o.drain = true,
                    "--probe" => o.probe = true,
                    _ => o.no_delete = true,
                }
                i += 1;
                continue;
            }
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    o.size = o.size.max(8);
    if o.drain {
        o.publishers = 0;
        o.consumers = o.consumers.max(1);
    }
    o
}

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    async fn open(o: &Opts) -> Conn {
        let mut stream = TcpStream::connect((o.host.as_str(), o.port))
            .await
            .expect("connect");
        stream.set_nodelay(true).unwrap();
        stream.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
        let mut c = Conn {
            stream,
            buf: BytesMut::with_capacity(1 << 20),
        };
        c.expect_method().await; // start
        let mut response = vec![0u8];
        response.extend_from_slice(b"guest\0guest");
        c.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: FieldTable::default(),
                mechanism: "PLAIN".into(),
                response: LongString::from(response),
                locale: "en_US".into(),
            })),
        )
        .await;
        c.expect_method().await; // tune
        c.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 16,
                frame_max: 131072,
                heartbeat: 0,
            })),
        )
        .await;
        c.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        )
        .await;
        c.expect_method().await; // open-ok
        c.send(
            1,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await;
        c.expect_method().await;
        c
    }

    async fn send(&mut self, ch: u16, class: AMQPClass) {
        let mut out = BytesMut::new();
        write_method(&mut out, ch, &class);
        self.stream.write_all(&out).await.unwrap();
    }

    async fn next(&mut self) -> Frame {
        loop {
            if let Some(f) = read_frame(&mut self.buf, 131072).expect("frame") {
                return f;
            }
            if self.stream.read_buf(&mut self.buf).await.unwrap() == 0 {
                panic!("broker closed the connection");
            }
        }
    }

    /// Closes channel 1 and waits for close-ok: everything sent before has been handled.
    async fn close_channel(&mut self) {
        self.send(1, channel_close()).await;
        loop {
            if let Frame::Method(_, m) = self.next().await {
                if let AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) = *m {
                    return;
                }
            }
        }
    }

    async fn expect_method(&mut self) -> AMQPClass {
        loop {
            if let Frame::Method(_, m) = self.next().await {
                if let AMQPClass::Channel(channel::AMQPMethod::Close(c)) = &*m {
                    panic!("channel closed: {}", c.reply_text);
                }
                return *m;
            }
        }
    }
}

fn channel_close() -> AMQPClass {
    AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
        reply_code: 200,
        reply_text: "bye".into(),
        class_id: 0,
        method_id: 0,
    }))
}

/// The p-th percentile of microsecond samples, in milliseconds.
fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[tokio::main]
async fn main() {
    let o = parse();
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let consumed = Arc::new(AtomicU64::new(0));
    let confirm_lat = Arc::new(Mutex::new(Vec::<u64>::new()));
    let e2e_lat = Arc::new(Mutex::new(Vec::<u64>::new()));
    if o.probe {
        probe(&o, start).await;
    }

    // Declare the queue once; in drain mode, what it holds is what to consume.
    let held = {
        let mut c = Conn::open(&o).await;
        let mut held = 0;
        if o.fanout > 0 {
            c.send(
                1,
                AMQPClass::Exchange(amq_protocol::protocol::exchange::AMQPMethod::Declare(
                    amq_protocol::protocol::exchange::Declare {
                        exchange: o.exchange().as_str().into(),
                        kind: "fanout".into(),
                        durable: o.persistent,
                        ..Default::default()
                    },
                )),
            )
            .await;
            c.expect_method().await;
        }
        for q in o.queues() {
            c.send(
                1,
                AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                    queue: q.as_str().into(),
                    passive: false,
                    durable: o.persistent,
                    exclusive: false,
                    auto_delete: false,
                    nowait: false,
                    arguments: FieldTable::default(),
                })),
            )
            .await;
            if let AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) = c.expect_method().await {
                held = ok.message_count as u64;
            }
            if o.fanout > 0 {
                c.send(
                    1,
                    AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                        queue: q.as_str().into(),
                        exchange: o.exchange().as_str().into(),
                        routing_key: "".into(),
                        nowait: false,
                        arguments: FieldTable::default(),
                    })),
                )
                .await;
                c.expect_method().await;
            }
        }
        held
    };
    if o.count > 0 || o.drain {
        finite(o, held, start).await;
    }

    let mut tasks = Vec::new();
    for k in 0..o.consumers {
        let (mut o, stop, consumed, e2e) =
            (o.clone(), stop.clone(), consumed.clone(), e2e_lat.clone());
        if o.fanout > 0 {
            o.queue = format!("{}.{}", o.queue, k % o.fanout);
        }
        tasks.push(tokio::spawn(async move {
            consume(o, start, stop, consumed, e2e, 0).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..o.publishers {
        let (o, stop, published, lat) = (
            o.clone(),
            stop.clone(),
            published.clone(),
            confirm_lat.clone(),
        );
        tasks.push(tokio::spawn(async move {
            publish(o, start, stop, published, lat, 0).await
        }));
    }
    // Skip a warm-up second, then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (p0, c0) = (
        published.load(Ordering::Relaxed),
        consumed.load(Ordering::Relaxed),
    );
    confirm_lat.lock().unwrap().clear();
    e2e_lat.lock().unwrap().clear();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(o.seconds)).await;
    let secs = t0.elapsed().as_secs_f64();
    let (p1, c1) = (
        published.load(Ordering::Relaxed),
        consumed.load(Ordering::Relaxed),
    );
    stop.store(true, Ordering::Relaxed);
    let mut cl = confirm_lat.lock().unwrap().clone();
    let mut el = e2e_lat.lock().unwrap().clone();
    cl.sort_unstable();
    el.sort_unstable();
    println!(
        "publish_rate={:.0} consume_rate={:.0} confirm_p50_ms={:.2} confirm_p99_ms={:.2} e2e_p50_ms={:.2} e2e_p99_ms={:.2}",
        (p1 - p0) as f64 / secs,
        (c1 - c0) as f64 / secs,
        percentile(&cl, 0.5),
        percentile(&cl, 0.99),
        percentile(&el, 0.5),
        percentile(&el, 0.99),
    );
    // Clean up: delete the queue so repeated runs start empty.
    delete_queue(&o).await;
    std::process::exit(0);
}

async fn delete_queue(o: &Opts) {
    if o.no_delete {
        return;
    }
    let mut c = Conn::open(o).await;
    for q in o.queues() {
        c.send(
            1,
            AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
                queue: q.as_str().into(),
                if_unused: false,
                if_empty: false,
                nowait: false,
            })),
        )
        .await;
        c.expect_method().await;
    }
    if o.fanout > 0 {
        c.send(
            1,
            AMQPClass::Exchange(amq_protocol::protocol::exchange::AMQPMethod::Delete(
                amq_protocol::protocol::exchange::Delete {
                    exchange: o.exchange().as_str().into(),
                    if_unused: false,
                    nowait: false,
                },
            )),
        )
        .await;
        c.expect_method().await;
    }
}

/// `--probe`: wait until the broker completes a handshake, then report the queue depth.
async fn probe(o: &Opts, start: Instant) -> ! {
    let deadline = start + Duration::from_secs(o.seconds);
    loop {
        if TcpStream::connect((o.host.as_str(), o.port)).await.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            eprintln!(
                "probe: no broker on {}:{} after {}s",
                o.host, o.port, o.seconds
            );
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut c = Conn::open(o).await;
    let ready = start.elapsed();
    let mut count = -1i64;
    if o.named {
        c.send(
            1,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: o.queue.as_str().into(),
                passive: true,
                durable: false,
                exclusive: false,
                auto_delete: false,
                nowait: false,
                arguments: FieldTable::default(),
            })),
        )
        .await;
        if let AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) = c.expect_method().await {
            count = i64::from(ok.message_count);
        }
    }
    println!(
        "ready_ms={:.1} message_count={count} queue_ms={:.1}",
        ready.as_secs_f64() * 1000.0,
        start.elapsed().as_secs_f64() * 1000.0
    );
    std::process::exit(0);
}

/// `--count` and `--drain`: move a fixed number of messages, then report.
async fn finite(o: Opts, held: u64, start: Instant) -> ! {
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let consumed = Arc::new(AtomicU64::new(0));
    let confirm_lat = Arc::new(Mutex::new(Vec::<u64>::new()));
    let e2e_lat = Arc::new(Mutex::new(Vec::<u64>::new()));
    // What the consumers must take: the backlog, or what this run publishes.
    let target = if o.drain {
        held
    } else if o.consumers > 0 {
        o.count
    } else {
        0
    };
    let mut consumers = Vec::new();
    if target > 0 {
        for _ in 0..o.consumers {
            let (o, stop, consumed, e2e) =
                (o.clone(), stop.clone(), consumed.clone(), e2e_lat.clone());
            consumers.push(tokio::spawn(async move {
                consume(o, start, stop, consumed, e2e, target).await
            }));
        }
    }
    let mut publishers = Vec::new();
    if o.publishers > 0 {
        if target > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let n = o.publishers as u64;
        for i in 0..n {
            let quota = o.count / n + u64::from(i < o.count % n);
            let (o, stop, published, lat) = (
                o.clone(),
                stop.clone(),
                published.clone(),
                confirm_lat.clone(),
            );
            publishers.push(tokio::spawn(async move {
                publish(o, start, stop, published, lat, quota).await
            }));
        }
    }
    let t0 = Instant::now();
    let (mut p_end, mut c_end) = (None, None);
    let mut progress = t0;
    while p_end.is_none() || c_end.is_none() {
        let now = Instant::now();
        if p_end.is_none() && publishers.iter().all(|h| h.is_finished()) {
            p_end = Some(now);
        }
        if c_end.is_none() && consumed.load(Ordering::Relaxed) >= target {
            c_end = Some(now);
        }
        if now.duration_since(progress) >= Duration::from_secs(10) {
            progress = now;
            eprintln!(
                "progress t={:.0}s published={} consumed={}",
                now.duration_since(t0).as_secs_f64(),
                published.load(Ordering::Relaxed),
                consumed.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for h in consumers {
        let _ = h.await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let rate = |n: u64, end: Option<Instant>| {
        let secs = end.map_or(0.0, |e| e.duration_since(t0).as_secs_f64());
        if n == 0 || secs <= 0.0 {
            0.0
        } else {
            n as f64 / secs
        }
    };
    let (p, c) = (
        published.load(Ordering::Relaxed),
        consumed.load(Ordering::Relaxed),
    );
    let mut cl = confirm_lat.lock().unwrap().clone();
    let mut el = e2e_lat.lock().unwrap().clone();
    cl.sort_unstable();
    el.sort_unstable();
    println!(
        "publish_rate={:.0} consume_rate={:.0} confirm_p50_ms={:.2} confirm_p99_ms={:.2} e2e_p50_ms={:.2} e2e_p99_ms={:.2} messages={} published={} consumed={} elapsed_s={:.3}",
        rate(p, p_end),
        rate(c, c_end),
        percentile(&cl, 0.5),
        percentile(&cl, 0.99),
        percentile(&el, 0.5),
        percentile(&el, 0.99),
        if o.drain { held } else { o.count },
        p,
        c,
        elapsed,
    );
    delete_queue(&o).await;
    std::process::exit(0);
}

async fn publish(
    o: Opts,
    start: Instant,
    stop: Arc<AtomicBool>,
    published: Arc<AtomicU64>,
    lat: Arc<Mutex<Vec<u64>>>,
    quota: u64,
) {
    let mut c = Conn::open(&o).await;
    let window = o.confirm;
    if window > 0 {
        c.send(
            1,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                nowait: false,
            })),
        )
        .await;
        c.expect_method().await;
    }
    let (reader, mut writer) = c.stream.into_split();
    // The confirm reader takes the read half; without confirms it stays here.
    let mut read_half = Some((reader, c.buf));
    let permits = Arc::new(Semaphore::new(window.max(1)));
    let sent: Arc<Mutex<VecDeque<Instant>>> = Arc::new(Mutex::new(VecDeque::new()));
    let mut confirms = None;
    if window > 0 {
        let (permits, sent, lat, published) = (
            permits.clone(),
            sent.clone(),
            lat.clone(),
            published.clone(),
        );
        let (mut reader, mut buf) = read_half.take().unwrap();
        confirms = Some(tokio::spawn(async move {
            let mut confirmed = 0u64;
            loop {
                while let Some(f) = read_frame(&mut buf, 131072).expect("frame") {
                    if let Frame::Method(_, m) = f {
                        if let AMQPClass::Basic(basic::AMQPMethod::Ack(a)) = *m {
                            let upto = if a.multiple {
                                a.delivery_tag
                            } else {
                                confirmed + 1
                            };
                            let now = Instant::now();
                            let mut s = sent.lock().unwrap();
                            let mut l = lat.lock().unwrap();
                            while confirmed < upto {
                                if let Some(t) = s.pop_front() {
                                    l.push(now.duration_since(t).as_micros() as u64);
                                }
                                confirmed += 1;
                                published.fetch_add(1, Ordering::Relaxed);
                                permits.add_permits(1);
                            }
                        }
                    }
                }
                match reader.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        }));
    }
    let header = {
        let props = if o.persistent {
            basic::AMQPProperties::default().with_delivery_mode(2)
        } else {
            basic::AMQPProperties::default()
        };
        warrenmq::model::message::encode_header(o.size as u64, &props)
    };
    let publish = {
        let mut b = BytesMut::new();
        write_method(
            &mut b,
            1,
            &AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: ShortString::from(o.exchange()),
                routing_key: o.queue.as_str().into(),
                mandatory: false,
                immediate: false,
            })),
        );
        b
    };
    let mut body = vec![0u8; o.size];
    let mut out = BytesMut::with_capacity(256 * 1024);
    let mut left = if quota > 0 { quota } else { u64::MAX };
    while !stop.load(Ordering::Relaxed) && left > 0 {
        // Write a batch: as many as the confirm window allows, at most 64 at a time.
        let most = left.min(64) as usize;
        let n = if window > 0 {
            let p = permits.acquire_many(1).await.unwrap();
            p.forget();
            1 + (1..most)
                .take_while(|_| permits.try_acquire().map(|p| p.forget()).is_ok())
                .count()
        } else {
            most
        };
        left -= n as u64;
        let now = Instant::now();
        for _ in 0..n {
            let stamp = start.elapsed().as_nanos() as u64;
            body[..8].copy_from_slice(&stamp.to_be_bytes());
            out.extend_from_slice(&publish);
            out.put_u8(2);
            out.put_u16(1);
            out.put_u32(header.len() as u32);
            out.extend_from_slice(&header);
            out.put_u8(FRAME_END);
            out.extend_from_slice(&body_frame_header(1, body.len()));
            out.extend_from_slice(&body);
            out.put_u8(FRAME_END);
        }
        if window > 0 {
            let mut s = sent.lock().unwrap();
            for _ in 0..n {
                s.push_back(now);
            }
        } else {
            published.fetch_add(n as u64, Ordering::Relaxed);
        }
        if writer.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
    }
    if quota == 0 {
        return;
    }
    // A fixed count: finish once the broker has everything.
    match confirms {
        Some(task) => {
            while permits.available_permits() < window {
                if task.is_finished() {
                    panic!("the broker closed the publisher's connection");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        None => {
            let (reader, buf) = read_half.take().unwrap();
            let mut close = BytesMut::new();
            write_method(&mut close, 1, &channel_close());
            writer.write_all(&close).await.unwrap();
            let mut c = Conn {
                stream: reader.reunite(writer).unwrap(),
                buf,
            };
            loop {
                if let Frame::Method(_, m) = c.next().await {
                    if let AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) = *m {
                        return;
                    }
                }
            }
        }
    }
}

async fn consume(
    o: Opts,
    start: Instant,
    stop: Arc<AtomicBool>,
    consumed: Arc<AtomicU64>,
    lat: Arc<Mutex<Vec<u64>>>,
    target: u64,
) {
    let mut c = Conn::open(&o).await;
    c.send(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: o.prefetch,
            global: false,
        })),
    )
    .await;
    c.expect_method().await;
    c.send(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: o.queue.as_str().into(),
            consumer_tag: "".into(),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    c.expect_method().await;
    let mut last_tag = 0u64;
    let mut out = BytesMut::new();
    let mut samples = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut acked_upto = last_tag;
        while let Some(f) = read_frame(&mut c.buf, 131072).expect("frame") {
            match f {
                Frame::Method(_, m) => {
                    if let AMQPClass::Basic(basic::AMQPMethod::Deliver(d)) = *m {
                        last_tag = d.delivery_tag;
                    }
                }
                Frame::Body(_, b) if b.len() >= 8 => {
                    n += 1;
                    consumed.fetch_add(1, Ordering::Relaxed);
                    if n.is_multiple_of(16) && !o.drain {
                        let sent = u64::from_be_bytes(b[..8].try_into().unwrap());
                        let now = start.elapsed().as_nanos() as u64;
                        samples.push(now.saturating_sub(sent) / 1000);
                    }
                }
                _ => {}
            }
        }
        if last_tag > acked_upto {
            acked_upto = last_tag;
            write_method(
                &mut out,
                1,
                &AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                    delivery_tag: acked_upto,
                    multiple: true,
                })),
            );
            if c.stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if samples.len() > 64 {
            lat.lock().unwrap().append(&mut samples);
        }
        if target > 0 && consumed.load(Ordering::Relaxed) >= target {
            // Everything delivered here is acked above; close-ok proves the broker has it.
            lat.lock().unwrap().append(&mut samples);
            c.close_channel().await;
            return;
        }
        let read =
            tokio::time::timeout(Duration::from_millis(200), c.stream.read_buf(&mut c.buf)).await;
        if let Ok(Ok(0)) | Ok(Err(_)) = read {
            return;
        }
    }
}
