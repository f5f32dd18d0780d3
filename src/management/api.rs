//! The management API's read side: RabbitMQ 3.10's paths and field names, built
//! from the broker's live state. Listings are snapshots: each queue is asked for
//! its figures once, under its own lock, and unacknowledged deliveries are
//! counted from the channels that hold them.

use std::collections::HashMap;
use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable};
use axum::extract::{Path, State};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::rates::{self, Of};
use super::{access, write};
use super::{ApiError, Caller, Role};
use crate::model::exchange::Destination;
use crate::model::queue::{now_ms, Queue, QueueStats};
use crate::model::vhost::Vhost;
use crate::session::context::BrokerState;
use crate::session::shared::ConnShared;

type St = State<Arc<BrokerState>>;
type Reply = Result<Json<Value>, ApiError>;

/// The version of RabbitMQ whose management API this one follows.
const RABBITMQ_VERSION: &str = "3.10.8";
const NODE: &str = "warrenmq@localhost";

pub fn router(state: Arc<BrokerState>) -> Router {
    Router::new()
        .route("/api/overview", get(overview))
        .route("/api/whoami", get(whoami))
        .route("/api/nodes", get(nodes))
        .route("/api/vhosts", get(vhosts))
        .route(
            "/api/vhosts/{vhost}",
            get(vhost)
                .put(access::put_vhost)
                .delete(access::delete_vhost),
        )
        .route("/api/users", get(users))
        .route(
            "/api/users/{name}",
            get(user).put(access::put_user).delete(access::delete_user),
        )
        .route(
            "/api/permissions/{vhost}/{user}",
            axum::routing::put(access::put_permissions).delete(access::delete_permissions),
        )
        .route(
            "/api/topic-permissions/{vhost}/{user}",
            axum::routing::put(access::put_topic_permissions)
                .delete(access::delete_topic_permissions),
        )
        .route(
            "/api/policies/{vhost}/{name}",
            axum::routing::put(access::put_policy).delete(access::delete_policy),
        )
        .route("/api/permissions", get(permissions))
        .route("/api/topic-permissions", get(topic_permissions))
        .route("/api/policies", get(policies))
        .route("/api/policies/{vhost}", get(policies_in))
        .route("/api/parameters", get(nothing))
        .route(
            "/api/definitions",
            get(definitions).post(access::post_definitions),
        )
        .route("/api/exchanges", get(exchanges))
        .route("/api/exchanges/{vhost}", get(exchanges_in))
        .route(
            "/api/exchanges/{vhost}/{name}",
            get(exchange)
                .put(write::put_exchange)
                .delete(write::delete_exchange),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/publish",
            post(write::publish),
        )
        .route("/api/queues", get(queues))
        .route("/api/queues/{vhost}", get(queues_in))
        .route(
            "/api/queues/{vhost}/{name}",
            get(queue).put(write::put_queue).delete(write::delete_queue),
        )
        .route("/api/queues/{vhost}/{name}/contents", delete(write::purge))
        .route("/api/queues/{vhost}/{name}/get", post(write::get_messages))
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/{end}",
            get(exchange_bindings),
        )
        .route("/api/queues/{vhost}/{name}/bindings", get(queue_bindings))
        .route("/api/bindings", get(bindings))
        .route("/api/bindings/{vhost}", get(bindings_in))
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{dest}",
            get(write::bindings_between).post(write::post_binding),
        )
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{dest}/{props}",
            delete(write::delete_binding),
        )
        .route("/api/connections", get(connections))
        .route("/api/connections/{name}", delete(write::delete_connection))
        .route("/api/channels", get(channels))
        .route("/api/consumers", get(consumers))
        .route("/api/consumers/{vhost}", get(consumers_in))
        .route("/api/health/checks/alarms", get(alarms))
        .route("/api/health/checks/local-alarms", get(alarms))
        .route("/api/health/checks/virtual-hosts", get(virtual_hosts_ok))
        .route(
            "/api/health/checks/port-listener/{port}",
            get(port_listener),
        )
        .route(
            "/api/health/checks/protocol-listener/{protocol}",
            get(protocol_listener),
        )
        .route("/api/health/checks/ready-to-serve-clients", get(ok_check))
        .route("/api/health/checks/node-is-quorum-critical", get(ok_check))
        .route("/api/aliveness-test/{vhost}", get(aliveness))
        .merge(super::console::router())
        .fallback(|| async { ApiError::not_found() })
        .with_state(state)
}

/// A field table as RabbitMQ's JSON shows it. Depth is bounded: tables from
/// clients were checked against `limits.max_header_depth` when they arrived.
pub(super) fn table_json(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), value_json(v)))
            .collect(),
    )
}

