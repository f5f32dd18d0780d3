//! Prometheus metrics with RabbitMQ's names and labels (rabbitmq_prometheus), so
//! that its Grafana dashboards and alert rules read this broker unchanged.
//! `/metrics` aggregates, as RabbitMQ's does by default; `/metrics/per-object`
//! labels queue figures with vhost and queue. Unauthenticated, as RabbitMQ's.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::model::stats::SIZE_BUCKETS;
use crate::session::context::BrokerState;

pub async fn serve(
    listeners: Vec<(TcpListener, bool)>,
    state: Arc<BrokerState>,
    stop: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route("/metrics", get(aggregated))
        .route("/metrics/per-object", get(per_object))
        .with_state(state.clone());
    super::serve_router(listeners, app, &state, stop, "metrics endpoint").await
}

async fn aggregated(State(s): State<Arc<BrokerState>>) -> impl IntoResponse {
    text(render(&s, false))
}

async fn per_object(State(s): State<Arc<BrokerState>>) -> impl IntoResponse {
    text(render(&s, true))
}

fn text(body: String) -> impl IntoResponse {
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// The text exposition format: HELP and TYPE, then the samples.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# TYPE {name} {kind}\n# HELP {name} {help}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.0, "{k}=\"{v}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// Resident memory, open and allowed file descriptors, from /proc (Linux).
fn process() -> (Option<u64>, Option<u64>, Option<u64>) {
    let rss = crate::memory::resident_bytes();
    let open = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64);
    let max = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        });
    (rss, open, max)
}

