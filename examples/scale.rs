//! Scaling figures for any AMQP 0-9-1 broker on 127.0.0.1: many queues and bindings,
//! a wide fanout, many idle connections, many consumers on one queue. Like
//! `examples/perf.rs` it speaks the protocol directly, pipelines its requests and
//! batches its acks, so that the client is not what limits the figures.
//!
//! cargo run --release --example scale -- SCENARIO [--port 5672] [--seconds 10] \
//!     [--broker-pid PID] [options]
//!
//! Scenarios (a first word, or `--scenario NAME`); each prints one line of key=value
//! figures on stdout, progress on stderr:
//!
//! - `topology --queues N` (100000): on one connection and channel, declare a topic
//!   exchange, N queues `scale-q-<i>` (non-durable, not exclusive, not auto-delete),
//!   then bind queue i with `scale.<i>.*`; requests are pipelined, `--window` (256)
//!   in flight. Reports declare_s, bind_s, total_s. Then a publish/consume run on that
//!   exchange, routing keys `scale.<k>.x` with k cycling over 0..10, one consumer on
//!   each of queues 0..9 (10 connections, one channel each). The N queues are then
//!   deleted (pipelined: delete_s) and the same run is repeated on a fresh exchange
//!   with 10 queues and bindings; `*_ratio` is (N bindings) / (10 bindings).
//! - `fanout --queues N` (1000): a fanout exchange bound to N queues, one consumer per
//!   queue on its own channel, `--channels` (100) channels per connection (1000 queues:
//!   10 connections x 100 channels). Reports publish_rate and deliver_rate (the sum
//!   over consumers) and, with `--broker-pid`, broker CPU microseconds per delivery.
//! - `idle --connections N` (10000): open N connections (handshake and channel.open),
//!   `--concurrency` (200) at a time, hold them; with `--broker-pid` reports the
//!   broker's VmRSS before, with all open, and after they are closed again, and
//!   (open - before) / opened in KiB per connection. Heartbeats are disabled (tune-ok
//!   0). A failed handshake is retried up to 5 times; `retries` counts the failures.
//! - `consumers --consumers N` (10000): one queue, N consumers, one per channel,
//!   `--channels` (100) channels per connection (10000: 100 connections x 100
//!   channels). A run with N consumers, then one with a single consumer on a fresh
//!   queue; `*_ratio` is (N consumers) / (1 consumer).
//!
//! Every run has one publisher of `--size` (16) byte transient messages with publisher
//! confirms, `--confirm` (256) unconfirmed at most; publish_rate counts confirmed
//! messages. Consumers use `--prefetch` (256) per channel and ack with multiple=true,
//! one ack per channel per read. A run waits until every consumer is registered,
//! publishes for a warm-up second, then measures `--seconds` (10). With
//! `--broker-pid PID`, broker_cpu_pct and broker_cpu_us_per_delivery come from
//! /proc/PID/stat (utime+stime) over the measured window; client_cpu_pct is this
//! process's own share (the two share the machine's cores).
//!
//! Everything is bounded: the process exits with status 2 after `--timeout` (1800)
//! seconds whatever it is doing. It connects only to 127.0.0.1, and deletes the
//! queues and exchanges it made and closes its connections before it exits.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{basic, channel, confirm, connection, exchange, queue, AMQPClass};
use amq_protocol::types::{FieldTable, LongString, ShortString};
use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use warrenmq::protocol::{body_frame_header, read_frame, write_method, Frame, FRAME_END};

const HOST: &str = "127.0.0.1";
const FRAME_MAX: u32 = 131072;

#[derive(Clone)]
struct Opts {
    scenario: String,
    port: u16,
    seconds: u64,
    queues: usize,
    connections: usize,
    consumers: usize,
    channels: usize,
    concurrency: usize,
    window: usize,
    confirm: usize,
    prefetch: u16,
    size: usize,
    broker_pid: Option<u32>,
    timeout: u64,
}