fn value_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => json!(d.value as f64 / 10f64.powi(d.scale as i32)),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ByteArray(b) => json!(String::from_utf8_lossy(b.as_slice())),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_json).collect()),
        AMQPValue::FieldTable(t) => table_json(t),
        AMQPValue::Void => Value::Null,
    }
}

/// RabbitMQ's idle_since: local time as "2026-11-26T01:03:44.252+00:00".
fn timestamp(wall_ms: u64) -> String {
    let secs = wall_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        wall_ms % 1000
    )
}

/// A `now_ms()` instant as wall-clock milliseconds.
fn wall_of(mono_ms: u64) -> u64 {
    crate::store::wall_ms().saturating_sub(now_ms().saturating_sub(mono_ms))
}

/// Unacknowledged deliveries per queue (by address), counted from every channel.
pub(super) struct Unacked(HashMap<usize, (u64, u64)>);

impl Unacked {
    pub(super) fn gather(state: &BrokerState) -> Unacked {
        let mut m: HashMap<usize, (u64, u64)> = HashMap::new();
        for c in state.connections() {
            for ch in c.channels() {
                for (q, n, bytes) in ch.unacked_summary().per_queue {
                    let e = m.entry(Arc::as_ptr(&q) as usize).or_default();
                    e.0 += n;
                    e.1 += bytes;
                }
            }
        }
        Unacked(m)
    }

    pub(super) fn of(&self, q: &Arc<Queue>) -> (u64, u64) {
        self.0
            .get(&(Arc::as_ptr(q) as usize))
            .copied()
            .unwrap_or_default()
    }
}

fn queue_json(vhost: &str, q: &Arc<Queue>, stats: &QueueStats, unacked: (u64, u64)) -> Value {
    let args = q.args();
    let kind = match q.arguments.inner().get("x-queue-type") {
        Some(AMQPValue::LongString(s)) if s.as_bytes() == b"quorum" => "quorum",
        _ => "classic",
    };
    let policy_definition = match &args.policy {
        Some(_) => {
            let mut d = Map::new();
            if let Some(v) = args
                .message_ttl
                .filter(|_| q.declared.message_ttl != args.message_ttl)
            {
                d.insert("message-ttl".into(), json!(v));
            }
            if let Some(v) = args
                .max_length
                .filter(|_| q.declared.max_length != args.max_length)
            {
                d.insert("max-length".into(), json!(v));
            }
            Value::Object(d)
        }
        None => json!({}),
    };
    let (ready, ready_bytes) = (stats.ready, stats.ready_bytes);
    json!({
        "name": &*q.name,
        "vhost": vhost,
        "durable": q.durable,
        "auto_delete": q.auto_delete,
        "exclusive": q.exclusive_owner.is_some(),
        "arguments": table_json(&q.arguments),
        "node": NODE,
        "state": "running",
        "type": kind,
        "policy": args.policy.as_deref(),
        "operator_policy": Value::Null,
        "effective_policy_definition": policy_definition,
        "consumers": stats.consumers.len(),
        "exclusive_consumer_tag": stats.consumers.iter().find(|c| c.exclusive).map(|c| &*c.tag),
        "single_active_consumer_tag": if args.single_active_consumer {
            stats.consumers.first().map(|c| Value::from(&*c.tag)).unwrap_or(Value::Null)
        } else {
            Value::Null
        },
        "messages": ready + unacked.0,
        "messages_ready": ready,
        "messages_unacknowledged": unacked.0,
        "message_bytes": ready_bytes + unacked.1,
        "message_bytes_ready": ready_bytes,
        "message_bytes_unacknowledged": unacked.1,
        "message_bytes_ram": stats.ready_resident_bytes + unacked.1,
        "message_bytes_paged_out": ready_bytes - stats.ready_resident_bytes.min(ready_bytes),
        "idle_since": stats.idle_since.map(|t| timestamp(wall_of(t))),
        "message_stats": rates::message_stats(Of::Queue, q.stats_counts(), &q.rates),
    })
}

