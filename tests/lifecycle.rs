//! The broker's life around the protocol: graceful shutdown, handshake and
//! heartbeat timeouts, memory backpressure, and the command line.

use std::time::Duration;

use amq_protocol::protocol::{basic, channel, connection, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warrenmq::protocol::{body_frame_header, read_frame, write_method, Frame, FRAME_END};
use warrenmq::Config;

const WAIT: Duration = Duration::from_secs(10);

fn config() -> Config {
    let data_dir = std::env::temp_dir().join(format!(
        "warrenmq-lifecycle-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        data_dir,
        ..Config::default()
    }
}

static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A bare AMQP client: enough to drive the broker where a library would hide the detail.
struct Raw {
    s: TcpStream,
    buf: BytesMut,
}

impl Raw {
    async fn connect(addr: std::net::SocketAddr) -> Raw {
        Raw {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
        }
    }

    async fn open(addr: std::net::SocketAddr, heartbeat: u16) -> Raw {
        let mut r = Raw::connect(addr).await;
        r.s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
        r.method().await; // connection.start
        let mut caps = FieldTable::default();
        caps.insert("connection.blocked".into(), AMQPValue::Boolean(true));
        let mut props = FieldTable::default();
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        r.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: props,
                mechanism: "PLAIN".into(),
                response: LongString::from(&b"\0guest\0guest"[..]),
                locale: "en_US".into(),
            })),
        )
        .await;
        r.method().await; // connection.tune
        r.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 10,
                frame_max: 131072,
                heartbeat,
            })),
        )
        .await;
        r.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        )
        .await;
        r.method().await; // connection.open-ok
        r.send(
            1,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await;
        r.method().await;
        r
    }

    async fn send(&mut self, ch: u16, class: AMQPClass) {
        let mut out = BytesMut::new();
        write_method(&mut out, ch, &class);
        self.s.write_all(&out).await.unwrap();
    }

    /// The next frame, or None once the broker closed the socket.
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = read_frame(&mut self.buf, 1 << 20).unwrap() {
                return Some(f);
            }
            let n = tokio::time::timeout(WAIT, self.s.read_buf(&mut self.buf))
                .await
                .expect("broker answered in time");
            if n.unwrap_or(0) == 0 {
                return None;
            }
        }
    }

    /// The next method, skipping heartbeats and content.
    async fn method(&mut self) -> AMQPClass {
        loop {
            match self.frame().await.expect("connection open") {
                Frame::Method(_, m) => return *m,
                _ => continue,
            }
        }
    }

    /// Waits until the broker closes the socket, answering nothing.
    async fn closed_by_broker(&mut self) -> bool {
        loop {
            match tokio::time::timeout(WAIT, self.s.read_buf(&mut self.buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => self.buf.clear(),
            }
        }
    }
}

/// Stopping the broker closes every client connection with 320 CONNECTION_FORCED.
#[tokio::test]
async fn shutdown_closes_connections_with_connection_forced() {
    let broker = warrenmq::start(config()).await.unwrap();
    let mut client = Raw::open(broker.local_addr(), 0).await;
    let stopping = tokio::spawn(broker.shutdown());
    match client.method().await {
        AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
            assert_eq!(c.reply_code, 320);
            assert!(c.reply_text.as_str().starts_with("CONNECTION_FORCED - "));
        }
        other => panic!("expected connection.close, got {other:?}"),
    }
    client
        .send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        )
        .await;
    tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap();
}

/// A client that negotiated heartbeats and then goes silent is dropped.
#[tokio::test]
async fn silent_client_is_dropped_after_missed_heartbeats() {
    let broker = warrenmq::start(config()).await.unwrap();
    let mut client = Raw::open(broker.local_addr(), 1).await;
    let mut heartbeats = 0;
    loop {
        match client.frame().await {
            Some(Frame::Heartbeat(0)) => heartbeats += 1,
            Some(other) => panic!("unexpected {other:?}"),
            None => break,
        }
    }
    assert!(
        heartbeats >= 1,
        "the broker sent heartbeats before giving up"
    );
}

/// A socket that never completes the handshake is closed after handshake_timeout.
#[tokio::test]
async fn handshake_timeout_closes_idle_socket() {
    let mut c = config();
    c.limits.handshake_timeout = 1;
    let broker = warrenmq::start(c).await.unwrap();
    let mut idle = Raw::connect(broker.local_addr()).await;
    assert!(idle.closed_by_broker().await);
}