fn parse() -> Opts {
    let mut o = Opts {
        scenario: String::new(),
        port: 5672,
        seconds: 10,
        queues: 0,
        connections: 10000,
        consumers: 10000,
        channels: 100,
        concurrency: 200,
        window: 256,
        confirm: 256,
        prefetch: 256,
        size: 16,
        broker_pid: None,
        timeout: 1800,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if !a.starts_with("--") && o.scenario.is_empty() {
            o.scenario = a.to_string();
            i += 1;
            continue;
        }
        let v = args.get(i + 1).cloned().unwrap_or_default();
        let num = |name: &str| -> u64 {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} needs a number, got '{v}'"))
        };
        match a {
            "--scenario" => o.scenario = v.clone(),
            "--port" => o.port = num(a) as u16,
            "--seconds" => o.seconds = num(a),
            "--queues" => o.queues = num(a) as usize,
            "--connections" => o.connections = num(a) as usize,
            "--consumers" => o.consumers = num(a) as usize,
            "--channels" => o.channels = num(a) as usize,
            "--concurrency" => o.concurrency = num(a) as usize,
            "--window" => o.window = num(a) as usize,
            "--confirm" => o.confirm = num(a) as usize,
            "--prefetch" => o.prefetch = num(a) as u16,
            "--size" => o.size = num(a) as usize,
            "--broker-pid" => o.broker_pid = Some(num(a) as u32),
            "--timeout" => o.timeout = num(a),
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    if o.queues == 0 {
        o.queues = if o.scenario == "fanout" { 1000 } else { 100000 };
    }
    o.window = o.window.max(1);
    o.confirm = o.confirm.max(1);
    o.channels = o.channels.clamp(1, 2000);
    o.concurrency = o.concurrency.max(1);
    o
}

/// One connection whose handshake is done and whose channel 1 is open.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

/// What a consumer reads: the hot frames are recognised without decoding them.
enum In {
    Deliver(u16, u64),
    Content,
    Frame(Frame),
}

fn next_in(buf: &mut BytesMut) -> Option<In> {
    if buf.len() < 7 {
        return None;
    }
    let ch = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    if buf.len() < size + 8 {
        return None;
    }
    match buf[0] {
        // basic.deliver: class 60, method 60, consumer tag, delivery tag.
        1 if size > 13 && buf[7..11] == [0, 60, 0, 60] => {
            let l = buf[11] as usize;
            let tag = u64::from_be_bytes(buf[12 + l..20 + l].try_into().unwrap());
            buf.advance(size + 8);
            Some(In::Deliver(ch, tag))
        }
        2 | 3 => {
            buf.advance(size + 8);
            Some(In::Content)
        }
        _ => read_frame(buf, FRAME_MAX).expect("frame").map(In::Frame),
    }
}

/// Panics on a channel or connection closed by the broker.
fn check_close(m: &AMQPClass) {
    match m {
        AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
            panic!("broker closed a channel: {} {}", c.reply_code, c.reply_text)
        }
        AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
            panic!(
                "broker closed the connection: {} {}",
                c.reply_code, c.reply_text
            )
        }
        _ => {}
    }
}