/// The vhosts the caller may see, in name order.
fn visible(state: &BrokerState, c: &Caller) -> Vec<(String, Arc<Vhost>)> {
    let mut v: Vec<_> = state
        .vhost_map()
        .iter()
        .filter(|(name, _)| c.sees_vhost(state, name))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The named vhost if the caller may see it; 404 otherwise, as RabbitMQ.
fn one(state: &BrokerState, c: &Caller, name: &str) -> Result<Arc<Vhost>, ApiError> {
    match state.vhost(name) {
        Some(v) if c.sees_vhost(state, name) => Ok(v),
        Some(_) => Err(ApiError::not_authorised("Access refused.")),
        None => Err(ApiError::not_found()),
    }
}

fn queues_of(vhosts: &[(String, Arc<Vhost>)], unacked: &Unacked) -> Vec<Value> {
    let mut out = Vec::new();
    for (name, v) in vhosts {
        let t = v.topology();
        let mut qs: Vec<&Arc<Queue>> = t.queues().collect();
        qs.sort_by(|a, b| a.name.cmp(&b.name));
        for q in qs {
            out.push(queue_json(name, q, &q.stats(), unacked.of(q)));
        }
    }
    out
}

async fn queues(State(s): St, c: Caller) -> Reply {
    Ok(Json(Value::Array(queues_of(
        &visible(&s, &c),
        &Unacked::gather(&s),
    ))))
}

async fn queues_in(State(s): St, c: Caller, Path(vhost): Path<String>) -> Reply {
    let v = one(&s, &c, &vhost)?;
    Ok(Json(Value::Array(queues_of(
        &[(vhost.clone(), v.clone())],
        &Unacked::gather(&s),
    ))))
}

async fn queue(State(s): St, c: Caller, Path((vhost, name)): Path<(String, String)>) -> Reply {
    let v = one(&s, &c, &vhost)?;
    let t = v.topology();
    let q = t.queue(&name).ok_or_else(ApiError::not_found)?;
    let stats = q.stats();
    let mut body = queue_json(&vhost, q, &stats, Unacked::gather(&s).of(q));
    // The single-queue view also lists its consumers, as RabbitMQ's does.
    let consumers: Vec<Value> = stats
        .consumers
        .iter()
        .map(|ci| consumer_json(&s, &vhost, &q.name, ci))
        .collect();
    if let Value::Object(m) = &mut body {
        m.insert("consumer_details".into(), Value::Array(consumers));
    }
    Ok(Json(body))
}

fn exchange_json(v: &Vhost, vhost: &str, x: &crate::model::exchange::ExchangeDef) -> Value {
    let mut body = json!({
        "name": &*x.name,
        "vhost": vhost,
        "type": x.kind.name,
        "durable": x.durable,
        "auto_delete": x.auto_delete,
        "internal": x.internal,
        "arguments": table_json(&x.arguments),
        "user_who_performed_action": "rmq-internal",
    });
    // As the delayed-message plugin's exchange info.
    if x.is_delayed() {
        body["messages_delayed"] = json!(v.delayed.waiting_at(&x.name));
    }
    body
}

fn exchanges_of(vhosts: &[(String, Arc<Vhost>)]) -> Vec<Value> {
    let mut out = Vec::new();
    for (name, v) in vhosts {
        // The default exchange is listed first, as RabbitMQ lists it.
        out.push(json!({
            "name": "", "vhost": name, "type": "direct", "durable": true,
            "auto_delete": false, "internal": false, "arguments": {},
            "user_who_performed_action": "rmq-internal",
        }));
        let t = v.topology();
        let mut xs: Vec<_> = t.exchanges().collect();
        xs.sort_by(|a, b| a.def.name.cmp(&b.def.name));
        out.extend(xs.iter().map(|x| exchange_json(v, name, &x.def)));
    }
    out
}

async fn exchanges(State(s): St, c: Caller) -> Reply {
    Ok(Json(Value::Array(exchanges_of(&visible(&s, &c)))))
}

async fn exchanges_in(State(s): St, c: Caller, Path(vhost): Path<String>) -> Reply {
    let v = one(&s, &c, &vhost)?;
    Ok(Json(Value::Array(exchanges_of(&[(
        vhost.clone(),
        v.clone(),
    )]))))
}

async fn exchange(State(s): St, c: Caller, Path((vhost, name)): Path<(String, String)>) -> Reply {
    let v = one(&s, &c, &vhost)?;
    if name.is_empty() || name == "amq.default" {
        return Ok(Json(
            exchanges_of(&[(vhost.clone(), v.clone())]).swap_remove(0),
        ));
    }
    let t = v.topology();
    let x = t.exchange(&name).ok_or_else(ApiError::not_found)?;
    Ok(Json(exchange_json(&v, &vhost, &x.def)))
}

/// RabbitMQ's properties_key: the routing key, percent-encoded, and "~" and a
/// hash of the arguments when there are any.
pub(super) fn properties_key(key: &str, args: &FieldTable) -> String {
    let mut out = String::new();
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if !args.inner().is_empty() {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(format!("{:?}", args.inner()).as_bytes());
        use base64::Engine;
        out.push('~');
        out.push_str(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..8]));
    }
    out
}

