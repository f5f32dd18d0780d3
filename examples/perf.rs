//! A load generator for any AMQP 0-9-1 broker, to compare WarrenMQ with RabbitMQ on
//! the same machine. It speaks the protocol directly (pipelined writes, batched acks)
//! so that the client is not what limits the figures.
//!
//! cargo run --release --example perf -- --port 5672 --seconds 10 --size 1024 \
//!     --publishers 1 --consumers 1 --confirm 256 --prefetch 256 [--persistent]
//!
//! Prints one line of key=value figures: publish and consume rates, confirm latency
//! and end-to-end latency percentiles.

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
            "--queue" => o.queue = v,
            "--persistent" => {
                o.persistent = true;
                i += 1;
                continue;
            }
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    o.size = o.size.max(8);
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

    // Declare the queue once.
    {
        let mut c = Conn::open(&o).await;
        c.send(
            1,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: o.queue.as_str().into(),
                passive: false,
                durable: o.persistent,
                exclusive: false,
                auto_delete: false,
                nowait: false,
                arguments: FieldTable::default(),
            })),
        )
        .await;
        c.expect_method().await;
    }

    let mut tasks = Vec::new();
    for _ in 0..o.consumers {
        let (o, stop, consumed, e2e) = (o.clone(), stop.clone(), consumed.clone(), e2e_lat.clone());
        tasks.push(tokio::spawn(async move {
            consume(o, start, stop, consumed, e2e).await
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
            publish(o, start, stop, published, lat).await
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
    let mut c = Conn::open(&o).await;
    c.send(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
            queue: o.queue.as_str().into(),
            if_unused: false,
            if_empty: false,
            nowait: false,
        })),
    )
    .await;
    c.expect_method().await;
    std::process::exit(0);
}

async fn publish(
    o: Opts,
    start: Instant,
    stop: Arc<AtomicBool>,
    published: Arc<AtomicU64>,
    lat: Arc<Mutex<Vec<u64>>>,
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
    let (mut reader, mut writer) = c.stream.into_split();
    let mut buf = c.buf;
    let permits = Arc::new(Semaphore::new(window.max(1)));
    let sent: Arc<Mutex<VecDeque<Instant>>> = Arc::new(Mutex::new(VecDeque::new()));
    if window > 0 {
        let (permits, sent, lat, published) = (
            permits.clone(),
            sent.clone(),
            lat.clone(),
            published.clone(),
        );
        tokio::spawn(async move {
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
        });
    }
    let header = {
        let props = if o.persistent {
            basic::AMQPProperties::default().with_delivery_mode(2)
        } else {
            basic::AMQPProperties::default()
        };
        warrenmq::message::encode_header(o.size as u64, &props)
    };
    let publish = {
        let mut b = BytesMut::new();
        write_method(
            &mut b,
            1,
            &AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: ShortString::from(""),
                routing_key: o.queue.as_str().into(),
                mandatory: false,
                immediate: false,
            })),
        );
        b
    };
    let mut body = vec![0u8; o.size];
    let mut out = BytesMut::with_capacity(256 * 1024);
    while !stop.load(Ordering::Relaxed) {
        // Write a batch: as many as the confirm window allows, at most 64 at a time.
        let n = if window > 0 {
            let p = permits.acquire_many(1).await.unwrap();
            p.forget();
            1 + (0..63)
                .take_while(|_| permits.try_acquire().map(|p| p.forget()).is_ok())
                .count()
        } else {
            64
        };
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
}

async fn consume(
    o: Opts,
    start: Instant,
    stop: Arc<AtomicBool>,
    consumed: Arc<AtomicU64>,
    lat: Arc<Mutex<Vec<u64>>>,
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
                    if n.is_multiple_of(16) {
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
        let read =
            tokio::time::timeout(Duration::from_millis(200), c.stream.read_buf(&mut c.buf)).await;
        if let Ok(Ok(0)) | Ok(Err(_)) = read {
            return;
        }
    }
}