impl Conn {
    async fn open(port: u16, buf: usize) -> Conn {
        Conn::try_open(port, buf)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The handshake and channel.open, in at most 30 s; an error says which step failed.
    async fn try_open(port: u16, buf: usize) -> Result<Conn, String> {
        tokio::time::timeout(Duration::from_secs(30), Conn::handshake(port, buf))
            .await
            .map_err(|_| "handshake: no answer in 30 s".to_string())?
    }

    async fn handshake(port: u16, buf: usize) -> Result<Conn, String> {
        let io = |step: &'static str| move |e: std::io::Error| format!("{step}: {e}");
        let mut stream = TcpStream::connect((HOST, port))
            .await
            .map_err(io("connect"))?;
        stream.set_nodelay(true).map_err(io("nodelay"))?;
        stream
            .write_all(b"AMQP\x00\x00\x09\x01")
            .await
            .map_err(io("protocol header"))?;
        let mut c = Conn {
            stream,
            buf: BytesMut::with_capacity(buf),
        };
        c.try_method("connection.start").await?;
        let mut response = vec![0u8];
        response.extend_from_slice(b"guest\0guest");
        let mut out = BytesMut::new();
        write_method(
            &mut out,
            0,
            &AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: FieldTable::default(),
                mechanism: "PLAIN".into(),
                response: LongString::from(response),
                locale: "en_US".into(),
            })),
        );
        c.stream.write_all(&out).await.map_err(io("start-ok"))?;
        let channel_max = match c.try_method("connection.tune").await? {
            AMQPClass::Connection(connection::AMQPMethod::Tune(t)) if t.channel_max > 0 => {
                t.channel_max
            }
            _ => 2047,
        };
        out.clear();
        write_method(
            &mut out,
            0,
            &AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max,
                frame_max: FRAME_MAX,
                heartbeat: 0,
            })),
        );
        write_method(
            &mut out,
            0,
            &AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        );
        write_method(
            &mut out,
            1,
            &AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        );
        c.stream.write_all(&out).await.map_err(io("tune-ok"))?;
        c.try_method("connection.open-ok").await?;
        c.try_method("channel.open-ok").await?;
        Ok(c)
    }

    async fn fill(&mut self) {
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) => panic!("broker closed the connection"),
            Err(e) => panic!("read from the broker: {e}"),
            Ok(_) => {}
        }
    }

    /// The next method frame during the handshake, or why there is none.
    async fn try_method(&mut self, what: &str) -> Result<AMQPClass, String> {
        loop {
            while let Some(f) = next_in(&mut self.buf) {
                if let In::Frame(Frame::Method(_, m)) = f {
                    if let AMQPClass::Connection(connection::AMQPMethod::Close(c)) = &*m {
                        return Err(format!(
                            "{what}: connection.close {} {}",
                            c.reply_code, c.reply_text
                        ));
                    }
                    return Ok(*m);
                }
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Err(format!("{what}: the broker closed the connection")),
                Err(e) => return Err(format!("{what}: {e}")),
                Ok(_) => {}
            }
        }
    }

    /// Sends the requests in order, at most `window` of them without their reply (each
    /// has exactly one). Returns how long that took.
    async fn pipeline(
        &mut self,
        what: &str,
        reqs: impl IntoIterator<Item = (u16, AMQPClass)>,
        window: usize,
    ) -> f64 {
        let t0 = Instant::now();
        let mut reqs = reqs.into_iter().peekable();
        let (mut sent, mut done) = (0usize, 0usize);
        let mut out = BytesMut::new();
        let mut said = t0;
        while reqs.peek().is_some() || done < sent {
            while sent - done < window {
                let Some((ch, m)) = reqs.next() else { break };
                write_method(&mut out, ch, &m);
                sent += 1;
            }
            if !out.is_empty() {
                self.stream.write_all(&out).await.unwrap();
                out.clear();
            }
            // Wait for at least half the window to come back before writing more.
            let want = if reqs.peek().is_some() {
                sent - window / 2
            } else {
                sent
            };
            while done < want {
                while let Some(f) = next_in(&mut self.buf) {
                    if let In::Frame(Frame::Method(_, m)) = f {
                        check_close(&m);
                        done += 1;
                    }
                }
                if done < want {
                    self.fill().await;
                }
            }
            if said.elapsed() >= Duration::from_secs(10) {
                said = Instant::now();
                eprintln!(
                    "  {what}: {done} done in {:.0}s",
                    t0.elapsed().as_secs_f64()
                );
            }
        }
        t0.elapsed().as_secs_f64()
    }

    /// connection.close, then waits (at most 30 s) for close-ok.
    async fn close(mut self) {
        let mut out = BytesMut::new();
        write_method(&mut out, 0, &connection_close());
        if self.stream.write_all(&out).await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                while let Some(f) = next_in(&mut self.buf) {
                    if let In::Frame(Frame::Method(_, m)) = f {
                        if let AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) = *m {
                            return;
                        }
                    }
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

fn connection_close() -> AMQPClass {
    AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
        reply_code: 200,
        reply_text: "bye".into(),
        class_id: 0,
        method_id: 0,
    }))
}