fn bindings_of(vhosts: &[(String, Arc<Vhost>)]) -> Vec<Value> {
    let mut out = Vec::new();
    for (name, v) in vhosts {
        // Every queue's implicit binding to the default exchange comes first.
        let t = v.topology();
        let mut qs: Vec<&Arc<str>> = t.queues().map(|q| &q.name).collect();
        qs.sort();
        for q in qs {
            out.push(json!({
                "source": "", "vhost": name, "destination": &**q, "destination_type": "queue",
                "routing_key": &**q, "arguments": {}, "properties_key": properties_key(q, &FieldTable::default()),
            }));
        }
        let mut bs = v.bindings();
        let dest_key = |d: &Destination| match d {
            Destination::Queue(q) => (0, q.clone()),
            Destination::Exchange(x) => (1, x.clone()),
        };
        bs.sort_by(|a, b| (&a.0, dest_key(&a.1), &a.2).cmp(&(&b.0, dest_key(&b.1), &b.2)));
        for (source, dest, key, args) in bs {
            let (kind, dest) = match &dest {
                Destination::Queue(q) => ("queue", q.clone()),
                Destination::Exchange(x) => ("exchange", x.clone()),
            };
            out.push(json!({
                "source": &*source, "vhost": name, "destination": &*dest, "destination_type": kind,
                "routing_key": &*key, "arguments": table_json(&args),
                "properties_key": properties_key(&key, &args),
            }));
        }
    }
    out
}

/// The bindings of one exchange or queue: `end` is "source" or "destination"
/// for an exchange, "queue" for a queue (RabbitMQ's .../bindings/source,
/// .../bindings/destination and /api/queues/{vhost}/{name}/bindings).
fn bindings_at(s: &BrokerState, c: &Caller, vhost: &str, name: &str, end: &str) -> Reply {
    let v = one(s, c, vhost)?;
    let t = v.topology();
    let name = if end != "queue" && name == "amq.default" {
        ""
    } else {
        name
    };
    let exists = match end {
        "queue" => t.queue(name).is_some(),
        _ => name.is_empty() || t.exchange(name).is_some(),
    };
    if !exists {
        return Err(ApiError::not_found());
    }
    let all = bindings_of(&[(vhost.to_string(), v.clone())]);
    let keep = |b: &Value| match end {
        "source" => b["source"] == name,
        "destination" => b["destination_type"] == "exchange" && b["destination"] == name,
        _ => b["destination_type"] == "queue" && b["destination"] == name,
    };
    Ok(Json(Value::Array(all.into_iter().filter(keep).collect())))
}

async fn exchange_bindings(
    State(s): St,
    c: Caller,
    Path((vhost, name, end)): Path<(String, String, String)>,
) -> Reply {
    if end != "source" && end != "destination" {
        return Err(ApiError::not_found());
    }
    bindings_at(&s, &c, &vhost, &name, &end)
}

