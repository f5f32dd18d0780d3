//! The management API's write side for topology and messages: declaring and
//! deleting exchanges and queues, binding, purging, publishing, getting, and
//! closing connections. Every change goes through `Vhost::apply`, the path AMQP
//! declarations take, and is checked against the caller's permissions in the
//! vhost as RabbitMQ checks them (tags give access to the API, not to vhosts).

use std::sync::Arc;

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{FieldTable, ShortString};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, Caller};
use crate::auth::Access;
use crate::error::AmqpError;
use crate::model::change::{Actor, BindingSpec, Change, ExchangeSpec, Outcome, QueueSpec};
use crate::model::exchange::Destination;
use crate::model::queue::Got;
use crate::model::stats::MessageCounts;
use crate::model::topology::Routed;
use crate::model::vhost::Vhost;
use crate::session::context::BrokerState;

type St = State<Arc<BrokerState>>;

/// A refused change, as RabbitMQ's management plugin reports it: 400 with the
/// AMQP reason (404 for what does not exist).
fn refused(e: AmqpError) -> ApiError {
    let reason = match e.text.split_once(" - ") {
        Some((_, r)) => r.to_string(),
        None => e.text.clone(),
    };
    match e.code {
        404 => ApiError::not_found(),
        403 => ApiError::forbidden(reason),
        _ => ApiError::bad_request(reason),
    }
}

/// The vhost, and the caller's right to do `access` on `name` in it.
fn permitted(
    s: &BrokerState,
    c: &Caller,
    vhost: &str,
    access: &[(Access, &str, &str)],
) -> Result<Arc<Vhost>, ApiError> {
    let v = s.vhost(vhost).ok_or_else(ApiError::not_found)?;
    let Some(perms) = s.permissions_for(&c.user, vhost) else {
        return Err(ApiError::not_authorised(&format!(
            "access to vhost '{vhost}' refused for user '{}'",
            c.user.name
        )));
    };
    for (a, kind, name) in access {
        if !perms.allows(*a, name) {
            return Err(ApiError::forbidden(format!(
                "access to {kind} '{name}' in vhost '{vhost}' refused for user '{}'",
                c.user.name
            )));
        }
    }
    Ok(v)
}

/// JSON arguments as AMQP field values, as the configuration file's are converted.
fn arguments(v: Option<&Value>) -> Result<FieldTable, ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(FieldTable::default());
    };
    let table: toml::Table = serde_json::from_value(v.clone())
        .map_err(|e| ApiError::bad_request(format!("arguments: {e}")))?;
    crate::config::field_table(&table).map_err(|e| ApiError::bad_request(format!("arguments: {e}")))
}

/// A request body as JSON; an empty body is an empty object. RabbitMQ's API takes
/// booleans and numbers also as strings (rabbitmqadmin sends some that way).
pub(super) fn json_body(raw: &[u8]) -> Result<Value, ApiError> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(raw).map_err(|e| ApiError::bad_request(format!("not JSON: {e}")))
}

fn flag(body: &Value, key: &str, default: bool) -> bool {
    match body.get(key) {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        _ => default,
    }
}