fn declare_exchange(name: &str, kind: &str) -> AMQPClass {
    AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
        exchange: name.into(),
        kind: kind.into(),
        ..Default::default()
    }))
}

fn delete_exchange(name: &str) -> AMQPClass {
    AMQPClass::Exchange(exchange::AMQPMethod::Delete(exchange::Delete {
        exchange: name.into(),
        if_unused: false,
        nowait: false,
    }))
}

fn declare_queue(name: &str) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: name.into(),
        passive: false,
        durable: false,
        exclusive: false,
        auto_delete: false,
        nowait: false,
        arguments: FieldTable::default(),
    }))
}

fn delete_queue(name: &str) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
        queue: name.into(),
        if_unused: false,
        if_empty: false,
        nowait: false,
    }))
}

fn bind(q: &str, x: &str, key: &str) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
        queue: q.into(),
        exchange: x.into(),
        routing_key: key.into(),
        nowait: false,
        arguments: FieldTable::default(),
    }))
}

/// CPU time (utime + stime) of a process in seconds, from /proc/PID/stat.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the line; `rest` starts at field 3.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// VmRSS of a process in KiB, from /proc/PID/status.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Consumers on one connection: `channels[i]` lists the queues consumed on channel i+1.
type Layout = Vec<Vec<Vec<String>>>;

struct RunResult {
    publish_rate: f64,
    deliver_rate: f64,
    /// Broker CPU over the window, in seconds, when its pid is known.
    broker_cpu: Option<f64>,
    client_cpu: Option<f64>,
    secs: f64,
}

impl RunResult {
    fn figures(&self, prefix: &str) -> String {
        let mut s = format!(
            "{prefix}publish_rate={:.0} {prefix}deliver_rate={:.0}",
            self.publish_rate, self.deliver_rate
        );
        if let Some(cpu) = self.broker_cpu {
            let deliveries = self.deliver_rate * self.secs;
            s += &format!(
                " {prefix}broker_cpu_pct={:.0} {prefix}broker_cpu_us_per_delivery={:.2}",
                cpu / self.secs * 100.0,
                if deliveries > 0.0 {
                    cpu * 1e6 / deliveries
                } else {
                    0.0
                }
            );
        }
        if let Some(cpu) = self.client_cpu {
            s += &format!(" {prefix}client_cpu_pct={:.0}", cpu / self.secs * 100.0);
        }
        s
    }
}