async fn queue_bindings(
    State(s): St,
    c: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Reply {
    bindings_at(&s, &c, &vhost, &name, "queue")
}

async fn bindings(State(s): St, c: Caller) -> Reply {
    Ok(Json(Value::Array(bindings_of(&visible(&s, &c)))))
}

async fn bindings_in(State(s): St, c: Caller, Path(vhost): Path<String>) -> Reply {
    let v = one(&s, &c, &vhost)?;
    Ok(Json(Value::Array(bindings_of(&[(
        vhost.clone(),
        v.clone(),
    )]))))
}

/// The connections the caller may see: all for monitoring and administrators,
/// its own otherwise.
fn visible_connections(s: &BrokerState, c: &Caller) -> Vec<Arc<ConnShared>> {
    s.connections()
        .into_iter()
        .filter(|conn| conn.opened().is_some())
        .filter(|conn| c.role >= Role::Monitoring || conn.user() == c.user.name)
        .collect()
}

fn connection_json(c: &ConnShared) -> Value {
    let o = c.opened();
    json!({
        "name": c.name(),
        "node": NODE,
        "type": "network",
        "state": "running",
        "protocol": "AMQP 0-9-1",
        "user": c.user(),
        "user_who_performed_action": c.user(),
        "vhost": o.map(|o| o.vhost.as_str()),
        "auth_mechanism": o.map(|o| o.mechanism.as_str()),
        "client_properties": o.map(|o| table_json(&o.client_properties)).unwrap_or(json!({})),
        "channel_max": o.map(|o| o.channel_max),
        "frame_max": o.map(|o| o.frame_max),
        "timeout": o.map(|o| o.heartbeat),
        "channels": c.channels().len(),
        "connected_at": c.info.connected_at,
        "host": c.info.local.ip().to_canonical().to_string(),
        "port": c.info.local.port(),
        "peer_host": c.info.peer.ip().to_canonical().to_string(),
        "peer_port": c.info.peer.port(),
        "ssl": c.info.tls,
        "recv_oct": c.received.load(std::sync::atomic::Ordering::Relaxed),
        "send_oct": c.outbox.written(),
    })
}

async fn connections(State(s): St, c: Caller) -> Reply {
    let list: Vec<Value> = visible_connections(&s, &c)
        .iter()
        .map(|conn| connection_json(conn))
        .collect();
    Ok(Json(Value::Array(list)))
}

async fn channels(State(s): St, c: Caller) -> Reply {
    // Consumers per (connection, channel), from the queues of the visible vhosts.
    let mut consumers: HashMap<(u64, u16), usize> = HashMap::new();
    for (_, v) in visible(&s, &c) {
        for q in v.topology().queues() {
            for ci in q.stats().consumers {
                *consumers.entry(ci.channel).or_default() += 1;
            }
        }
    }
    let mut list = Vec::new();
    for conn in visible_connections(&s, &c) {
        for ch in conn.channels() {
            let summary = ch.unacked_summary();
            let unacked: u64 = summary.per_queue.iter().map(|(_, n, _)| n).sum();
            let l = &ch.listing;
            list.push(json!({
                "name": format!("{} ({})", conn.name(), ch.id),
                "number": ch.id,
                "node": NODE,
                "state": "running",
                "user": conn.user(),
                "user_who_performed_action": conn.user(),
                "vhost": conn.opened().map(|o| o.vhost.as_str()),
                "connection_details": {
                    "name": conn.name(),
                    "peer_host": conn.info.peer.ip().to_canonical().to_string(),
                    "peer_port": conn.info.peer.port(),
                },
                "consumer_count": consumers.get(&(conn.id, ch.id)).copied().unwrap_or(0),
                "prefetch_count": l.prefetch.load(std::sync::atomic::Ordering::Relaxed),
                "global_prefetch_count": summary.global_prefetch,
                "confirm": l.confirm.load(std::sync::atomic::Ordering::Relaxed),
                "transactional": l.transactional.load(std::sync::atomic::Ordering::Relaxed),
                "messages_unacknowledged": unacked,
                "message_stats": rates::message_stats(Of::Channel, ch.counts.stats(), &ch.rates),
            }));
        }
    }
    Ok(Json(Value::Array(list)))
}

fn consumer_json(
    s: &BrokerState,
    vhost: &str,
    queue: &str,
    ci: &crate::model::queue::ConsumerInfo,
) -> Value {
    let conn = s
        .connections
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&ci.channel.0)
        .cloned();
    let details = match conn {
        Some(conn) => json!({
            "connection_name": conn.name(),
            "name": format!("{} ({})", conn.name(), ci.channel.1),
            "node": NODE,
            "number": ci.channel.1,
            "peer_host": conn.info.peer.ip().to_canonical().to_string(),
            "peer_port": conn.info.peer.port(),
            "user": conn.user(),
        }),
        None => json!({}),
    };
    let mut arguments = Map::new();
    if ci.priority != 0 {
        arguments.insert("x-priority".into(), json!(ci.priority));
    }
    json!({
        "consumer_tag": &*ci.tag,
        "queue": { "name": queue, "vhost": vhost },
        "channel_details": details,
        "ack_required": !ci.no_ack,
        "exclusive": ci.exclusive,
        "prefetch_count": ci.prefetch,
        "arguments": arguments,
        "active": true,
        "activity_status": "up",
    })
}

fn consumers_of(s: &BrokerState, vhosts: &[(String, Arc<Vhost>)]) -> Vec<Value> {
    let mut out = Vec::new();
    for (name, v) in vhosts {
        let t = v.topology();
        let mut qs: Vec<&Arc<Queue>> = t.queues().collect();
        qs.sort_by(|a, b| a.name.cmp(&b.name));
        for q in qs {
            for ci in q.stats().consumers {
                out.push(consumer_json(s, name, &q.name, &ci));
            }
        }
    }
    out
}

async fn consumers(State(s): St, c: Caller) -> Reply {
    Ok(Json(Value::Array(consumers_of(&s, &visible(&s, &c)))))
}

async fn consumers_in(State(s): St, c: Caller, Path(vhost): Path<String>) -> Reply {
    let v = one(&s, &c, &vhost)?;
    Ok(Json(Value::Array(consumers_of(
        &s,
        &[(vhost.clone(), v.clone())],
    ))))
}