/// Above the memory watermark a publisher is blocked (connection.blocked) and no
/// longer read; once the backlog is consumed it is unblocked.
#[tokio::test]
async fn publisher_is_blocked_above_memory_watermark_and_unblocked_below() {
    let mut c = config();
    c.limits.memory_high_watermark = 1 << 20;
    // The bodies alone: the test process itself is resident far above 1 MiB.
    c.limits.memory_calculation_strategy = warrenmq::config::MemoryStrategy::Bodies;
    let broker = warrenmq::start(c).await.unwrap();
    let mut publisher = Raw::open(broker.local_addr(), 0).await;
    publisher
        .send(
            1,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: "backlog".into(),
                ..Default::default()
            })),
        )
        .await;
    publisher.method().await;

    // 2 MiB of messages with nobody consuming them.
    let header =
        warrenmq::model::message::encode_header(16 * 1024, &basic::AMQPProperties::default());
    let mut out = BytesMut::new();
    for _ in 0..128 {
        write_method(
            &mut out,
            1,
            &AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: "".into(),
                routing_key: "backlog".into(),
                mandatory: false,
                immediate: false,
            })),
        );
        out.put_u8(2);
        out.put_u16(1);
        out.put_u32(header.len() as u32);
        out.extend_from_slice(&header);
        out.put_u8(FRAME_END);
        out.extend_from_slice(&body_frame_header(1, 16 * 1024));
        out.extend_from_slice(&[7u8; 16 * 1024]);
        out.put_u8(FRAME_END);
    }
    publisher.s.write_all(&out).await.unwrap();
    match publisher.method().await {
        AMQPClass::Connection(connection::AMQPMethod::Blocked(b)) => {
            assert_eq!(b.reason.as_str(), "low on memory")
        }
        other => panic!("expected connection.blocked, got {other:?}"),
    }

    // Another connection drains the queue; the publisher is let go.
    let mut drain = Raw::open(broker.local_addr(), 0).await;
    drain
        .send(
            1,
            AMQPClass::Queue(queue::AMQPMethod::Purge(queue::Purge {
                queue: "backlog".into(),
                nowait: false,
            })),
        )
        .await;
    drain.method().await;
    match publisher.method().await {
        AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)) => {}
        other => panic!("expected connection.unblocked, got {other:?}"),
    }
    broker.shutdown().await;
}

/// A bad configuration file stops start-up with the file, the line and the reason.
#[test]
fn bad_config_file_names_file_line_and_reason() {
    let dir = std::env::temp_dir().join(format!("warrenmq-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "listen = [\"127.0.0.1:0\"]\ndata_dir = \"d\"\n\n[limits]\nchannel_max = \"many\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warrenmq"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:5:", path.display())), "{err}");
    assert!(err.contains("invalid type"), "{err}");
}

/// Runs the binary on a configuration file holding `text`, expecting it to refuse the
/// file; returns the file's path and what the binary printed.
fn refused_config(name: &str, text: &str) -> (std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("warrenmq-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_warrenmq"))
        .arg("--config")
        .arg(&path)
        .arg("--data-dir")
        .arg(dir.join(format!("{name}-data")))
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // A binary that accepted the file would run until stopped.
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("warrenmq accepted {}:\n{text}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    (path, err)
}

/// A handshake timeout too large for the clock (it made every connection panic) stops
/// start-up, naming its line.
#[test]
fn huge_handshake_timeout_is_refused_with_file_and_line() {
    let (path, err) = refused_config(
        "timeout.toml",
        "listen = [\"127.0.0.1:0\"]\ndata_dir = \"d\"\n[limits]\nheartbeat = 5\nhandshake_timeout = 9223372036854775807\n\n[[vhosts]]\nname = \"/\"\n",
    );
    let at = format!("{}:5:1: limits.handshake_timeout:", path.display());
    assert!(err.contains(&at), "{err}");
    // u64::MAX is not even a TOML integer; it is refused at the same line.
    let (path, err) = refused_config(
        "timeout-u64.toml",
        "listen = [\"127.0.0.1:0\"]\ndata_dir = \"d\"\n[limits]\nheartbeat = 5\nhandshake_timeout = 18446744073709551615\n\n[[vhosts]]\nname = \"/\"\n",
    );
    assert!(err.contains(&format!("{}:5:", path.display())), "{err}");
}

/// A frame_max beyond the 16 MiB ceiling stops start-up, naming its line.
#[test]
fn huge_frame_max_is_refused_with_file_and_line() {
    let (path, err) = refused_config(
        "frame.toml",
        "listen = [\"127.0.0.1:0\"]\ndata_dir = \"d\"\n[limits]\nframe_max = 4294967295\n[[vhosts]]\nname = \"/\"\n",
    );
    let at = format!("{}:4:1: limits.frame_max:", path.display());
    assert!(err.contains(&at), "{err}");
}

/// `warrenmq --version` prints the version and exits 0.
#[test]
fn version_flag_prints_version() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warrenmq"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

/// SIGTERM stops the real binary gracefully: it exits 0.
#[test]
fn sigterm_exits_cleanly() {
    let dir = std::env::temp_dir().join(format!("warrenmq-sigterm-{}", std::process::id()));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_warrenmq"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "warn",
            "--data-dir",
        ])
        .arg(&dir)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let pid = child.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// The default `[::]` listener serves IPv4 and IPv6 clients, and guest, limited to
/// loopback, may log in over IPv4 loopback seen as an IPv4-mapped address.
#[tokio::test]
async fn dual_stack_listener_accepts_ipv4_and_ipv6_loopback() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 on this machine: nothing to check");
        return;
    }
    let mut c = config();
    c.listen = vec!["[::]:0".parse().unwrap()];
    let broker = warrenmq::start(c).await.unwrap();
    let port = broker.local_addr().port();
    for host in ["127.0.0.1", "[::1]"] {
        let addr: std::net::SocketAddr = format!("{host}:{port}").parse().unwrap();
        let mut client = Raw::open(addr, 0).await;
        client
            .send(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                    reply_code: 200,
                    reply_text: "bye".into(),
                    class_id: 0,
                    method_id: 0,
                })),
            )
            .await;
        assert!(matches!(
            client.method().await,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))
        ));
    }
    broker.shutdown().await;
}