/// One publisher to `exchange` cycling over `keys`, consumers as `layout` says; a
/// warm-up second, then `--seconds` measured.
async fn run(o: &Opts, exchange: &str, keys: &[String], layout: Layout) -> RunResult {
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let delivered = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(AtomicUsize::new(0));
    let n_conns = layout.len();
    let mut tasks = Vec::new();
    let setup = Arc::new(Semaphore::new(20));
    for channels in layout {
        let (o, stop, delivered, ready, setup) = (
            o.clone(),
            stop.clone(),
            delivered.clone(),
            ready.clone(),
            setup.clone(),
        );
        tasks.push(tokio::spawn(async move {
            consume(o, channels, stop, delivered, ready, setup).await
        }));
    }
    let t0 = Instant::now();
    while ready.load(Ordering::Relaxed) < n_conns {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "  {n_conns} consumer connections ready in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let publisher = {
        let (o, stop, published) = (o.clone(), stop.clone(), published.clone());
        let (exchange, keys) = (exchange.to_string(), keys.to_vec());
        tokio::spawn(async move { publish(o, exchange, keys, stop, published).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let broker = o.broker_pid.map(|p| p.to_string());
    let cpu = |pid: &Option<String>| pid.as_deref().and_then(cpu_seconds);
    let me = Some("self".to_string());
    let (b0, m0) = (cpu(&broker), cpu(&me));
    let (p0, d0) = (
        published.load(Ordering::Relaxed),
        delivered.load(Ordering::Relaxed),
    );
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(o.seconds)).await;
    let secs = t0.elapsed().as_secs_f64();
    let (p1, d1) = (
        published.load(Ordering::Relaxed),
        delivered.load(Ordering::Relaxed),
    );
    let (b1, m1) = (cpu(&broker), cpu(&me));
    stop.store(true, Ordering::Relaxed);
    let _ = publisher.await;
    for t in tasks {
        let _ = t.await;
    }
    RunResult {
        publish_rate: (p1 - p0) as f64 / secs,
        deliver_rate: (d1 - d0) as f64 / secs,
        broker_cpu: b0.zip(b1).map(|(a, b)| b - a),
        client_cpu: m0.zip(m1).map(|(a, b)| b - a),
        secs,
    }
}

async fn publish(
    o: Opts,
    exchange: String,
    keys: Vec<String>,
    stop: Arc<AtomicBool>,
    published: Arc<AtomicU64>,
) {
    let mut c = Conn::open(o.port, 1 << 16).await;
    c.pipeline(
        "confirm.select",
        [(
            1,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                nowait: false,
            })),
        )],
        1,
    )
    .await;
    // One whole message (method, header, body frames) per routing key.
    let messages: Vec<BytesMut> = keys
        .iter()
        .map(|k| {
            let mut b = BytesMut::new();
            write_method(
                &mut b,
                1,
                &AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                    exchange: ShortString::from(exchange.clone()),
                    routing_key: k.as_str().into(),
                    mandatory: false,
                    immediate: false,
                })),
            );
            // Content header: class 60, weight 0, body size, no properties.
            b.put_u8(2);
            b.put_u16(1);
            b.put_u32(14);
            b.put_u16(60);
            b.put_u16(0);
            b.put_u64(o.size as u64);
            b.put_u16(0);
            b.put_u8(FRAME_END);
            b.extend_from_slice(&body_frame_header(1, o.size));
            b.extend_from_slice(&vec![0u8; o.size]);
            b.put_u8(FRAME_END);
            b
        })
        .collect();
    let (mut reader, mut writer) = c.stream.into_split();
    let mut buf = c.buf;
    let permits = Arc::new(Semaphore::new(o.confirm));
    let confirms = {
        let (permits, published) = (permits.clone(), published.clone());
        tokio::spawn(async move {
            let mut confirmed = 0u64;
            loop {
                while let Some(f) = next_in(&mut buf) {
                    let In::Frame(Frame::Method(_, m)) = f else {
                        continue;
                    };
                    let (tag, multiple) = match *m {
                        AMQPClass::Basic(basic::AMQPMethod::Ack(a)) => (a.delivery_tag, a.multiple),
                        AMQPClass::Basic(basic::AMQPMethod::Nack(a)) => {
                            eprintln!("publisher: the broker nacked {}", a.delivery_tag);
                            (a.delivery_tag, a.multiple)
                        }
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => return,
                        m => {
                            check_close(&m);
                            continue;
                        }
                    };
                    let upto = if multiple { tag } else { confirmed + 1 };
                    if upto > confirmed {
                        let n = upto - confirmed;
                        confirmed = upto;
                        published.fetch_add(n, Ordering::Relaxed);
                        permits.add_permits(n as usize);
                    }
                }
                match reader.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
    };
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut k = 0;
    while !stop.load(Ordering::Relaxed) {
        let p = match tokio::time::timeout(Duration::from_millis(200), permits.acquire()).await {
            Ok(p) => p.unwrap(),
            Err(_) => continue,
        };
        p.forget();
        let mut n = 1;
        while n < 64 && permits.try_acquire().map(|p| p.forget()).is_ok() {
            n += 1;
        }
        for _ in 0..n {
            out.extend_from_slice(&messages[k]);
            k = (k + 1) % messages.len();
        }
        if writer.write_all(&out).await.is_err() {
            panic!("publisher: the broker closed the connection");
        }
        out.clear();
    }
    write_method(&mut out, 0, &connection_close());
    let _ = writer.write_all(&out).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), confirms).await;
}

