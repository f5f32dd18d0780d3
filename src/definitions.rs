//! RabbitMQ definitions: the JSON file `rabbitmqctl export_definitions` writes (and
//! RabbitMQ's `load_definitions` reads), in and out.
//!
//! In: the configuration's `definitions = "FILE.json"` key merges a file's users,
//! vhosts, permissions, topic permissions, policies, exchanges, queues and bindings
//! into the configuration (`read` here, `Config::parse` for the merge), and
//! `warrenmq import-definitions` prints them as TOML (`to_toml`). What the file holds
//! that WarrenMQ has no equivalent for is listed in one warning, never dropped
//! silently.
//!
//! Out: `warrenmq export-definitions` writes RabbitMQ 3.10's shape (`export`) from
//! the configuration and the durable topology stored in the data directory.

use std::collections::BTreeMap;
use std::path::Path;

use amq_protocol::types::{AMQPValue, FieldTable};
use serde::Deserialize;
use serde_json::{json, Map, Value as Json};

use crate::config::{
    BindingConfig, Config, ConfigError, ExchangeConfig, PermissionConfig, PolicyConfig,
    QueueConfig, TopicPermissionConfig, User, VhostConfig,
};
use crate::store::{StoreError, StoredBinding, StoredDestination, StoredExchange, StoredQueue};

/// What a definitions file holds that WarrenMQ uses, in the configuration's shapes.
#[derive(Debug, Default)]
pub struct Definitions {
    pub users: Vec<User>,
    pub vhosts: Vec<VhostConfig>,
    pub permissions: Vec<PermissionConfig>,
    pub topic_permissions: Vec<TopicPermissionConfig>,
    pub policies: Vec<PolicyConfig>,
    pub exchanges: Vec<ExchangeConfig>,
    pub queues: Vec<QueueConfig>,
    pub bindings: Vec<BindingConfig>,
    /// What the file holds that is not used, one item each ("rabbit_version",
    /// "global_parameters 'cluster_name'", ...).
    pub ignored: Vec<String>,
}

impl Definitions {
    /// The one warning line that lists what was left aside, if anything was.
    pub fn warning(&self, path: &str) -> Option<String> {
        (!self.ignored.is_empty()).then(|| {
            format!(
                "{path}: not supported, ignored: {}",
                self.ignored.join(", ")
            )
        })
    }
}

/// The password hashing module of users whose entry names none: RabbitMQ reads
/// files older than 3.6.0 as MD5, anything else as its default, SHA-256.
fn default_hashing(version: Option<&str>) -> &'static str {
    let old = ["3.0.", "3.1.", "3.2.", "3.3.", "3.4.", "3.5."];
    match version {
        Some(v) if old.iter().any(|p| v.starts_with(p)) => "rabbit_password_hashing_md5",
        _ => "rabbit_password_hashing_sha256",
    }
}

/// The keys WarrenMQ reads, per part of the file; any other key with a value is
/// reported as ignored.
const TOP_KEYS: &[&str] = &[
    "users",
    "vhosts",
    "permissions",
    "topic_permissions",
    "parameters",
    "global_parameters",
    "policies",
    "exchanges",
    "queues",
    "bindings",
    // Written by `warrenmq export-definitions`: informative, like rabbit_version.
    "warrenmq_version",
];
const USER_KEYS: &[&str] = &[
    "name",
    "password_hash",
    "password",
    "hashing_algorithm",
    "tags",
    "limits",
];
const VHOST_KEYS: &[&str] = &["name", "limits"];
const PERMISSION_KEYS: &[&str] = &["user", "vhost", "configure", "write", "read"];
const TOPIC_PERMISSION_KEYS: &[&str] = &["user", "vhost", "exchange", "write", "read"];
const POLICY_KEYS: &[&str] = &[
    "vhost",
    "name",
    "pattern",
    "apply-to",
    "definition",
    "priority",
];
const EXCHANGE_KEYS: &[&str] = &[
    "name",
    "vhost",
    "type",
    "durable",
    "auto_delete",
    "internal",
    "arguments",
];
const QUEUE_KEYS: &[&str] = &[
    "name",
    "vhost",
    "type",
    "durable",
    "auto_delete",
    "arguments",
];
const BINDING_KEYS: &[&str] = &[
    "source",
    "vhost",
    "destination",
    "destination_type",
    "routing_key",
    "arguments",
];

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    rabbit_version: Option<String>,
    #[serde(default)]
    rabbitmq_version: Option<String>,
    #[serde(default)]
    users: Vec<RawUser>,
    #[serde(default)]
    vhosts: Vec<RawVhost>,
    #[serde(default)]
    permissions: Vec<RawPermission>,
    #[serde(default)]
    topic_permissions: Vec<RawTopicPermission>,
    #[serde(default)]
    parameters: Vec<RawParameter>,
    #[serde(default)]
    global_parameters: Vec<RawGlobalParameter>,
    #[serde(default)]
    policies: Vec<RawPolicy>,
    #[serde(default)]
    exchanges: Vec<RawExchange>,
    #[serde(default)]
    queues: Vec<RawQueue>,
    #[serde(default)]
    bindings: Vec<RawBinding>,
}

#[derive(Deserialize)]
struct RawUser {
    name: String,
    #[serde(default)]
    password_hash: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    hashing_algorithm: Option<String>,
    #[serde(default)]
    tags: Tags,
    #[serde(default)]
    limits: Limits,
}