/// Ready and unacknowledged messages over the given vhosts.
fn totals(vhosts: &[(String, Arc<Vhost>)], unacked: &Unacked) -> (u64, u64, usize, usize, usize) {
    let (mut ready, mut un, mut queues, mut consumers, mut exchanges) = (0, 0, 0, 0, 0);
    for (_, v) in vhosts {
        let t = v.topology();
        exchanges += t.exchanges().count() + 1;
        for q in t.queues() {
            let st = q.stats();
            ready += st.ready;
            un += unacked.of(q).0;
            queues += 1;
            consumers += st.consumers.len();
        }
    }
    (ready, un, queues, consumers, exchanges)
}

async fn overview(State(s): St, c: Caller) -> Reply {
    let vs = visible(&s, &c);
    let (ready, unacked, queues, consumers, exchanges) = totals(&vs, &Unacked::gather(&s));
    let conns = visible_connections(&s, &c);
    let channels: usize = conns.iter().map(|c| c.channels().len()).sum();
    let listeners: Vec<Value> = s
        .listening
        .iter()
        .map(|(p, a)| json!({"node": NODE, "protocol": p, "ip_address": a.ip().to_string(), "port": a.port()}))
        .collect();
    let types: Vec<Value> = crate::model::exchange::TYPES
        .iter()
        .map(|t| json!({"name": t.name, "description": "", "enabled": true}))
        .collect();
    Ok(Json(json!({
        "management_version": RABBITMQ_VERSION,
        "rabbitmq_version": RABBITMQ_VERSION,
        "product_name": "WarrenMQ",
        "product_version": env!("CARGO_PKG_VERSION"),
        "cluster_name": NODE,
        "node": NODE,
        "rates_mode": "basic",
        "exchange_types": types,
        "listeners": listeners,
        "object_totals": {
            "connections": conns.len(),
            "channels": channels,
            "exchanges": exchanges,
            "queues": queues,
            "consumers": consumers,
        },
        "queue_totals": {
            "messages": ready + unacked,
            "messages_ready": ready,
            "messages_unacknowledged": unacked,
        },
        "message_stats": rates::message_stats(Of::Broker, rates::broker_counts(&s).stats(), &s.rates),
        "statistics_db_event_queue": 0,
    })))
}

async fn whoami(c: Caller) -> Reply {
    Ok(Json(json!({ "name": c.user.name, "tags": c.user.tags })))
}

async fn nodes(State(s): St, c: Caller) -> Reply {
    c.require(Role::Monitoring)?;
    let uptime = crate::store::wall_ms().saturating_sub(s.started_at);
    Ok(Json(json!([{
        "name": NODE,
        "type": "disc",
        "running": true,
        "uptime": uptime,
        // RabbitMQ's mem_used is the node's total: the process's resident memory.
        "mem_used": crate::memory::resident_bytes().unwrap_or(s.gauge.used() as u64),
        "mem_limit": s.gauge.high(),
        "mem_calculation_strategy": if s.gauge.counts_resident() { "rss" } else { "bodies" },
        "mem_alarm": s.gauge.memory_over(),
        "disk_free_alarm": s.gauge.disk_alarm(),
        "disk_free": s.disk_free.load(std::sync::atomic::Ordering::Relaxed),
        "disk_free_limit": s.config.limits.disk_free_limit,
        "exchange_types": crate::model::exchange::TYPES.iter().map(|t| json!({"name": t.name})).collect::<Vec<_>>(),
    }])))
}

fn vhost_json(s: &BrokerState, name: &str, v: &Arc<Vhost>, unacked: &Unacked) -> Value {
    let (ready, un, ..) = totals(&[(name.to_string(), v.clone())], unacked);
    let counts = rates::vhost_counts(s, name, v).stats();
    json!({
        "name": name,
        "description": "",
        "tags": [],
        "metadata": { "description": "", "tags": [] },
        "default_queue_type": "undefined",
        "tracing": false,
        "cluster_state": { NODE: "running" },
        "messages": ready + un,
        "messages_ready": ready,
        "messages_unacknowledged": un,
        "message_stats": rates::message_stats(Of::Broker, counts, &v.rates),
    })
}

async fn vhosts(State(s): St, c: Caller) -> Reply {
    let unacked = Unacked::gather(&s);
    Ok(Json(Value::Array(
        visible(&s, &c)
            .into_iter()
            .map(|(n, v)| vhost_json(&s, &n, &v, &unacked))
            .collect(),
    )))
}

async fn vhost(State(s): St, c: Caller, Path(name): Path<String>) -> Reply {
    let v = one(&s, &c, &name)?;
    Ok(Json(vhost_json(&s, &name, &v, &Unacked::gather(&s))))
}