async fn consume(
    o: Opts,
    channels: Vec<Vec<String>>,
    stop: Arc<AtomicBool>,
    delivered: Arc<AtomicU64>,
    ready: Arc<AtomicUsize>,
    setup: Arc<Semaphore>,
) {
    let permit = setup.acquire().await.unwrap();
    let mut c = Conn::open(o.port, 1 << 20).await;
    let mut reqs = Vec::new();
    for (i, queues) in channels.iter().enumerate() {
        let ch = i as u16 + 1;
        if ch > 1 {
            reqs.push((
                ch,
                AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            ));
        }
        reqs.push((
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: o.prefetch,
                global: false,
            })),
        ));
        for q in queues {
            reqs.push((
                ch,
                AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                    queue: q.as_str().into(),
                    consumer_tag: "".into(),
                    no_local: false,
                    no_ack: false,
                    exclusive: false,
                    nowait: false,
                    arguments: FieldTable::default(),
                })),
            ));
        }
    }
    c.pipeline("consumer setup", reqs, o.window).await;
    drop(permit);
    ready.fetch_add(1, Ordering::Relaxed);
    // Highest delivery tag seen and acked, per channel.
    let mut seen = vec![0u64; channels.len() + 1];
    let mut acked = vec![0u64; channels.len() + 1];
    let mut out = BytesMut::new();
    while !stop.load(Ordering::Relaxed) {
        let mut n = 0;
        while let Some(f) = next_in(&mut c.buf) {
            match f {
                In::Deliver(ch, tag) => {
                    n += 1;
                    seen[ch as usize] = tag;
                }
                In::Frame(Frame::Method(_, m)) => check_close(&m),
                _ => {}
            }
        }
        if n > 0 {
            delivered.fetch_add(n, Ordering::Relaxed);
            for ch in 1..seen.len() {
                if seen[ch] > acked[ch] {
                    acked[ch] = seen[ch];
                    write_method(
                        &mut out,
                        ch as u16,
                        &AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                            delivery_tag: seen[ch],
                            multiple: true,
                        })),
                    );
                }
            }
            if c.stream.write_all(&out).await.is_err() {
                panic!("consumer: the broker closed the connection");
            }
            out.clear();
        }
        let read =
            tokio::time::timeout(Duration::from_millis(200), c.stream.read_buf(&mut c.buf)).await;
        if let Ok(Ok(0)) | Ok(Err(_)) = read {
            panic!("consumer: the broker closed the connection");
        }
    }
    c.close().await;
}

/// Consumers spread `per` channels to a connection, each channel consuming `queues[i]`.
fn spread(queues: &[String], per: usize) -> Layout {
    queues
        .chunks(per)
        .map(|c| c.iter().map(|q| vec![q.clone()]).collect())
        .collect()
}

/// Declares N queues bound to `x` (topic, `scale.<i>.*`), pipelined. (declare_s, bind_s)
async fn topic_topology(o: &Opts, c: &mut Conn, x: &str, names: &[String]) -> (f64, f64) {
    c.pipeline("exchange", [(1, declare_exchange(x, "topic"))], 1)
        .await;
    let declare = c
        .pipeline(
            "queue.declare",
            names.iter().map(|q| (1, declare_queue(q))),
            o.window,
        )
        .await;
    let binds = c
        .pipeline(
            "queue.bind",
            names
                .iter()
                .enumerate()
                .map(|(i, q)| (1, bind(q, x, &format!("scale.{i}.*")))),
            o.window,
        )
        .await;
    (declare, binds)
}