/// A comma-separated string in older exports, a list in newer ones.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Tags {
    #[default]
    None,
    Text(String),
    List(Vec<String>),
}

impl Tags {
    fn list(self) -> Vec<String> {
        match self {
            Tags::None => Vec::new(),
            Tags::Text(s) => s
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(String::from)
                .collect(),
            Tags::List(l) => l,
        }
    }
}

/// User and vhost limits: an object, or (a vhost's, in 3.10) a list of pairs.
#[derive(Deserialize)]
#[serde(untagged)]
enum Limits {
    Map(BTreeMap<String, i64>),
    Pairs(Vec<(String, i64)>),
}

impl Default for Limits {
    fn default() -> Self {
        Limits::Map(BTreeMap::new())
    }
}

impl Limits {
    fn into_map(self) -> BTreeMap<String, i64> {
        match self {
            Limits::Map(m) => m,
            Limits::Pairs(p) => p.into_iter().collect(),
        }
    }
}

/// A RabbitMQ limit: negative means none; above u32 is as good as none.
fn limit(n: i64) -> Option<u32> {
    (n >= 0).then(|| u32::try_from(n).unwrap_or(u32::MAX))
}

#[derive(Deserialize)]
struct RawVhost {
    name: String,
    #[serde(default)]
    limits: Limits,
}

#[derive(Deserialize)]
struct RawPermission {
    user: String,
    vhost: String,
    configure: String,
    write: String,
    read: String,
}

#[derive(Deserialize)]
struct RawTopicPermission {
    user: String,
    vhost: String,
    exchange: String,
    write: String,
    read: String,
}

#[derive(Deserialize)]
struct RawParameter {
    #[serde(default)]
    vhost: String,
    component: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    value: Json,
}

#[derive(Deserialize)]
struct RawGlobalParameter {
    name: String,
}

#[derive(Deserialize)]
struct RawPolicy {
    vhost: String,
    name: String,
    pattern: String,
    #[serde(rename = "apply-to", default = "all")]
    apply_to: String,
    #[serde(default)]
    priority: i64,
    #[serde(default)]
    definition: toml::Table,
}

fn all() -> String {
    "all".into()
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct RawExchange {
    name: String,
    vhost: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default = "yes")]
    durable: bool,
    #[serde(default)]
    auto_delete: bool,
    #[serde(default)]
    internal: bool,
    #[serde(default)]
    arguments: toml::Table,
}

#[derive(Deserialize)]
struct RawQueue {
    name: String,
    vhost: String,
    /// classic, quorum or stream (3.10 and later); older files say it with the
    /// x-queue-type argument alone.
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default = "yes")]
    durable: bool,
    #[serde(default)]
    auto_delete: bool,
    #[serde(default)]
    arguments: toml::Table,
}

#[derive(Deserialize)]
struct RawBinding {
    source: String,
    vhost: String,
    destination: String,
    #[serde(default = "queue")]
    destination_type: String,
    #[serde(default)]
    routing_key: String,
    #[serde(default)]
    arguments: toml::Table,
}

fn queue() -> String {
    "queue".into()
}

/// Reads a definitions file. `shown` is its path as errors name it.
pub fn read(path: &Path, shown: &str) -> Result<Definitions, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.to_string(),
        source,
    })?;
    parse(&text, shown)
}