fn user_json(u: &crate::config::User) -> Value {
    // A plain-text password is shown only as a hash, as RabbitMQ stores it.
    let (hash, algorithm) = match (&u.password_hash, &u.password) {
        (Some(h), _) => (h.clone(), u.hashing_algorithm.clone()),
        (None, Some(p)) => (
            crate::auth::hash_password(
                p.as_bytes(),
                crate::auth::random_salt().unwrap_or_default(),
            ),
            "rabbit_password_hashing_sha256".to_string(),
        ),
        (None, None) => (String::new(), u.hashing_algorithm.clone()),
    };
    let mut limits = Map::new();
    if let Some(n) = u.max_connections {
        limits.insert("max-connections".into(), json!(n));
    }
    if let Some(n) = u.max_channels {
        limits.insert("max-channels".into(), json!(n));
    }
    json!({
        "name": u.name,
        "password_hash": hash,
        "hashing_algorithm": algorithm,
        "tags": u.tags,
        "limits": limits,
    })
}

async fn users(State(s): St, c: Caller) -> Reply {
    c.require(Role::Administrator)?;
    let mut list: Vec<_> = s.users.load().iter().map(user_json).collect();
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Ok(Json(Value::Array(list)))
}

async fn user(State(s): St, c: Caller, Path(name): Path<String>) -> Reply {
    c.require(Role::Administrator)?;
    let users = s.users.load();
    let u = users
        .iter()
        .find(|u| u.name == name)
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(user_json(u)))
}

async fn permissions(State(s): St, c: Caller) -> Reply {
    c.require(Role::Administrator)?;
    let config = s.current.load();
    let mut list: Vec<Value> = config
        .permissions
        .iter()
        .map(|p| json!({"user": p.user, "vhost": p.vhost, "configure": p.configure, "write": p.write, "read": p.read}))
        .collect();
    // A user's `vhosts` list grants everything where it has no permissions entry.
    for u in s.users.load().iter() {
        for v in &u.vhosts {
            if !s
                .config
                .permissions
                .iter()
                .any(|p| p.user == u.name && &p.vhost == v)
            {
                list.push(json!({"user": u.name, "vhost": v, "configure": ".*", "write": ".*", "read": ".*"}));
            }
        }
    }
    Ok(Json(Value::Array(list)))
}

async fn topic_permissions(State(s): St, c: Caller) -> Reply {
    c.require(Role::Administrator)?;
    Ok(Json(Value::Array(
        s.current
            .load()
            .topic_permissions
            .iter()
            .map(|t| json!({"user": t.user, "vhost": t.vhost, "exchange": t.exchange, "write": t.write, "read": t.read}))
            .collect(),
    )))
}

fn policies_json(s: &BrokerState, c: &Caller, vhost: Option<&str>) -> Vec<Value> {
    s.current
        .load()
        .policies
        .iter()
        .filter(|p| vhost.is_none_or(|v| v == p.vhost) && c.sees_vhost(s, &p.vhost))
        .map(|p| {
            let definition: Value =
                serde_json::to_value(&p.definition).unwrap_or_else(|_| json!({}));
            json!({"vhost": p.vhost, "name": p.name, "pattern": p.pattern,
                   "apply-to": p.apply_to, "definition": definition, "priority": p.priority})
        })
        .collect()
}

async fn policies(State(s): St, c: Caller) -> Reply {
    Ok(Json(Value::Array(policies_json(&s, &c, None))))
}

async fn policies_in(State(s): St, c: Caller, Path(vhost): Path<String>) -> Reply {
    one(&s, &c, &vhost)?;
    Ok(Json(Value::Array(policies_json(&s, &c, Some(&vhost)))))
}

/// RabbitMQ's definitions of the running broker: the configuration's users,
/// vhosts, permissions and policies, and the durable exchanges, queues and
/// bindings as they are now (whoever declared them). Administrators only.
async fn definitions(State(s): St, c: Caller) -> Reply {
    use crate::store::{StoredBinding, StoredDestination, StoredExchange, StoredQueue};
    c.require(Role::Administrator)?;
    let mut live = crate::definitions::Stored {
        exchanges: Vec::new(),
        queues: Vec::new(),
        bindings: Vec::new(),
    };
    for (vname, v) in s.vhost_map().iter() {
        let t = v.topology();
        for x in t.exchanges() {
            let d = &x.def;
            if d.durable && !d.name.starts_with("amq.") {
                live.exchanges.push(StoredExchange {
                    vhost: vname.clone(),
                    name: d.name.to_string(),
                    kind: d.kind.code,
                    auto_delete: d.auto_delete,
                    internal: d.internal,
                    arguments: d.arguments.clone(),
                    messages_id: None,
                });
            }
        }
        for q in t.queues() {
            if q.durable && q.exclusive_owner.is_none() {
                live.queues.push(StoredQueue {
                    vhost: vname.clone(),
                    name: q.name.to_string(),
                    id: 0,
                    auto_delete: q.auto_delete,
                    arguments: q.arguments.clone(),
                });
            }
        }
        for (source, dest, key, args) in v.bindings() {
            let durable_dest = match &dest {
                Destination::Queue(q) => t.queue(q).is_some_and(|q| q.durable),
                Destination::Exchange(x) => t.exchange(x).is_some_and(|x| x.def.durable),
            };
            if !durable_dest || t.exchange(&source).is_none_or(|x| !x.def.durable) {
                continue;
            }
            live.bindings.push(StoredBinding {
                vhost: vname.clone(),
                source: source.to_string(),
                destination: match dest {
                    Destination::Queue(q) => StoredDestination::Queue(q.to_string()),
                    Destination::Exchange(x) => StoredDestination::Exchange(x.to_string()),
                },
                routing_key: key.to_string(),
                arguments: args,
            });
        }
    }
    let config = s.current.load();
    let export = crate::definitions::export(&config, Some(&live)).map_err(ApiError::internal)?;
    for w in export.warnings {
        tracing::warn!("definitions export: {w}");
    }
    Ok(Json(export.json))
}