fn number(body: &Value, key: &str) -> Option<u32> {
    match body.get(key) {
        Some(Value::Number(n)) => n.as_u64().map(|n| n.min(u32::MAX as u64) as u32),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

pub async fn put_exchange(
    State(s): St,
    c: Caller,
    Path((vhost, name)): Path<(String, String)>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body = json_body(&raw)?;
    let v = permitted(&s, &c, &vhost, &[(Access::Configure, "exchange", &name)])?;
    let existed = v.topology().exchange(&name).is_some();
    let spec = ExchangeSpec {
        name: name.clone(),
        kind: body
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("direct")
            .to_string(),
        passive: false,
        durable: flag(&body, "durable", true),
        auto_delete: flag(&body, "auto_delete", false),
        internal: flag(&body, "internal", false),
        arguments: arguments(body.get("arguments"))?,
    };
    apply(&s, &v, Change::DeclareExchange(spec)).await?;
    Ok(if existed {
        no_content()
    } else {
        StatusCode::CREATED.into_response()
    })
}

#[derive(Deserialize, Default)]
pub struct DeleteFlags {
    #[serde(rename = "if-unused", default)]
    if_unused: Option<String>,
    #[serde(rename = "if-empty", default)]
    if_empty: Option<String>,
}

fn yes(v: &Option<String>) -> bool {
    v.as_deref() == Some("true")
}

pub async fn delete_exchange(
    State(s): St,
    c: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Query(q): Query<DeleteFlags>,
) -> Result<Response, ApiError> {
    let v = permitted(&s, &c, &vhost, &[(Access::Configure, "exchange", &name)])?;
    apply(
        &s,
        &v,
        Change::DeleteExchange {
            name,
            if_unused: yes(&q.if_unused),
        },
    )
    .await?;
    Ok(no_content())
}

pub async fn put_queue(
    State(s): St,
    c: Caller,
    Path((vhost, name)): Path<(String, String)>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body = json_body(&raw)?;
    let v = permitted(&s, &c, &vhost, &[(Access::Configure, "queue", &name)])?;
    let existed = v.topology().queue(&name).is_some();
    let spec = QueueSpec {
        name: name.clone(),
        passive: false,
        durable: flag(&body, "durable", true),
        exclusive: false,
        auto_delete: flag(&body, "auto_delete", false),
        arguments: arguments(body.get("arguments"))?,
    };
    apply(&s, &v, Change::DeclareQueue(spec)).await?;
    Ok(if existed {
        no_content()
    } else {
        StatusCode::CREATED.into_response()
    })
}

pub async fn delete_queue(
    State(s): St,
    c: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Query(q): Query<DeleteFlags>,
) -> Result<Response, ApiError> {
    let v = permitted(&s, &c, &vhost, &[(Access::Configure, "queue", &name)])?;
    apply(
        &s,
        &v,
        Change::DeleteQueue {
            name,
            if_unused: yes(&q.if_unused),
            if_empty: yes(&q.if_empty),
        },
    )
    .await?;
    Ok(no_content())
}

pub async fn purge(
    State(s): St,
    c: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let v = permitted(&s, &c, &vhost, &[(Access::Read, "queue", &name)])?;
    apply(&s, &v, Change::Purge { queue: name }).await?;
    Ok(no_content())
}

/// Applies a change as an operator; waits for the store when something durable
/// changed, and tells a deleted queue's consumers.
async fn apply(s: &BrokerState, v: &Vhost, change: Change) -> Result<(), ApiError> {
    let applied = v.apply(change, Actor::Operator).map_err(refused)?;
    if let Outcome::QueueDeleted { cancellations, .. } = applied.outcome {
        cancellations.notify();
    }
    if applied.durable {
        s.store
            .synced()
            .await
            .map_err(|e| ApiError::internal(format!("store failure: {e}")))?;
    }
    Ok(())
}

fn destination(kind: &str, name: &str) -> Result<Destination, ApiError> {
    match kind {
        "q" => Ok(Destination::Queue(name.into())),
        "e" => Ok(Destination::Exchange(name.into())),
        _ => Err(ApiError::not_found()),
    }
}

pub async fn post_binding(
    State(s): St,
    c: Caller,
    Path((vhost, source, kind, dest)): Path<(String, String, String, String)>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body = json_body(&raw)?;
    let destination = destination(&kind, &dest)?;
    let dest_kind = if kind == "q" { "queue" } else { "exchange" };
    let v = permitted(
        &s,
        &c,
        &vhost,
        &[
            (Access::Write, dest_kind, &dest),
            (Access::Read, "exchange", &source),
        ],
    )?;
    let routing_key = body
        .get("routing_key")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let args = arguments(body.get("arguments"))?;
    let location = super::api::properties_key(&routing_key, &args);
    apply(
        &s,
        &v,
        Change::Bind(BindingSpec {
            source,
            destination,
            routing_key,
            arguments: args,
        }),
    )
    .await?;
    let mut r = StatusCode::CREATED.into_response();
    if let Ok(value) = axum::http::HeaderValue::from_str(&location) {
        r.headers_mut().insert(axum::http::header::LOCATION, value);
    }
    Ok(r)
}

pub async fn delete_binding(
    State(s): St,
    c: Caller,
    Path((vhost, source, kind, dest, props)): Path<(String, String, String, String, String)>,
) -> Result<Response, ApiError> {
    let destination = destination(&kind, &dest)?;
    let dest_kind = if kind == "q" { "queue" } else { "exchange" };
    let v = permitted(
        &s,
        &c,
        &vhost,
        &[
            (Access::Write, dest_kind, &dest),
            (Access::Read, "exchange", &source),
        ],
    )?;
    // The properties key names one binding between the two: find its key and arguments.
    let found = v.bindings().into_iter().find(|(src, d, key, args)| {
        **src == *source && *d == destination && super::api::properties_key(key, args) == props
    });
    let Some((_, _, key, args)) = found else {
        return Err(ApiError::not_found());
    };
    apply(
        &s,
        &v,
        Change::Unbind(BindingSpec {
            source,
            destination,
            routing_key: key.to_string(),
            arguments: args,
        }),
    )
    .await?;
    Ok(no_content())
}

/// Message properties from the API's JSON (RabbitMQ's names).
fn properties(v: Option<&Value>) -> Result<BasicProperties, ApiError> {
    let mut p = BasicProperties::default();
    let Some(Value::Object(m)) = v else {
        return Ok(p);
    };
    let text = |k: &str| m.get(k).and_then(Value::as_str).map(ShortString::from);
    if let Some(n) = m.get("delivery_mode").and_then(Value::as_u64) {
        p = p.with_delivery_mode(n.min(255) as u8);
    }
    if let Some(n) = m.get("priority").and_then(Value::as_u64) {
        p = p.with_priority(n.min(255) as u8);
    }
    if let Some(n) = m.get("timestamp").and_then(Value::as_u64) {
        p = p.with_timestamp(n);
    }
    for (key, set) in [
        (
            "content_type",
            BasicProperties::with_content_type
                as fn(BasicProperties, ShortString) -> BasicProperties,
        ),
        ("content_encoding", BasicProperties::with_content_encoding),
        ("correlation_id", BasicProperties::with_correlation_id),
        ("reply_to", BasicProperties::with_reply_to),
        ("expiration", BasicProperties::with_expiration),
        ("message_id", BasicProperties::with_message_id),
        ("type", BasicProperties::with_type),
        ("user_id", BasicProperties::with_user_id),
        ("app_id", BasicProperties::with_app_id),
    ] {
        if let Some(v) = text(key) {
            p = set(p, v);
        }
    }
    if let Some(h) = m.get("headers") {
        p = p.with_headers(arguments(Some(h))?);
    }
    Ok(p)
}

pub async fn publish(
    State(s): St,
    c: Caller,
    Path((vhost, exchange)): Path<(String, String)>,
    raw: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let body = json_body(&raw)?;
    // "amq.default" is how the API names the default exchange.
    let exchange = if exchange == "amq.default" {
        String::new()
    } else {
        exchange
    };
    let v = permitted(&s, &c, &vhost, &[(Access::Write, "exchange", &exchange)])?;
    let routing_key = body
        .get("routing_key")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let payload = body.get("payload").and_then(Value::as_str).unwrap_or("");
    let payload = match body.get("payload_encoding").and_then(Value::as_str) {
        Some("base64") => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(payload)
                .map_err(|e| ApiError::bad_request(format!("payload: not base64: {e}")))?
        }
        _ => payload.as_bytes().to_vec(),
    };
    let props = properties(body.get("properties"))?;
    if let Some(uid) = props.user_id() {
        if uid.as_str() != c.user.name {
            return Err(ApiError::bad_request(format!(
                "user_id property set to '{}' but authenticated user was '{}'",
                uid.as_str(),
                c.user.name
            )));
        }
    }
    crate::model::message::valid_expiration(&props)
        .map_err(|bad| ApiError::bad_request(format!("invalid expiration {bad}")))?;
    let body = bytes::Bytes::from(payload);
    let header = crate::model::message::encode_header(body.len() as u64, &props);
    let headers = props.headers().clone();
    let routed = v
        .topology()
        .route(&exchange, &[&routing_key], headers.as_ref());
    let (queues, delays) = match routed {
        Routed::NoExchange => return Err(ApiError::not_found()),
        Routed::Internal => {
            return Err(ApiError::forbidden(format!(
                "cannot publish to internal exchange '{exchange}' in vhost '{vhost}'"
            )))
        }
        Routed::Queues(q, d) => (q, d),
    };
    let msg = Arc::new(crate::model::message::Message::new(
        exchange.as_str().into(),
        routing_key.as_str().into(),
        header,
        props,
        body,
        s.gauge.clone(),
    ));
    MessageCounts::bump(&s.closed.received, 1);
    let routed = !queues.is_empty() || !delays.is_empty();
    if !routed {
        MessageCounts::bump(&s.closed.unroutable_dropped, 1);
    } else {
        MessageCounts::bump(&s.closed.routed, 1);
    }
    let mut persisted = v.delay(&delays, &msg);
    for q in &queues {
        persisted |= q.publish(msg.clone()) == crate::model::queue::Enqueued::Persisted;
    }
    if persisted {
        s.store
            .synced()
            .await
            .map_err(|e| ApiError::internal(format!("store failure: {e}")))?;
    }
    Ok(Json(json!({ "routed": routed })))
}

struct GetRequest {
    count: u32,
    ackmode: String,
    encoding: Option<String>,
    truncate: Option<usize>,
}

/// Most messages one get takes, so that a request cannot hold a queue's whole
/// backlog in memory as JSON.
const GET_MAX: u32 = 10_000;

pub async fn get_messages(
    State(s): St,
    c: Caller,
    Path((vhost, name)): Path<(String, String)>,
    raw: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let body = json_body(&raw)?;
    let req = GetRequest {
        count: number(&body, "count").unwrap_or(1),
        ackmode: body
            .get("ackmode")
            .and_then(Value::as_str)
            .unwrap_or("ack_requeue_true")
            .to_string(),
        encoding: body
            .get("encoding")
            .and_then(Value::as_str)
            .map(str::to_string),
        truncate: number(&body, "truncate").map(|n| n as usize),
    };
    let v = permitted(&s, &c, &vhost, &[(Access::Read, "queue", &name)])?;
    let q = v
        .topology()
        .queue(&name)
        .cloned()
        .ok_or_else(ApiError::not_found)?;
    let (requeue, reject) = match req.ackmode.as_str() {
        "ack_requeue_true" => (true, false),
        "ack_requeue_false" => (false, false),
        "reject_requeue_true" => (true, true),
        "reject_requeue_false" => (false, true),
        other => return Err(ApiError::bad_request(format!("unknown ackmode {other}"))),
    };
    let mut taken = Vec::new();
    let mut out = Vec::new();
    while taken.len() < req.count.min(GET_MAX) as usize {
        let (m, left) = match q.get(false) {
            Got::Message(m, left) => (m, left),
            Got::Empty => break,
            Got::PagingIn(rx) => {
                let _ = rx.await;
                continue;
            }
        };
        // As RabbitMQ's, through a channel of its own: counted as that channel's
        // would be once closed.
        s.closed.fetched(false, m.redelivered);
        out.push(message_json(
            &m,
            left,
            req.encoding.as_deref(),
            req.truncate,
        ));
        taken.push(m);
    }
    let mut acked = 0;
    if requeue {
        q.requeue(taken);
    } else {
        for m in taken {
            if reject {
                q.rejected(m);
            } else {
                MessageCounts::bump(&s.closed.acknowledged, 1);
                q.forget(&m);
                acked += 1;
            }
        }
        q.kick_acked(acked);
    }
    Ok(Json(Value::Array(out)))
}

fn message_json(
    m: &crate::model::queue::QueuedMessage,
    left: u32,
    encoding: Option<&str>,
    truncate: Option<usize>,
) -> Value {
    let body = &m.msg.body[..];
    let shown = &body[..truncate.unwrap_or(body.len()).min(body.len())];
    let (payload, payload_encoding) = match (encoding, std::str::from_utf8(shown)) {
        (Some("base64"), _) | (_, Err(_)) => {
            use base64::Engine;
            (
                base64::engine::general_purpose::STANDARD.encode(shown),
                "base64",
            )
        }
        (_, Ok(text)) => (text.to_string(), "string"),
    };
    json!({
        "payload_bytes": body.len(),
        "redelivered": m.redelivered,
        "exchange": &*m.msg.exchange,
        "routing_key": &*m.msg.routing_key,
        "message_count": left,
        "properties": properties_json(&m.msg.properties),
        "payload": payload,
        "payload_encoding": payload_encoding,
    })
}

fn properties_json(p: &BasicProperties) -> Value {
    let mut m = serde_json::Map::new();
    let mut text = |k: &str, v: &Option<ShortString>| {
        if let Some(v) = v {
            m.insert(k.into(), json!(v.as_str()));
        }
    };
    text("content_type", p.content_type());
    text("content_encoding", p.content_encoding());
    text("correlation_id", p.correlation_id());
    text("reply_to", p.reply_to());
    text("expiration", p.expiration());
    text("message_id", p.message_id());
    text("type", p.kind());
    text("user_id", p.user_id());
    text("app_id", p.app_id());
    if let Some(n) = p.delivery_mode() {
        m.insert("delivery_mode".into(), json!(n));
    }
    if let Some(n) = p.priority() {
        m.insert("priority".into(), json!(n));
    }
    if let Some(n) = p.timestamp() {
        m.insert("timestamp".into(), json!(n));
    }
    if let Some(h) = p.headers() {
        m.insert("headers".into(), super::api::table_json(h));
    }
    Value::Object(m)
}

pub async fn delete_connection(
    State(s): St,
    c: Caller,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let conn = s
        .connections()
        .into_iter()
        .find(|conn| conn.name() == name)
        .ok_or_else(ApiError::not_found)?;
    // Anyone may close their own connections; administrators anyone's.
    if conn.user() != c.user.name {
        c.require(super::Role::Administrator)?;
    }
    let reason = h
        .get("x-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("Closed via management plugin");
    conn.request_close(reason.to_string());
    Ok(no_content())
}

/// Bindings between two named ends (GET /api/bindings/{vhost}/e/{source}/q/{dest}).
pub async fn bindings_between(
    State(s): St,
    c: Caller,
    Path((vhost, source, kind, dest)): Path<(String, String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    if !c.sees_vhost(&s, &vhost) {
        return Err(ApiError::not_authorised("Access refused."));
    }
    let v = s.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    let destination = destination(&kind, &dest)?;
    let dest_kind = if kind == "q" { "queue" } else { "exchange" };
    let list: Vec<Value> = v
        .bindings()
        .into_iter()
        .filter(|(src, d, _, _)| **src == *source && *d == destination)
        .map(|(src, _, key, args)| {
            json!({
                "source": &*src, "vhost": vhost, "destination": dest, "destination_type": dest_kind,
                "routing_key": &*key, "arguments": super::api::table_json(&args),
                "properties_key": super::api::properties_key(&key, &args),
            })
        })
        .collect();
    Ok(Json(Value::Array(list)))
}