/// Parses a definitions file's text: a malformed file, or a value of the wrong
/// type, is refused at its line and column.
pub fn parse(text: &str, shown: &str) -> Result<Definitions, ConfigError> {
    let at = |e: serde_json::Error| ConfigError::Json {
        path: shown.to_string(),
        line: e.line(),
        column: e.column(),
        reason: json_reason(&e),
    };
    let tree: Json = serde_json::from_str(text).map_err(at)?;
    if !tree.is_object() {
        return Err(ConfigError::Missing {
            path: shown.to_string(),
            reason: "not RabbitMQ definitions: the file must hold a JSON object".into(),
        });
    }
    let raw: Raw = serde_json::from_str(text).map_err(at)?;
    let entity = |what: String, reason: String| ConfigError::Entity {
        path: shown.to_string(),
        what,
        reason,
    };
    let mut ignored = unused_keys(&tree);
    let version = raw
        .rabbitmq_version
        .as_deref()
        .or(raw.rabbit_version.as_deref());
    let hashing = default_hashing(version);
    let mut out = Definitions::default();

    // A user's `vhosts` (what it may open when no permissions say otherwise) are
    // the vhosts its permissions name: RabbitMQ has no such list.
    let mut granted: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for p in &raw.permissions {
        let list = granted.entry(p.user.as_str()).or_default();
        if !list.contains(&p.vhost) {
            list.push(p.vhost.clone());
        }
    }
    for u in raw.users {
        let mut limits = u.limits.into_map();
        let max_connections = limits.remove("max-connections").and_then(limit);
        let max_channels = limits.remove("max-channels").and_then(limit);
        for k in limits.keys() {
            ignored.push(format!("user '{}': limit '{k}'", u.name));
        }
        // Neither a password nor a hash: RabbitMQ's user without a password.
        let password_hash = match (&u.password, u.password_hash) {
            (None, None) => Some(String::new()),
            (_, h) => h,
        };
        out.users.push(User {
            vhosts: granted.get(u.name.as_str()).cloned().unwrap_or_default(),
            // RabbitMQ's default loopback_users setting: guest is a loopback-only
            // user wherever its definition comes from.
            loopback_only: u.name == "guest",
            name: u.name,
            password: u.password,
            password_hash,
            hashing_algorithm: u.hashing_algorithm.unwrap_or_else(|| hashing.into()),
            tags: u.tags.list(),
            max_connections,
            max_channels,
        });
    }

    // Vhost limits: 3.10 writes them twice, in the vhost and as a parameter.
    let mut vhost_limits: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for v in raw.vhosts {
        vhost_limits
            .entry(v.name.clone())
            .or_default()
            .extend(v.limits.into_map());
        out.vhosts.push(VhostConfig {
            name: v.name,
            max_connections: None,
            max_queues: None,
        });
    }
    for p in raw.parameters {
        if p.component != "vhost-limits" {
            ignored.push(format!(
                "parameters: {} '{}' in vhost '{}'",
                p.component, p.name, p.vhost
            ));
            continue;
        }
        let what = || format!("vhost-limits of vhost '{}'", p.vhost);
        let value: BTreeMap<String, i64> = serde_json::from_value(p.value.clone())
            .map_err(|e| entity(what(), format!("value: {e}")))?;
        let Some(limits) = vhost_limits.get_mut(&p.vhost) else {
            return Err(entity(what(), format!("unknown vhost '{}'", p.vhost)));
        };
        limits.extend(value);
    }
    for v in &mut out.vhosts {
        let Some(mut limits) = vhost_limits.remove(&v.name) else {
            continue;
        };
        v.max_connections = limits.remove("max-connections").and_then(limit);
        v.max_queues = limits.remove("max-queues").and_then(limit);
        for k in limits.keys() {
            ignored.push(format!("vhost '{}': limit '{k}'", v.name));
        }
    }
    for g in raw.global_parameters {
        ignored.push(format!("global_parameters '{}'", g.name));
    }

    out.permissions = raw
        .permissions
        .into_iter()
        .map(|p| PermissionConfig {
            user: p.user,
            vhost: p.vhost,
            configure: p.configure,
            write: p.write,
            read: p.read,
        })
        .collect();
    out.topic_permissions = raw
        .topic_permissions
        .into_iter()
        .map(|p| TopicPermissionConfig {
            user: p.user,
            vhost: p.vhost,
            exchange: p.exchange,
            write: p.write,
            read: p.read,
        })
        .collect();
    out.policies = raw
        .policies
        .into_iter()
        .map(|p| PolicyConfig {
            name: p.name,
            vhost: p.vhost,
            pattern: p.pattern,
            apply_to: p.apply_to,
            priority: p.priority,
            definition: p.definition,
        })
        .collect();
    // As RabbitMQ's import: the default exchange and amq.* names are the broker's own.
    let predeclared = |kind: &str, name: &str, vhost: &str| {
        format!("{kind} '{name}' in vhost '{vhost}' (amq.* and \"\" are the broker's own)")
    };
    for x in raw.exchanges {
        if x.name.is_empty() || x.name.starts_with("amq.") {
            ignored.push(predeclared("exchange", &x.name, &x.vhost));
            continue;
        }
        out.exchanges.push(ExchangeConfig {
            name: x.name,
            vhost: x.vhost,
            kind: x.kind,
            durable: x.durable,
            auto_delete: x.auto_delete,
            internal: x.internal,
            arguments: x.arguments,
        });
    }
    for q in raw.queues {
        if q.name.starts_with("amq.") {
            ignored.push(predeclared("queue", &q.name, &q.vhost));
            continue;
        }
        let mut arguments = q.arguments;
        // The queue type is an argument here, as in a client's queue.declare.
        if let Some(kind) = q.kind.filter(|k| k != "classic") {
            arguments
                .entry("x-queue-type")
                .or_insert(toml::Value::String(kind));
        }
        out.queues.push(QueueConfig {
            name: q.name,
            vhost: q.vhost,
            durable: q.durable,
            auto_delete: q.auto_delete,
            arguments,
        });
    }
    out.bindings = raw
        .bindings
        .into_iter()
        .map(|b| BindingConfig {
            source: b.source,
            destination: b.destination,
            destination_type: b.destination_type,
            routing_key: b.routing_key,
            vhost: b.vhost,
            arguments: b.arguments,
        })
        .collect();
    out.ignored = ignored;
    Ok(out)
}