async fn nothing(_: Caller) -> Reply {
    Ok(Json(json!([])))
}

fn ok() -> Reply {
    Ok(Json(json!({"status": "ok"})))
}

async fn alarms(State(s): St, _: Caller) -> Reply {
    let mut alarms = Vec::new();
    if s.gauge.memory_over() {
        alarms.push("memory");
    }
    if s.gauge.disk_alarm() {
        alarms.push("disk");
    }
    if !alarms.is_empty() {
        return Err(ApiError::unavailable(format!(
            "resource alarm(s) in effect in the cluster: {}",
            alarms.join(", ")
        )));
    }
    ok()
}

async fn virtual_hosts_ok(_: Caller) -> Reply {
    ok()
}

async fn ok_check(_: Caller) -> Reply {
    ok()
}

async fn port_listener(State(s): St, _: Caller, Path(port): Path<String>) -> Reply {
    let Ok(port) = port.parse::<u16>() else {
        return Err(ApiError::unavailable(format!(
            "{port} is not a port number"
        )));
    };
    if s.listening.iter().any(|(_, a)| a.port() == port) {
        return Ok(Json(json!({"status": "ok", "port": port})));
    }
    Err(ApiError::unavailable(format!(
        "No active listener on port {port}"
    )))
}

async fn protocol_listener(State(s): St, _: Caller, Path(protocol): Path<String>) -> Reply {
    let wanted = match protocol.as_str() {
        "amqp" | "amqp091" | "amqp0-9-1" => "amqp",
        "amqp/ssl" | "amqps" => "amqp/ssl",
        "http" | "management" => "http",
        _ => "",
    };
    let present = s.listening.iter().any(|(p, _)| *p == wanted);
    if present {
        return Ok(Json(json!({"status": "ok", "protocol": protocol})));
    }
    Err(ApiError::unavailable(format!(
        "No active listener for protocol {protocol}"
    )))
}

/// RabbitMQ's aliveness test: declares the vhost's `aliveness-test` queue,
/// publishes a message to it and gets it back.
async fn aliveness(State(s): St, c: Caller, Path(vhost): Path<String>) -> Reply {
    use crate::model::change::{Actor, Change, Outcome, QueueSpec};
    let v = one(&s, &c, &vhost)?.clone();
    let declared = v.apply(
        Change::DeclareQueue(QueueSpec {
            name: "aliveness-test".into(),
            passive: false,
            durable: false,
            exclusive: false,
            auto_delete: false,
            arguments: FieldTable::default(),
        }),
        Actor::Operator,
    );
    let q = match declared {
        Ok(applied) => match applied.outcome {
            Outcome::Queue { queue, .. } => queue,
            _ => {
                return Err(ApiError::unavailable(
                    "aliveness-test queue not declared".into(),
                ))
            }
        },
        Err(e) => return Err(ApiError::unavailable(e.to_string())),
    };
    let body = bytes::Bytes::from_static(b"test_message");
    let props = amq_protocol::protocol::BasicProperties::default();
    let header = crate::model::message::encode_header(body.len() as u64, &props);
    let msg = crate::model::message::Message::new(
        "".into(),
        "aliveness-test".into(),
        header,
        props,
        body,
        s.gauge.clone(),
    );
    q.publish(Arc::new(msg));
    match q.get(false) {
        crate::model::queue::Got::Message(m, _) => {
            q.forget(&m);
            ok()
        }
        _ => Err(ApiError::unavailable("aliveness test failed".into())),
    }
}