async fn delete_all(o: &Opts, c: &mut Conn, x: &str, names: &[String]) -> f64 {
    let t = c
        .pipeline(
            "queue.delete",
            names.iter().map(|q| (1, delete_queue(q))),
            o.window,
        )
        .await;
    c.pipeline("exchange.delete", [(1, delete_exchange(x))], 1)
        .await;
    t
}

async fn topology(o: &Opts) -> String {
    let n = o.queues.max(10);
    let keys: Vec<String> = (0..10).map(|k| format!("scale.{k}.x")).collect();
    let mut c = Conn::open(o.port, 1 << 20).await;
    let x = "scale-topic";
    let names: Vec<String> = (0..n).map(|i| format!("scale-q-{i}")).collect();
    eprintln!("topology: declaring {n} queues and bindings");
    let t0 = Instant::now();
    let (declare_s, bind_s) = topic_topology(o, &mut c, x, &names).await;
    let total_s = t0.elapsed().as_secs_f64();
    let rss = o.broker_pid.and_then(rss_kib);
    eprintln!("topology: run with {n} bindings");
    let big = run(o, x, &keys, spread(&names[..10], 1)).await;
    eprintln!("topology: deleting {n} queues");
    let delete_s = delete_all(o, &mut c, x, &names).await;

    let x10 = "scale-topic-10";
    let names10: Vec<String> = (0..10).map(|i| format!("scale-q10-{i}")).collect();
    topic_topology(o, &mut c, x10, &names10).await;
    eprintln!("topology: run with 10 bindings");
    let small = run(o, x10, &keys, spread(&names10, 1)).await;
    delete_all(o, &mut c, x10, &names10).await;
    c.close().await;
    let mut line = format!(
        "scenario=topology queues={n} declare_s={declare_s:.2} bind_s={bind_s:.2} total_s={total_s:.2} \
         declare_per_s={:.0} bind_per_s={:.0} delete_s={delete_s:.2} delete_per_s={:.0} {} {} publish_ratio={:.2} deliver_ratio={:.2}",
        n as f64 / declare_s,
        n as f64 / bind_s,
        n as f64 / delete_s,
        big.figures(""),
        small.figures("b10_"),
        big.publish_rate / small.publish_rate.max(1e-9),
        big.deliver_rate / small.deliver_rate.max(1e-9),
    );
    if let Some(r) = rss {
        line += &format!(" broker_rss_kib_with_topology={r}");
    }
    line
}

async fn fanout(o: &Opts) -> String {
    let n = o.queues.max(1);
    let x = "scale-fanout";
    let names: Vec<String> = (0..n).map(|i| format!("scale-fq-{i}")).collect();
    let mut c = Conn::open(o.port, 1 << 20).await;
    c.pipeline("exchange", [(1, declare_exchange(x, "fanout"))], 1)
        .await;
    let t = c
        .pipeline(
            "declare and bind",
            names
                .iter()
                .flat_map(|q| [(1, declare_queue(q)), (1, bind(q, x, ""))]),
            o.window,
        )
        .await;
    eprintln!(
        "fanout: {n} queues declared and bound in {t:.2}s; {} connections x {} channels",
        n.div_ceil(o.channels),
        o.channels.min(n)
    );
    let r = run(o, x, &[String::new()], spread(&names, o.channels)).await;
    delete_all(o, &mut c, x, &names).await;
    c.close().await;
    format!(
        "scenario=fanout queues={n} connections={} channels_per_connection={} {} deliveries_per_publish={:.1}",
        n.div_ceil(o.channels),
        o.channels.min(n),
        r.figures(""),
        r.deliver_rate / r.publish_rate.max(1e-9),
    )
}