/// serde_json's message without its own " at line L column C" (the error names them).
fn json_reason(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Whether a value says nothing: null, "", [], {} or an object of such.
fn is_empty(v: &Json) -> bool {
    match v {
        Json::Null => true,
        Json::String(s) => s.is_empty(),
        Json::Array(a) => a.is_empty(),
        Json::Object(o) => o.values().all(is_empty),
        _ => false,
    }
}

/// Keys of the file, and of its entries, that WarrenMQ does not read and that
/// hold something.
fn unused_keys(tree: &Json) -> Vec<String> {
    let mut out = Vec::new();
    let Some(top) = tree.as_object() else {
        return out;
    };
    for (k, v) in top {
        if !TOP_KEYS.contains(&k.as_str()) && !is_empty(v) {
            out.push(k.clone());
        }
    }
    let parts: [(&str, &[&str]); 8] = [
        ("users", USER_KEYS),
        ("vhosts", VHOST_KEYS),
        ("permissions", PERMISSION_KEYS),
        ("topic_permissions", TOPIC_PERMISSION_KEYS),
        ("policies", POLICY_KEYS),
        ("exchanges", EXCHANGE_KEYS),
        ("queues", QUEUE_KEYS),
        ("bindings", BINDING_KEYS),
    ];
    for (part, known) in parts {
        let Some(entries) = top.get(part).and_then(Json::as_array) else {
            continue;
        };
        for e in entries {
            let Some(e) = e.as_object() else { continue };
            let text = |k: &str| e.get(k).and_then(Json::as_str).unwrap_or("");
            for (k, v) in e {
                if known.contains(&k.as_str()) || is_empty(v) {
                    continue;
                }
                // RabbitMQ's own description of its default vhost is no setting.
                let own = part == "vhosts"
                    && k == "metadata"
                    && text("name") == "/"
                    && v.get("description").and_then(Json::as_str) == Some("Default virtual host")
                    && v.as_object()
                        .is_some_and(|m| m.iter().all(|(k, v)| k == "description" || is_empty(v)));
                if own {
                    continue;
                }
                let name = match part {
                    "users" | "vhosts" => format!("{} '{}'", &part[..part.len() - 1], text("name")),
                    "permissions" | "topic_permissions" => format!(
                        "{part} of user '{}' in vhost '{}'",
                        text("user"),
                        text("vhost")
                    ),
                    "bindings" => format!(
                        "binding of '{}' to '{}' in vhost '{}'",
                        text("destination"),
                        text("source"),
                        text("vhost")
                    ),
                    _ => format!(
                        "{} '{}' in vhost '{}'",
                        match part {
                            "policies" => "policy",
                            "exchanges" => "exchange",
                            _ => "queue",
                        },
                        text("name"),
                        text("vhost")
                    ),
                };
                out.push(format!("{name}: {k}"));
            }
        }
    }
    out
}

/// The durable topology a data directory holds.
pub struct Stored {
    pub exchanges: Vec<StoredExchange>,
    pub queues: Vec<StoredQueue>,
    pub bindings: Vec<StoredBinding>,
}

/// Reads the durable exchanges, queues and bindings stored in `dir`; None when
/// there is no database there (nothing is created). A running broker holds the
/// directory's lock: that is `StoreError::Locked`.
pub fn read_stored(dir: &Path) -> Result<Option<Stored>, StoreError> {
    if !dir.join("db").join("db").exists() {
        return Ok(None);
    }
    let store = crate::store::SledStore::open(dir)?;
    let thread = store.take_thread();
    let read = {
        use crate::store::Store;
        (|| {
            Ok(Stored {
                exchanges: store.exchanges()?,
                queues: store.queues()?,
                bindings: store.bindings()?,
            })
        })()
    };
    drop(store);
    if let Some(t) = thread {
        let _ = t.join();
    }
    read.map(Some)
}

/// A stored arguments table as the configuration's TOML table. AMQP values with no
/// JSON counterpart are reported in `lossy`.
fn toml_table(t: &FieldTable, lossy: &mut Vec<String>, what: &str) -> toml::Table {
    fn value(v: &AMQPValue, lossy: &mut Vec<String>, at: &str) -> Option<toml::Value> {
        use toml::Value as T;
        Some(match v {
            AMQPValue::Boolean(b) => T::Boolean(*b),
            AMQPValue::Float(f) => T::Float(f64::from(*f)),
            AMQPValue::Double(f) => T::Float(*f),
            AMQPValue::DecimalValue(d) => {
                T::Float(f64::from(d.value) / 10f64.powi(i32::from(d.scale)))
            }
            AMQPValue::ShortString(s) => T::String(s.as_str().to_string()),
            AMQPValue::LongString(s) => T::String(String::from_utf8_lossy(s.as_bytes()).into()),
            AMQPValue::FieldArray(a) => T::Array(
                a.as_slice()
                    .iter()
                    .filter_map(|v| value(v, lossy, at))
                    .collect(),
            ),
            AMQPValue::FieldTable(t) => T::Table(
                t.inner()
                    .iter()
                    .filter_map(|(k, v)| Some((k.to_string(), value(v, lossy, at)?)))
                    .collect(),
            ),
            AMQPValue::ByteArray(_) | AMQPValue::Void => {
                lossy.push(format!(
                    "{at}: a {} value has no JSON form and is left out",
                    crate::model::values::type_name(v)
                ));
                return None;
            }
            other => T::Integer(
                crate::model::values::int_value(other)
                    .and_then(|n| i64::try_from(n).ok())
                    .unwrap_or(i64::MAX),
            ),
        })
    }
    t.inner()
        .iter()
        .filter_map(|(k, v)| Some((k.to_string(), value(v, lossy, what)?)))
        .collect()
}

/// The configuration's topology with the stored one added: an entity in both is
/// exported as stored (that is the one the broker runs with).
fn merged_topology(
    config: &Config,
    stored: Option<&Stored>,
    lossy: &mut Vec<String>,
) -> (Vec<ExchangeConfig>, Vec<QueueConfig>, Vec<BindingConfig>) {
    let mut exchanges: BTreeMap<(String, String), ExchangeConfig> = config
        .exchanges
        .iter()
        .map(|x| ((x.vhost.clone(), x.name.clone()), x.clone()))
        .collect();
    let mut queues: BTreeMap<(String, String), QueueConfig> = config
        .queues
        .iter()
        .map(|q| ((q.vhost.clone(), q.name.clone()), q.clone()))
        .collect();
    let mut bindings = config.bindings.clone();
    if let Some(s) = stored {
        for x in &s.exchanges {
            let Some(kind) = crate::model::exchange::by_code(x.kind) else {
                lossy.push(format!(
                    "stored exchange '{}' in vhost '{}' has an unknown type code {}: left out",
                    x.name, x.vhost, x.kind
                ));
                continue;
            };
            let what = format!("exchange '{}' in vhost '{}'", x.name, x.vhost);
            exchanges.insert(
                (x.vhost.clone(), x.name.clone()),
                ExchangeConfig {
                    name: x.name.clone(),
                    vhost: x.vhost.clone(),
                    kind: kind.name.to_string(),
                    durable: true,
                    auto_delete: x.auto_delete,
                    internal: x.internal,
                    arguments: toml_table(&x.arguments, lossy, &what),
                },
            );
        }
        for q in &s.queues {
            let what = format!("queue '{}' in vhost '{}'", q.name, q.vhost);
            queues.insert(
                (q.vhost.clone(), q.name.clone()),
                QueueConfig {
                    name: q.name.clone(),
                    vhost: q.vhost.clone(),
                    durable: true,
                    auto_delete: q.auto_delete,
                    arguments: toml_table(&q.arguments, lossy, &what),
                },
            );
        }
        for b in &s.bindings {
            let (destination_type, destination) = match &b.destination {
                StoredDestination::Queue(q) => ("queue", q),
                StoredDestination::Exchange(x) => ("exchange", x),
            };
            let what = format!(
                "binding of {destination_type} '{destination}' to exchange '{}' in vhost '{}'",
                b.source, b.vhost
            );
            let binding = BindingConfig {
                source: b.source.clone(),
                destination: destination.clone(),
                destination_type: destination_type.into(),
                routing_key: b.routing_key.clone(),
                vhost: b.vhost.clone(),
                arguments: toml_table(&b.arguments, lossy, &what),
            };
            if !bindings.contains(&binding) {
                bindings.push(binding);
            }
        }
    }
    let own = |name: &str| name.is_empty() || name.starts_with("amq.");
    let exchanges = exchanges.into_values().filter(|x| !own(&x.name)).collect();
    let queues = queues.into_values().collect();
    bindings.retain(|b| !b.source.is_empty());
    (exchanges, queues, bindings)
}

fn json_table(t: &toml::Table) -> Json {
    // A TOML table always has a JSON form (dates are refused by validation).
    serde_json::to_value(t).unwrap_or_else(|_| Json::Object(Map::new()))
}

/// What `export` made: the JSON, and what could not be carried into it.
pub struct Export {
    pub json: Json,
    pub warnings: Vec<String>,
}

/// RabbitMQ 3.10's definitions (what `rabbitmqctl export_definitions` writes) for
/// this configuration and the durable topology stored for it. Entries are sorted,
/// so that the same broker always exports the same file. Users configured with a
/// plain `password` are exported with a fresh SHA-256 hash of it.
pub fn export(config: &Config, stored: Option<&Stored>) -> Result<Export, String> {
    let mut warnings = Vec::new();
    let mut users: Vec<&User> = config.users.iter().collect();
    users.sort_by(|a, b| a.name.cmp(&b.name));
    let mut users_json = Vec::new();
    for u in &users {
        let hash = match (&u.password, &u.password_hash) {
            (_, Some(h)) => h.clone(),
            (Some(p), None) => {
                let salt = crate::auth::random_salt()
                    .map_err(|e| format!("cannot read random bytes for a salt: {e}"))?;
                crate::auth::hash_password(p.as_bytes(), salt)
            }
            (None, None) => String::new(),
        };
        let algorithm = match (&u.password, &u.password_hash) {
            (Some(_), None) => "rabbit_password_hashing_sha256",
            _ => u.hashing_algorithm.as_str(),
        };
        if u.loopback_only && u.name != "guest" {
            warnings.push(format!(
                "user '{}': loopback_only has no place in definitions (it is RabbitMQ's loopback_users setting): left out",
                u.name
            ));
        }
        let mut limits = Map::new();
        if let Some(n) = u.max_connections {
            limits.insert("max-connections".into(), n.into());
        }
        if let Some(n) = u.max_channels {
            limits.insert("max-channels".into(), n.into());
        }
        users_json.push(json!({
            "name": u.name,
            "password_hash": hash,
            "hashing_algorithm": algorithm,
            "tags": u.tags,
            "limits": limits,
        }));
    }

    let mut vhosts: Vec<&VhostConfig> = config.vhosts.iter().collect();
    vhosts.sort_by(|a, b| a.name.cmp(&b.name));
    let mut vhosts_json = Vec::new();
    let mut parameters = Vec::new();
    for v in vhosts {
        let mut pairs = Vec::new();
        let mut value = Map::new();
        for (key, n) in [
            ("max-connections", v.max_connections),
            ("max-queues", v.max_queues),
        ] {
            if let Some(n) = n {
                pairs.push(json!([key, n]));
                value.insert(key.into(), n.into());
            }
        }
        vhosts_json.push(json!({
            "name": v.name,
            "limits": pairs,
            "metadata": {"description": "", "tags": []},
        }));
        if !value.is_empty() {
            parameters.push(json!({
                "vhost": v.name,
                "component": "vhost-limits",
                "name": "limits",
                "value": value,
            }));
        }
    }

    // A vhost in a user's `vhosts` list that no permissions entry covers allows
    // everything there: RabbitMQ says that with permissions ".*".
    let mut permissions: Vec<PermissionConfig> = config.permissions.clone();
    for u in &users {
        for v in &u.vhosts {
            if !permissions
                .iter()
                .any(|p| p.user == u.name && &p.vhost == v)
            {
                permissions.push(PermissionConfig {
                    user: u.name.clone(),
                    vhost: v.clone(),
                    configure: ".*".into(),
                    write: ".*".into(),
                    read: ".*".into(),
                });
            }
        }
    }
    permissions.sort_by(|a, b| (&a.user, &a.vhost).cmp(&(&b.user, &b.vhost)));
    let permissions: Vec<Json> = permissions
        .iter()
        .map(|p| {
            json!({
                "user": p.user, "vhost": p.vhost,
                "configure": p.configure, "write": p.write, "read": p.read,
            })
        })
        .collect();
    let mut topic: Vec<&TopicPermissionConfig> = config.topic_permissions.iter().collect();
    topic.sort_by(|a, b| (&a.user, &a.vhost, &a.exchange).cmp(&(&b.user, &b.vhost, &b.exchange)));
    let topic: Vec<Json> = topic
        .iter()
        .map(|p| {
            json!({
                "user": p.user, "vhost": p.vhost, "exchange": p.exchange,
                "write": p.write, "read": p.read,
            })
        })
        .collect();
    let mut policies: Vec<&PolicyConfig> = config.policies.iter().collect();
    policies.sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
    let policies: Vec<Json> = policies
        .iter()
        .map(|p| {
            json!({
                "vhost": p.vhost, "name": p.name, "pattern": p.pattern,
                "apply-to": p.apply_to, "priority": p.priority,
                "definition": json_table(&p.definition),
            })
        })
        .collect();

    let (exchanges, queues, mut bindings) = merged_topology(config, stored, &mut warnings);
    let exchanges: Vec<Json> = exchanges
        .iter()
        .map(|x| {
            // 3.10 leaves `internal` out (and internal exchanges with it); RabbitMQ's
            // import reads it, so an internal exchange survives the trip.
            json!({
                "vhost": x.vhost, "name": x.name, "type": x.kind,
                "durable": x.durable, "auto_delete": x.auto_delete, "internal": x.internal,
                "arguments": json_table(&x.arguments),
            })
        })
        .collect();
    let queues: Vec<Json> = queues
        .iter()
        .map(|q| {
            let kind = match q.arguments.get("x-queue-type") {
                Some(toml::Value::String(t)) => t.clone(),
                _ => "classic".into(),
            };
            json!({
                "vhost": q.vhost, "name": q.name, "type": kind,
                "durable": q.durable, "auto_delete": q.auto_delete,
                "arguments": json_table(&q.arguments),
            })
        })
        .collect();
    let key = |b: &BindingConfig| {
        (
            b.vhost.clone(),
            b.source.clone(),
            b.destination_type.clone(),
            b.destination.clone(),
            b.routing_key.clone(),
            json_table(&b.arguments).to_string(),
        )
    };
    bindings.sort_by_key(key);
    bindings.dedup();
    let bindings: Vec<Json> = bindings
        .iter()
        .map(|b| {
            json!({
                "vhost": b.vhost, "source": b.source, "destination": b.destination,
                "destination_type": b.destination_type, "routing_key": b.routing_key,
                "arguments": json_table(&b.arguments),
            })
        })
        .collect();

    Ok(Export {
        json: json!({
            "warrenmq_version": env!("CARGO_PKG_VERSION"),
            "users": users_json,
            "vhosts": vhosts_json,
            "permissions": permissions,
            "topic_permissions": topic,
            "parameters": parameters,
            "global_parameters": [],
            "policies": policies,
            "queues": queues,
            "exchanges": exchanges,
            "bindings": bindings,
        }),
        warnings,
    })
}

/// A TOML key: bare where TOML allows it, quoted otherwise.
fn key(k: &str) -> String {
    let bare = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        k.to_string()
    } else {
        toml::Value::String(k.to_string()).to_string()
    }
}