fn render(s: &BrokerState, per_object: bool) -> String {
    let mut o = Out(String::new());
    let node = "warrenmq@localhost";
    o.family(
        "rabbitmq_identity_info",
        "untyped",
        "RabbitMQ node & cluster identity info",
    );
    o.sample(
        "rabbitmq_identity_info",
        &[
            ("rabbitmq_node", node),
            ("rabbitmq_cluster", node),
            ("rabbitmq_cluster_permanent_id", node),
        ],
        1.0,
    );
    o.family(
        "rabbitmq_build_info",
        "untyped",
        "RabbitMQ & Erlang/OTP version info",
    );
    o.sample(
        "rabbitmq_build_info",
        &[
            ("rabbitmq_version", "3.10.8"),
            ("product_name", "WarrenMQ"),
            ("product_version", env!("CARGO_PKG_VERSION")),
        ],
        1.0,
    );

    let conns = s.connections();
    let channels: usize = conns.iter().map(|c| c.channels().len()).sum();
    o.one(
        "rabbitmq_connections",
        "gauge",
        "Connections currently open",
        conns.len() as f64,
    );
    o.one(
        "rabbitmq_channels",
        "gauge",
        "Channels currently open",
        channels as f64,
    );
    let churn = &s.churn;
    let live_channels_opened: u64 = conns
        .iter()
        .map(|c| c.channels_opened.load(Ordering::Relaxed))
        .sum();
    let live_channels_closed: u64 = conns
        .iter()
        .map(|c| c.channels_closed.load(Ordering::Relaxed))
        .sum();
    o.one(
        "rabbitmq_connections_opened_total",
        "counter",
        "Total number of connections opened",
        churn.connections_opened.load(Ordering::Relaxed) as f64,
    );
    o.one(
        "rabbitmq_connections_closed_total",
        "counter",
        "Total number of connections closed or terminated",
        churn.connections_closed.load(Ordering::Relaxed) as f64,
    );
    o.one(
        "rabbitmq_channels_opened_total",
        "counter",
        "Total number of channels opened",
        (churn.channels_opened.load(Ordering::Relaxed) + live_channels_opened) as f64,
    );
    o.one(
        "rabbitmq_channels_closed_total",
        "counter",
        "Total number of channels closed",
        (churn.channels_closed.load(Ordering::Relaxed) + live_channels_closed) as f64,
    );

    // Message counters: closed connections' totals plus the live ones'.
    let counts = super::rates::broker_counts(s);
    for (name, value) in counts.named() {
        let name = format!("rabbitmq_global_messages_{name}");
        o.family(
            &name,
            "counter",
            "Total number of messages, as RabbitMQ counts them",
        );
        o.sample(
            &name,
            &[("protocol", "amqp091")],
            value.load(Ordering::Relaxed) as f64,
        );
    }

    // Published body sizes (RabbitMQ 4's histogram: cumulative buckets).
    let name = "rabbitmq_message_size_bytes";
    o.family(
        name,
        "histogram",
        "Size of messages received from publishers",
    );
    let mut cumulative = 0u64;
    for (i, n) in counts.sizes.iter().enumerate() {
        cumulative += n.load(Ordering::Relaxed);
        let le = SIZE_BUCKETS
            .get(i)
            .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
        o.sample(
            &format!("{name}_bucket"),
            &[("protocol", "amqp091"), ("le", &le)],
            cumulative as f64,
        );
    }
    o.sample(
        &format!("{name}_sum"),
        &[("protocol", "amqp091")],
        counts.size_sum.load(Ordering::Relaxed) as f64,
    );
    o.sample(
        &format!("{name}_count"),
        &[("protocol", "amqp091")],
        cumulative as f64,
    );

    // Queues: unacknowledged deliveries are counted from the channels holding them.
    let unacked = super::api::Unacked::gather(s);
    struct Row {
        vhost: String,
        queue: String,
        ready: u64,
        unacked: u64,
        ready_bytes: u64,
        unacked_bytes: u64,
        consumers: u64,
    }
    let mut rows = Vec::new();
    let map = s.vhost_map();
    let mut vhosts: Vec<_> = map.iter().collect();
    vhosts.sort_by(|a, b| a.0.cmp(b.0));
    for (vname, v) in vhosts {
        let t = v.topology();
        let mut qs: Vec<_> = t.queues().collect();
        qs.sort_by(|a, b| a.name.cmp(&b.name));
        for q in qs {
            let st = q.stats();
            let (un, un_bytes) = unacked.of(q);
            rows.push(Row {
                vhost: vname.clone(),
                queue: q.name.to_string(),
                ready: st.ready,
                unacked: un,
                ready_bytes: st.ready_bytes,
                unacked_bytes: un_bytes,
                consumers: st.consumers.len() as u64,
            });
        }
    }
    o.one(
        "rabbitmq_queues",
        "gauge",
        "Queues available",
        rows.len() as f64,
    );
    let consumers: u64 = rows.iter().map(|r| r.consumers).sum();
    o.one(
        "rabbitmq_consumers",
        "gauge",
        "Consumers currently connected",
        consumers as f64,
    );
    o.one(
        "rabbitmq_global_consumers",
        "gauge",
        "Current number of consumers",
        consumers as f64,
    );
    type Figure = (&'static str, &'static str, fn(&Row) -> u64);
    let per_queue: [Figure; 6] = [
        (
            "rabbitmq_queue_messages_ready",
            "Messages ready to be delivered to consumers",
            |r| r.ready,
        ),
        (
            "rabbitmq_queue_messages_unacked",
            "Messages delivered to consumers but not yet acknowledged",
            |r| r.unacked,
        ),
        (
            "rabbitmq_queue_messages",
            "Sum of ready and unacknowledged messages - total queue depth",
            |r| r.ready + r.unacked,
        ),
        (
            "rabbitmq_queue_messages_ready_bytes",
            "Size in bytes of ready messages",
            |r| r.ready_bytes,
        ),
        (
            "rabbitmq_queue_messages_unacked_bytes",
            "Size in bytes of all unacknowledged messages",
            |r| r.unacked_bytes,
        ),
        ("rabbitmq_queue_consumers", "Consumers on a queue", |r| {
            r.consumers
        }),
    ];
    for (name, help, f) in per_queue {
        o.family(name, "gauge", help);
        if per_object {
            for r in &rows {
                o.sample(
                    name,
                    &[("vhost", &r.vhost), ("queue", &r.queue)],
                    f(r) as f64,
                );
            }
        } else {
            o.sample(name, &[], rows.iter().map(f).sum::<u64>() as f64);
        }
    }

    let (rss, open, max) = process();
    if let Some(rss) = rss {
        o.one(
            "rabbitmq_process_resident_memory_bytes",
            "gauge",
            "Memory used in bytes",
            rss as f64,
        );
    }
    o.one(
        "rabbitmq_resident_memory_limit_bytes",
        "gauge",
        "Memory high watermark in bytes",
        s.gauge.high() as f64,
    );
    o.one(
        "rabbitmq_alarms_memory_used_watermark",
        "untyped",
        "is set to 1 when memory alarm is in effect in the node",
        if s.gauge.memory_over() { 1.0 } else { 0.0 },
    );
    if s.config.limits.disk_free_limit > 0 {
        o.one(
            "rabbitmq_alarms_free_disk_space_watermark",
            "untyped",
            "is set to 1 when free disk space alarm is in effect in the node",
            if s.gauge.disk_alarm() { 1.0 } else { 0.0 },
        );
        o.one(
            "rabbitmq_disk_space_available_bytes",
            "gauge",
            "Disk space available in bytes",
            s.disk_free.load(Ordering::Relaxed) as f64,
        );
        o.one(
            "rabbitmq_disk_space_available_limit_bytes",
            "gauge",
            "Free disk space low watermark in bytes",
            s.config.limits.disk_free_limit as f64,
        );
    }
    if let Some(open) = open {
        o.one(
            "rabbitmq_process_open_fds",
            "gauge",
            "Open file descriptors",
            open as f64,
        );
    }
    if let Some(max) = max {
        o.one(
            "rabbitmq_process_max_fds",
            "gauge",
            "Open file descriptors limit",
            max as f64,
        );
    }
    let uptime = crate::store::wall_ms().saturating_sub(s.started_at) as f64 / 1000.0;
    o.one(
        "rabbitmq_erlang_uptime_seconds",
        "gauge",
        "Node uptime",
        uptime,
    );
    o.0
}