async fn consumers(o: &Opts) -> String {
    let n = o.consumers.max(1);
    let mut c = Conn::open(o.port, 1 << 20).await;
    let mut results = Vec::new();
    for (i, count) in [n, 1].into_iter().enumerate() {
        let q = format!("scale-cq-{i}");
        c.pipeline("queue.declare", [(1, declare_queue(&q))], 1)
            .await;
        eprintln!(
            "consumers: {count} consumers on {q}: {} connections x {} channels, one consumer each",
            count.div_ceil(o.channels),
            o.channels.min(count)
        );
        let names = vec![q.clone(); count];
        let r = run(o, "", std::slice::from_ref(&q), spread(&names, o.channels)).await;
        c.pipeline("queue.delete", [(1, delete_queue(&q))], 1).await;
        results.push(r);
    }
    c.close().await;
    let (many, one) = (&results[0], &results[1]);
    format!(
        "scenario=consumers consumers={n} connections={} channels_per_connection={} {} {} publish_ratio={:.2} deliver_ratio={:.2}",
        n.div_ceil(o.channels),
        o.channels.min(n),
        many.figures(""),
        one.figures("c1_"),
        many.publish_rate / one.publish_rate.max(1e-9),
        many.deliver_rate / one.deliver_rate.max(1e-9),
    )
}

async fn idle(o: &Opts) -> String {
    let n = o.connections;
    let rss = || o.broker_pid.and_then(rss_kib);
    let before = rss();
    let gate = Arc::new(Semaphore::new(o.concurrency));
    let t0 = Instant::now();
    let retries = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (gate, port, retries) = (gate.clone(), o.port, retries.clone());
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire().await.unwrap();
            // A refused or reset handshake is retried (up to 5 attempts) and counted.
            for attempt in 1..=5 {
                match Conn::try_open(port, 512).await {
                    Ok(c) => return Some(c),
                    Err(e) => {
                        if retries.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("  idle: attempt {attempt}: {e}");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            None
        }));
    }
    let mut conns = Vec::with_capacity(n);
    let mut said = Instant::now();
    for t in tasks {
        if let Some(c) = t.await.expect("connection task") {
            conns.push(c);
        }
        if said.elapsed() >= Duration::from_secs(10) {
            said = Instant::now();
            eprintln!("  idle: {} open", conns.len());
        }
    }
    let open_s = t0.elapsed().as_secs_f64();
    let opened = conns.len();
    eprintln!("idle: {opened} of {n} connections open in {open_s:.1}s");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let open = rss();
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for c in conns {
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire().await.unwrap();
            c.close().await
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let close_s = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss();
    let mut line = format!(
        "scenario=idle connections={n} opened={opened} retries={} open_s={open_s:.2} open_per_s={:.0} close_s={close_s:.2}",
        retries.load(Ordering::Relaxed),
        opened as f64 / open_s
    );
    if let (Some(b), Some(o), Some(a)) = (before, open, after) {
        line += &format!(
            " rss_before_kib={b} rss_open_kib={o} rss_closed_kib={a} kib_per_connection={:.1}",
            (o as f64 - b as f64) / opened.max(1) as f64
        );
    }
    line
}

#[tokio::main]
async fn main() {
    let o = parse();
    // A panic anywhere (a refused request, a closed connection) ends the run.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        hook(info);
        std::process::exit(1);
    }));
    let timeout = o.timeout;
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(timeout));
        eprintln!("scale: gave up after --timeout {timeout}s");
        std::process::exit(2);
    });
    let line = match o.scenario.as_str() {
        "topology" => topology(&o).await,
        "fanout" => fanout(&o).await,
        "idle" => idle(&o).await,
        "consumers" => consumers(&o).await,
        other => {
            eprintln!("scale: unknown scenario '{other}': topology, fanout, idle or consumers");
            std::process::exit(2);
        }
    };
    println!("{line}");
}