fn line(out: &mut String, k: &str, v: impl Into<toml::Value>) {
    out.push_str(&format!("{} = {}\n", key(k), v.into()));
}

/// The configuration's entities as WarrenMQ TOML: what `warrenmq import-definitions`
/// prints. With `listen` and `data_dir` (the embedded default's) it is a complete
/// file that `warrenmq check-config` accepts and that loads as the same entities.
pub fn to_toml(config: &Config, source: &str) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "# WarrenMQ configuration made by `warrenmq import-definitions` from {source}.\n\
         # listen and data_dir are the embedded default's: adjust them. The [limits]\n\
         # table is left at its defaults (see config/warrenmq.toml for the keys).\n\n"
    ));
    line(
        &mut out,
        "listen",
        toml::Value::Array(
            config
                .listen
                .iter()
                .map(|a| toml::Value::String(a.to_string()))
                .collect(),
        ),
    );
    line(&mut out, "data_dir", config.data_dir.display().to_string());
    for v in &config.vhosts {
        out.push_str("\n[[vhosts]]\n");
        line(&mut out, "name", v.name.as_str());
        if let Some(n) = v.max_connections {
            line(&mut out, "max_connections", i64::from(n));
        }
        if let Some(n) = v.max_queues {
            line(&mut out, "max_queues", i64::from(n));
        }
    }
    for u in &config.users {
        out.push_str("\n[[users]]\n");
        line(&mut out, "name", u.name.as_str());
        if let Some(p) = &u.password {
            line(&mut out, "password", p.as_str());
        }
        if let Some(h) = &u.password_hash {
            if h.is_empty() {
                out.push_str("# No password: this user cannot log in with one.\n");
            }
            line(&mut out, "password_hash", h.as_str());
            line(&mut out, "hashing_algorithm", u.hashing_algorithm.as_str());
        }
        line(
            &mut out,
            "tags",
            toml::Value::Array(u.tags.iter().map(|t| t.as_str().into()).collect()),
        );
        if u.loopback_only {
            line(&mut out, "loopback_only", true);
        }
        line(
            &mut out,
            "vhosts",
            toml::Value::Array(u.vhosts.iter().map(|t| t.as_str().into()).collect()),
        );
        if let Some(n) = u.max_connections {
            line(&mut out, "max_connections", i64::from(n));
        }
        if let Some(n) = u.max_channels {
            line(&mut out, "max_channels", i64::from(n));
        }
    }
    for p in &config.permissions {
        out.push_str("\n[[permissions]]\n");
        line(&mut out, "user", p.user.as_str());
        line(&mut out, "vhost", p.vhost.as_str());
        line(&mut out, "configure", p.configure.as_str());
        line(&mut out, "write", p.write.as_str());
        line(&mut out, "read", p.read.as_str());
    }
    for p in &config.topic_permissions {
        out.push_str("\n[[topic_permissions]]\n");
        line(&mut out, "user", p.user.as_str());
        line(&mut out, "vhost", p.vhost.as_str());
        line(&mut out, "exchange", p.exchange.as_str());
        line(&mut out, "write", p.write.as_str());
        line(&mut out, "read", p.read.as_str());
    }
    for p in &config.policies {
        out.push_str("\n[[policies]]\n");
        line(&mut out, "name", p.name.as_str());
        line(&mut out, "vhost", p.vhost.as_str());
        line(&mut out, "pattern", p.pattern.as_str());
        line(&mut out, "apply-to", p.apply_to.as_str());
        line(&mut out, "priority", p.priority);
        line(&mut out, "definition", p.definition.clone());
    }
    for x in &config.exchanges {
        out.push_str("\n[[exchanges]]\n");
        line(&mut out, "name", x.name.as_str());
        line(&mut out, "vhost", x.vhost.as_str());
        line(&mut out, "type", x.kind.as_str());
        line(&mut out, "durable", x.durable);
        if x.auto_delete {
            line(&mut out, "auto_delete", true);
        }
        if x.internal {
            line(&mut out, "internal", true);
        }
        if !x.arguments.is_empty() {
            line(&mut out, "arguments", x.arguments.clone());
        }
    }
    for q in &config.queues {
        out.push_str("\n[[queues]]\n");
        line(&mut out, "name", q.name.as_str());
        line(&mut out, "vhost", q.vhost.as_str());
        line(&mut out, "durable", q.durable);
        if q.auto_delete {
            line(&mut out, "auto_delete", true);
        }
        if !q.arguments.is_empty() {
            line(&mut out, "arguments", q.arguments.clone());
        }
    }
    for b in &config.bindings {
        out.push_str("\n[[bindings]]\n");
        line(&mut out, "source", b.source.as_str());
        line(&mut out, "vhost", b.vhost.as_str());
        line(&mut out, "destination", b.destination.as_str());
        line(&mut out, "destination_type", b.destination_type.as_str());
        line(&mut out, "routing_key", b.routing_key.as_str());
        if !b.arguments.is_empty() {
            line(&mut out, "arguments", b.arguments.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Definitions {
        match parse(text, "d.json") {
            Ok(d) => d,
            Err(e) => panic!("refused: {e}"),
        }
    }

    #[test]
    fn tags_come_as_a_comma_string_or_a_list() {
        let d = parsed(
            r#"{"users": [
                {"name": "a", "password_hash": "", "tags": "administrator, monitoring"},
                {"name": "b", "password_hash": "", "tags": ["management"]},
                {"name": "c", "password_hash": "", "tags": ""}
            ]}"#,
        );
        let tags: Vec<Vec<String>> = d.users.iter().map(|u| u.tags.clone()).collect();
        assert_eq!(
            tags,
            [
                vec!["administrator".to_string(), "monitoring".into()],
                vec!["management".into()],
                vec![]
            ]
        );
    }

    #[test]
    fn users_get_limits_hashing_and_the_vhosts_of_their_permissions() {
        let d = parsed(
            r#"{"rabbit_version": "3.5.7",
                "users": [{"name": "old", "password_hash": "x",
                           "limits": {"max-connections": 3, "max-channels": -1}},
                          {"name": "new", "password_hash": "x",
                           "hashing_algorithm": "rabbit_password_hashing_sha512"},
                          {"name": "bare"}],
                "permissions": [
                  {"user": "old", "vhost": "b", "configure": "", "write": "", "read": ""},
                  {"user": "old", "vhost": "a", "configure": "", "write": "", "read": ""}]}"#,
        );
        let old = &d.users[0];
        // Files from before 3.6.0 hashed with MD5 when they did not say.
        assert_eq!(old.hashing_algorithm, "rabbit_password_hashing_md5");
        assert_eq!((old.max_connections, old.max_channels), (Some(3), None));
        assert_eq!(old.vhosts, ["b", "a"]);
        assert_eq!(
            d.users[1].hashing_algorithm,
            "rabbit_password_hashing_sha512"
        );
        assert!(d.users[1].vhosts.is_empty());
        // Neither password nor hash: RabbitMQ's user without a password.
        assert_eq!(d.users[2].password_hash.as_deref(), Some(""));
        let d = parsed(r#"{"rabbit_version": "3.10.8", "users": [{"name": "n"}]}"#);
        assert_eq!(
            d.users[0].hashing_algorithm,
            "rabbit_password_hashing_sha256"
        );
    }

    #[test]
    fn vhost_limits_come_from_the_vhost_or_its_parameter() {
        let d = parsed(
            r#"{"vhosts": [{"name": "a", "limits": [["max-queues", 7]]},
                           {"name": "b"}, {"name": "c", "limits": {"max-connections": -1}}],
                "parameters": [{"vhost": "b", "component": "vhost-limits", "name": "limits",
                                "value": {"max-connections": 5}}]}"#,
        );
        let limits: Vec<_> = d
            .vhosts
            .iter()
            .map(|v| (v.name.as_str(), v.max_connections, v.max_queues))
            .collect();
        assert_eq!(
            limits,
            [
                ("a", None, Some(7)),
                ("b", Some(5), None),
                ("c", None, None)
            ]
        );
        let err = parse(
            r#"{"parameters": [{"vhost": "x", "component": "vhost-limits", "name": "limits", "value": {}}]}"#,
            "d.json",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(err, "d.json: vhost-limits of vhost 'x': unknown vhost 'x'");
    }

    #[test]
    fn queue_types_become_arguments_and_predeclared_names_are_skipped() {
        let d = parsed(
            r#"{"queues": [{"name": "q", "vhost": "/", "type": "quorum", "arguments": {}},
                           {"name": "c", "vhost": "/", "type": "classic", "arguments": {}},
                           {"name": "amq.gen-1", "vhost": "/", "arguments": {}}],
                "exchanges": [{"name": "amq.topic", "vhost": "/", "type": "topic"},
                              {"name": "x", "vhost": "/", "type": "topic",
                               "arguments": {"n": 1, "f": 1.5, "l": [1, "a"], "t": {"k": true}}}]}"#,
        );
        assert_eq!(d.queues.len(), 2);
        assert_eq!(
            d.queues[0].arguments.get("x-queue-type"),
            Some(&toml::Value::String("quorum".into()))
        );
        assert!(d.queues[1].arguments.is_empty());
        assert_eq!(d.exchanges.len(), 1);
        let args = &d.exchanges[0].arguments;
        assert_eq!(args.get("n"), Some(&toml::Value::Integer(1)));
        assert_eq!(args.get("f"), Some(&toml::Value::Float(1.5)));
        assert!(args.get("l").is_some_and(toml::Value::is_array));
        assert!(args.get("t").is_some_and(toml::Value::is_table));
        assert_eq!(d.ignored.len(), 2, "{:?}", d.ignored);
    }

    #[test]
    fn what_has_no_equivalent_is_listed_once_and_empty_values_are_not() {
        let d = parsed(
            r#"{"rabbit_version": "3.10.8", "product_name": "RabbitMQ",
                "global_parameters": [{"name": "cluster_name", "value": "c1"}],
                "parameters": [{"vhost": "/", "component": "shovel", "name": "s1", "value": {}}],
                "vhosts": [{"name": "/", "limits": [],
                            "metadata": {"description": "Default virtual host", "tags": []}},
                           {"name": "v", "metadata": {"description": "ours", "tags": []}}],
                "users": [{"name": "u", "password_hash": "", "administrator": true}],
                "colour": "red", "nothing": []}"#,
        );
        let line = d.warning("d.json").expect("a warning");
        for item in [
            "rabbit_version",
            "product_name",
            "global_parameters 'cluster_name'",
            "parameters: shovel 's1' in vhost '/'",
            "vhost 'v': metadata",
            "user 'u': administrator",
            "colour",
        ] {
            assert!(line.contains(item), "{item} missing from {line}");
        }
        assert!(!line.contains("nothing"), "{line}");
        assert!(!line.contains("vhost '/': metadata"), "{line}");
        assert!(!line.contains('\n'));
        assert!(parsed(r#"{"users": []}"#).warning("d.json").is_none());
    }

    #[test]
    fn malformed_and_mistyped_files_name_line_and_column() {
        let err = parse(
            "{\n  \"users\": [\n    {\"name\": \"a\",}\n  ]\n}",
            "d.json",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("d.json:3:18: trailing comma"), "{err}");
        let err = parse(
            "{\"queues\": [\n{\"name\": \"q\", \"vhost\": \"/\", \"durable\": \"yes\"}]}",
            "d.json",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("d.json:2:44: invalid type: string \"yes\", expected a boolean"),
            "{err}"
        );
        let err = parse("[]", "d.json").unwrap_err().to_string();
        assert!(err.contains("must hold a JSON object"), "{err}");
    }

    #[test]
    fn toml_keys_are_quoted_only_when_they_must_be() {
        assert_eq!(key("x-message-ttl"), "x-message-ttl");
        assert_eq!(key("a.b"), "\"a.b\"");
        assert_eq!(key(""), "\"\"");
    }
}
