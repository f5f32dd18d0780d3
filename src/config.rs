//! Broker configuration: a TOML file, or the default one embedded in the binary.
//! Kept apart so that start-up can reject a bad file with its path, line and reason
//! before anything listens.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The default configuration, shipped as `config/warrenmq.toml` and embedded here.
pub const DEFAULT_TOML: &str = include_str!("../config/warrenmq.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub data_dir: PathBuf,
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// "text" (default) or "json": one JSON object per line, with the span fields
    /// (connection id, peer) of each event, for log shippers.
    #[serde(default)]
    pub log_format: LogFormat,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub users: Vec<User>,
    #[serde(default)]
    pub vhosts: Vec<VhostConfig>,
    /// What each user may do in a vhost, as RabbitMQ's permissions.
    #[serde(default)]
    pub permissions: Vec<PermissionConfig>,
    /// Topology declared at start-up, after the stored state is read back.
    #[serde(default)]
    pub exchanges: Vec<ExchangeConfig>,
    #[serde(default)]
    pub queues: Vec<QueueConfig>,
    #[serde(default)]
    pub bindings: Vec<BindingConfig>,
    /// Per-user, per-exchange patterns on routing keys (RabbitMQ's topic permissions).
    #[serde(default)]
    pub topic_permissions: Vec<TopicPermissionConfig>,
    /// Operator policies over queue and exchange arguments, as RabbitMQ's.
    #[serde(default)]
    pub policies: Vec<PolicyConfig>,
    /// What start-up does when the file declares an entity the store holds with
    /// other properties.
    #[serde(default)]
    pub on_conflict: OnConflict,
    /// Remove exchanges, queues and bindings the file created once it no longer
    /// lists them (never a queue holding messages).
    #[serde(default)]
    pub prune: bool,
    /// The management HTTP API (RabbitMQ's paths and shapes); absent = off.
    #[serde(default)]
    pub management: Option<ManagementConfig>,
    /// Prometheus metrics with RabbitMQ's names (rabbitmq_prometheus); absent = off.
    #[serde(default)]
    pub prometheus: Option<PrometheusConfig>,
    /// `amqps` listeners; absent = no TLS.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// What the `[tls]` files made, loaded with the file so that a bad certificate
    /// stops start-up (and check-config) at its key.
    #[serde(skip)]
    pub tls_server: Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>,
    /// RabbitMQ definitions (what `rabbitmqctl export_definitions` writes) whose
    /// users, vhosts, permissions, topic permissions, policies, exchanges, queues
    /// and bindings join this file's, as with RabbitMQ's `load_definitions`. A
    /// relative path is relative to this file's directory.
    #[serde(default)]
    pub definitions: Option<PathBuf>,
    /// What loading left aside (parts of the definitions WarrenMQ has no
    /// equivalent for), one line each: the broker logs them, the subcommands print them.
    #[serde(skip)]
    pub warnings: Vec<String>,
    /// Where this configuration came from, to name FILE:LINE in later errors.
    #[serde(skip)]
    pub origin: Option<Origin>,
}

/// The `[management]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagementConfig {
    /// Addresses for the HTTP API (RabbitMQ's management.tcp.port is 15672).
    #[serde(default = "default_management_listen")]
    pub listen: Vec<SocketAddr>,
    /// Addresses for the API over HTTPS (RabbitMQ's management.ssl.port, 15671),
    /// with the `[tls]` table's certificate.
    #[serde(default)]
    pub tls_listen: Vec<SocketAddr>,
    /// Milliseconds between two samples of the message rates (RabbitMQ's
    /// collect_statistics_interval): a rate is the change over the last one.
    #[serde(default = "default_statistics_interval")]
    pub collect_statistics_interval: u64,
}

fn default_statistics_interval() -> u64 {
    5000
}

impl Default for ManagementConfig {
    fn default() -> Self {
        ManagementConfig {
            listen: default_management_listen(),
            tls_listen: Vec::new(),
            collect_statistics_interval: default_statistics_interval(),
        }
    }
}

fn default_management_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 15672))]
}

/// The `[prometheus]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrometheusConfig {
    /// Addresses for /metrics (RabbitMQ's prometheus.tcp.port is 15692).
    #[serde(default = "default_prometheus_listen")]
    pub listen: Vec<SocketAddr>,
    /// Addresses for /metrics over HTTPS (RabbitMQ's prometheus.ssl.port, 15691),
    /// with the `[tls]` table's certificate.
    #[serde(default)]
    pub tls_listen: Vec<SocketAddr>,
}

fn default_prometheus_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 15692))]
}

/// The `[tls]` table: names as in RabbitMQ's `ssl_options`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Addresses for `amqps` (RabbitMQ's listeners.ssl; 5671 by convention).
    #[serde(default = "default_tls_listen")]
    pub listen: Vec<SocketAddr>,
    /// The server's certificate chain, PEM, leaf first.
    pub certfile: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub keyfile: PathBuf,
    /// CA certificates that client certificates must chain to (for verify_peer).
    #[serde(default)]
    pub cacertfile: Option<PathBuf>,
    /// verify_none (default) or verify_peer: ask for a client certificate and
    /// check it against cacertfile.
    #[serde(default)]
    pub verify: Verify,
    /// With verify_peer: refuse clients that present no certificate.
    #[serde(default)]
    pub fail_if_no_peer_cert: bool,
    /// Oldest TLS version accepted: "1.2" (default) or "1.3".
    #[serde(default = "default_tls_version")]
    pub min_version: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verify {
    #[default]
    VerifyNone,
    VerifyPeer,
}

fn default_tls_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 5671))]
}

fn default_tls_version() -> String {
    "1.2".into()
}

/// The text a configuration was parsed from, and its path as shown in errors.
#[derive(Clone)]
pub struct Origin {
    pub path: String,
    pub text: std::sync::Arc<str>,
    /// The definitions file merged in, if any.
    pub definitions: Option<DefinitionsOrigin>,
}

/// A definitions file merged into a configuration: its entries follow the TOML's
/// in each array, so an entry's index tells which file it came from.
#[derive(Debug, Clone)]
pub struct DefinitionsOrigin {
    /// As shown in errors.
    pub path: String,
    /// How many entries of each array (by its TOML name) came from the TOML file.
    pub from_toml: Vec<(&'static str, usize)>,
}

impl DefinitionsOrigin {
    /// Whether the `index`th entry of `array` came from the definitions file.
    fn holds(&self, array: &str, index: usize) -> bool {
        self.from_toml
            .iter()
            .any(|(a, n)| *a == array && index >= *n)
    }
}

/// The text holds passwords: Debug shows the path only.
impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("path", &self.path)
            .field("definitions", &self.definitions)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnConflict {
    /// Stop start-up, naming the entity, both values and the file's line.
    #[default]
    Stop,
    /// Keep what is stored and log a warning, as RabbitMQ does.
    KeepStored,
}

/// A `[[permissions]]` entry: regular expressions over the names of exchanges and
/// queues, as in RabbitMQ's definitions ("" allows nothing).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PermissionConfig {
    pub user: String,
    #[serde(default = "default_vhost")]
    pub vhost: String,
    pub configure: String,
    pub write: String,
    pub read: String,
}

/// A `[[topic_permissions]]` entry: which routing keys `user` may publish with
/// (write) and bind with (read) on the topic exchange `exchange`, as RabbitMQ's.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopicPermissionConfig {
    pub user: String,
    #[serde(default = "default_vhost")]
    pub vhost: String,
    pub exchange: String,
    pub write: String,
    pub read: String,
}

/// A `[[policies]]` entry, field names as in RabbitMQ's definitions: the policy of
/// highest priority whose pattern matches a queue's (or exchange's) name supplies
/// the keys of `definition` (message-ttl, max-length, dead-letter-exchange, ...).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    #[serde(default = "default_vhost")]
    pub vhost: String,
    pub pattern: String,
    /// "all", "queues", "classic_queues", "quorum_queues", "streams" or "exchanges".
    #[serde(rename = "apply-to", alias = "apply_to", default = "default_apply_to")]
    pub apply_to: String,
    #[serde(default)]
    pub priority: i64,
    pub definition: toml::Table,
}

fn default_apply_to() -> String {
    "all".into()
}

/// An `[[exchanges]]` entry; field names as in RabbitMQ's definitions.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeConfig {
    pub name: String,
    #[serde(default = "default_vhost")]
    pub vhost: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default = "yes")]
    pub durable: bool,
    #[serde(default)]
    pub auto_delete: bool,
    #[serde(default)]
    pub internal: bool,
    #[serde(default)]
    pub arguments: toml::Table,
}

/// A `[[queues]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    pub name: String,
    #[serde(default = "default_vhost")]
    pub vhost: String,
    #[serde(default = "yes")]
    pub durable: bool,
    #[serde(default)]
    pub auto_delete: bool,
    #[serde(default)]
    pub arguments: toml::Table,
}

/// A `[[bindings]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingConfig {
    pub source: String,
    pub destination: String,
    #[serde(default = "default_destination_type")]
    pub destination_type: String,
    #[serde(default)]
    pub routing_key: String,
    #[serde(default = "default_vhost")]
    pub vhost: String,
    #[serde(default)]
    pub arguments: toml::Table,
}

fn default_vhost() -> String {
    "/".into()
}

fn yes() -> bool {
    true
}

fn default_destination_type() -> String {
    "queue".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub frame_max: u32,
    pub channel_max: u16,
    pub heartbeat: u16,
    pub handshake_timeout: u64,
    pub max_message_size: u64,
    pub memory_high_watermark: u64,
    /// The watermark never exceeds this share of the memory the process may use
    /// (its cgroup's limit, else the machine's RAM): RabbitMQ's relative
    /// vm_memory_high_watermark, 0.4 by default.
    pub memory_high_watermark_relative: f64,
    /// What counts against the watermark: "rss" (the process's resident memory,
    /// and the bodies held) or "bodies" (the bodies held only), as RabbitMQ's
    /// vm_memory_calculation_strategy.
    pub memory_calculation_strategy: MemoryStrategy,
    /// Free bytes the data directory's file system must keep; below, publishers
    /// are blocked (RabbitMQ's disk_free_limit, 50 MB by default); 0 = no check.
    pub disk_free_limit: u64,
    pub queue_memory_budget: u64,
    /// Bytes per segment of the message body log (LavinMQ's segment_size). A
    /// segment is deleted whole once no queue points into it, so this bounds what
    /// a few long-lived messages keep on disk.
    pub segment_size: u64,
    /// Client connections open at once, broker-wide; 0 = unlimited.
    pub max_connections: u32,
    /// Connections open at once per user; 0 = unlimited.
    pub max_connections_per_user: u32,
    /// Consumers on one channel; 0 = unlimited.
    pub max_consumers_per_channel: u32,
    /// Queues in one vhost; 0 = unlimited.
    pub max_queues_per_vhost: u32,
    /// Exchanges in one vhost, the predeclared ones included; 0 = unlimited.
    pub max_exchanges_per_vhost: u32,
    /// Bindings from one exchange; 0 = unlimited.
    pub max_bindings_per_exchange: u32,
    /// Nesting depth of field tables and arrays in any table a client sends.
    pub max_header_depth: u32,
    /// Field values in one table a client sends, nested ones included.
    pub max_table_fields: u32,
    /// Seconds a partially received frame may take to complete.
    pub frame_timeout: u64,
    /// Milliseconds a consumer may hold a delivery without acknowledging it;
    /// past that its channel is closed (406) and the deliveries go back to their
    /// queues. RabbitMQ's consumer_timeout, 30 minutes by default; 0 = none.
    pub consumer_timeout: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frame_max: 131072,
            channel_max: 2047,
            heartbeat: 60,
            handshake_timeout: 10,
            max_message_size: 128 * MIB,
            memory_high_watermark: 1024 * MIB,
            memory_high_watermark_relative: 0.4,
            memory_calculation_strategy: MemoryStrategy::Rss,
            disk_free_limit: 50_000_000,
            queue_memory_budget: 64 * MIB,
            segment_size: 64 * MIB,
            max_connections: 65536,
            max_connections_per_user: 0,
            max_consumers_per_channel: 65535,
            max_queues_per_vhost: 0,
            max_exchanges_per_vhost: 0,
            max_bindings_per_exchange: 0,
            max_header_depth: 32,
            max_table_fields: 4096,
            frame_timeout: 60,
            consumer_timeout: 1_800_000,
        }
    }
}

/// What the memory alarm counts (`limits.memory_calculation_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryStrategy {
    Rss,
    Bodies,
}

const MIB: u64 = 1024 * 1024;

/// The AMQP 0-9-1 minimum every peer must accept.
pub const FRAME_MAX_MIN: u32 = 4096;
/// A frame is buffered whole before it is decoded, so frame_max is memory any client
/// may make the broker hold per connection. Past a few hundred KiB bigger frames buy
/// no throughput (the frame overhead is 8 bytes), and 16 MiB, 128 times RabbitMQ's
/// default, still lets any legitimate setting through.
pub const FRAME_MAX_MAX: u32 = 16 * 1024 * 1024;
/// RabbitMQ refuses max_message_size above 512 MiB.
pub const MAX_MESSAGE_SIZE_MAX: u64 = 512 * MIB;
/// Message body log segments: at least 64 KiB (smaller ones only multiply files),
/// at most 1 GiB (offsets within a segment are 32-bit, and a whole segment is what a
/// few old messages can pin on disk).
pub const SEGMENT_SIZE_MIN: u64 = 64 * 1024;
pub const SEGMENT_SIZE_MAX: u64 = 1024 * MIB;
/// Beyond an hour a "timeout" protects nothing, and seconds this large would overflow
/// the clock arithmetic of deadlines.
pub const TIMEOUT_MAX_SECS: u64 = 3600;
/// Parsing nested tables recurses; this keeps any setting far from the stack's limit.
pub const HEADER_DEPTH_MAX: u32 = 128;

#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// In plain text: for development. Use `password_hash` elsewhere.
    #[serde(default)]
    pub password: Option<String>,
    /// RabbitMQ's format: base64 of a 4-byte salt followed by the hash of salt +
    /// password (`warrenmq hash-password` makes one; RabbitMQ's definitions export
    /// carries them).
    #[serde(default)]
    pub password_hash: Option<String>,
    /// `rabbit_password_hashing_sha256` (RabbitMQ's default) or `_sha512`.
    #[serde(default = "default_hashing")]
    pub hashing_algorithm: String,
    /// RabbitMQ's user tags (administrator, monitoring, management, policymaker).
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub loopback_only: bool,
    #[serde(default = "all_vhosts")]
    pub vhosts: Vec<String>,
    /// Connections this user may have open at once (RabbitMQ's user limit
    /// max-connections); none = unlimited.
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Channels per connection for this user (user limit max-channels).
    #[serde(default)]
    pub max_channels: Option<u32>,
}

/// Secrets stay out of logs and Debug output.
impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field(
                "password_hash",
                &self.password_hash.as_ref().map(|_| "<redacted>"),
            )
            .field("hashing_algorithm", &self.hashing_algorithm)
            .field("tags", &self.tags)
            .field("loopback_only", &self.loopback_only)
            .field("vhosts", &self.vhosts)
            .field("max_connections", &self.max_connections)
            .field("max_channels", &self.max_channels)
            .finish()
    }
}

fn default_hashing() -> String {
    "rabbit_password_hashing_sha256".into()
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VhostConfig {
    pub name: String,
    /// Client connections to this vhost at once (vhost limit max-connections).
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Queues in this vhost (vhost limit max-queues).
    #[serde(default)]
    pub max_queues: Option<u32>,
}

fn default_log_level() -> String {
    "info".into()
}

fn all_vhosts() -> Vec<String> {
    vec!["/".into()]
}

/// Why a configuration could not be used; the Display form is what start-up prints.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {reason}")]
    Parse {
        path: String,
        line: usize,
        column: usize,
        reason: String,
    },
    /// A value that parsed but is out of bounds, at its key.
    #[error("{path}:{line}:{column}: {reason}")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        reason: String,
    },
    /// A problem with something the file leaves out (so there is no line to name).
    #[error("{path}: {reason}")]
    Missing { path: String, reason: String },
    /// A definitions file that is not JSON, or holds a value of the wrong type.
    #[error("{path}:{line}:{column}: {reason}")]
    Json {
        path: String,
        line: usize,
        column: usize,
        reason: String,
    },
    /// An entity of a definitions file that cannot be used, named as RabbitMQ
    /// would name it (JSON keeps no line per entity).
    #[error("{path}: {what}: {reason}")]
    Entity {
        path: String,
        what: String,
        reason: String,
    },
}

impl Default for Config {
    fn default() -> Self {
        // The embedded file is part of the binary and covered by a unit test.
        Config::parse(DEFAULT_TOML, "<embedded default>").expect("embedded default config is valid")
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Config::parse(&text, &shown)
    }

    /// Parses a configuration's TOML text, merges the definitions file it names (a
    /// relative path is taken from `path`'s directory), then validates the whole.
    pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |s| position(text, s.start));
            ConfigError::Parse {
                path: path.to_string(),
                line,
                column,
                reason: e.message().to_string(),
            }
        })?;
        config.origin = Some(Origin {
            path: path.to_string(),
            text: text.into(),
            definitions: None,
        });
        if let Some(file) = config.definitions.take() {
            let file = match Path::new(path).parent() {
                Some(dir) if file.is_relative() => dir.join(file),
                _ => file,
            };
            let shown = file.display().to_string();
            let definitions = crate::definitions::read(&file, &shown)?;
            config.merge(definitions, shown)?;
            config.definitions = Some(file);
        }
        config.validate().map_err(|p| config.refusal(p))?;
        if let Some(tls) = &mut config.tls {
            // Files named relative to the configuration file, as RabbitMQ's are not
            // (there, relative to the node's working directory), because a service's
            // working directory is rarely where its configuration lives.
            let base = Path::new(path).parent().unwrap_or(Path::new(""));
            for file in [&mut tls.certfile, &mut tls.keyfile]
                .into_iter()
                .chain(tls.cacertfile.as_mut())
            {
                if file.is_relative() {
                    *file = base.join(&*file);
                }
            }
            let built = crate::tls::server_config(tls).map_err(|(key, reason)| {
                let problem = Problem {
                    at: vec![vec![Seg::Key("tls"), Seg::Key(key)], vec![Seg::Key("tls")]],
                    reason,
                };
                match problem.line_in(text) {
                    Some((line, column)) => ConfigError::Invalid {
                        path: path.to_string(),
                        line,
                        column,
                        reason: problem.reason,
                    },
                    None => ConfigError::Missing {
                        path: path.to_string(),
                        reason: problem.reason,
                    },
                }
            })?;
            config.tls_server = Some(built);
        }
        Ok(config)
    }

    /// A configuration of RabbitMQ definitions alone (`warrenmq import-definitions`):
    /// the embedded default's listeners, data directory and limits, and the file's
    /// users, vhosts, permissions and topology, checked as start-up checks them.
    pub fn from_definitions(file: &Path) -> Result<Config, ConfigError> {
        let shown = file.display().to_string();
        let mut config = Config {
            users: Vec::new(),
            vhosts: Vec::new(),
            permissions: Vec::new(),
            topic_permissions: Vec::new(),
            policies: Vec::new(),
            exchanges: Vec::new(),
            queues: Vec::new(),
            bindings: Vec::new(),
            ..Config::default()
        };
        config.origin = Some(Origin {
            path: shown.clone(),
            text: "".into(),
            definitions: None,
        });
        let definitions = crate::definitions::read(file, &shown)?;
        config.merge(definitions, shown)?;
        config.definitions = Some(file.to_path_buf());
        config.validate().map_err(|p| config.refusal(p))?;
        Ok(config)
    }

    /// Adds a definitions file's entries after this configuration's own. An entity
    /// both define (same name, or same user and vhost, ...) must be the same in
    /// both; the copy from the definitions is then dropped.
    fn merge(
        &mut self,
        d: crate::definitions::Definitions,
        path: String,
    ) -> Result<(), ConfigError> {
        if let Some(w) = d.warning(&path) {
            self.warnings.push(w);
        }
        let from_toml = vec![
            ("users", self.users.len()),
            ("vhosts", self.vhosts.len()),
            ("permissions", self.permissions.len()),
            ("topic_permissions", self.topic_permissions.len()),
            ("policies", self.policies.len()),
            ("exchanges", self.exchanges.len()),
            ("queues", self.queues.len()),
            ("bindings", self.bindings.len()),
        ];
        let o = self.origin.as_ref();
        let p = path.as_str();
        join(
            o,
            p,
            "users",
            &mut self.users,
            d.users,
            |a, b| a.name == b.name,
            |u| format!("user '{}'", u.name),
        )?;
        join(
            o,
            p,
            "vhosts",
            &mut self.vhosts,
            d.vhosts,
            |a, b| a.name == b.name,
            |v| format!("vhost '{}'", v.name),
        )?;
        join(
            o,
            p,
            "permissions",
            &mut self.permissions,
            d.permissions,
            |a, b| (&a.user, &a.vhost) == (&b.user, &b.vhost),
            |x| format!("permissions of user '{}' in vhost '{}'", x.user, x.vhost),
        )?;
        join(
            o,
            p,
            "topic_permissions",
            &mut self.topic_permissions,
            d.topic_permissions,
            |a, b| (&a.user, &a.vhost, &a.exchange) == (&b.user, &b.vhost, &b.exchange),
            |x| {
                format!(
                    "topic permissions of user '{}' for exchange '{}' in vhost '{}'",
                    x.user, x.exchange, x.vhost
                )
            },
        )?;
        join(
            o,
            p,
            "policies",
            &mut self.policies,
            d.policies,
            |a, b| (&a.vhost, &a.name) == (&b.vhost, &b.name),
            |x| format!("policy '{}' in vhost '{}'", x.name, x.vhost),
        )?;
        join(
            o,
            p,
            "exchanges",
            &mut self.exchanges,
            d.exchanges,
            |a, b| (&a.vhost, &a.name) == (&b.vhost, &b.name),
            |x| format!("exchange '{}' in vhost '{}'", x.name, x.vhost),
        )?;
        join(
            o,
            p,
            "queues",
            &mut self.queues,
            d.queues,
            |a, b| (&a.vhost, &a.name) == (&b.vhost, &b.name),
            |x| format!("queue '{}' in vhost '{}'", x.name, x.vhost),
        )?;
        // A binding is all identity: only the same binding can be in both.
        join(
            o,
            p,
            "bindings",
            &mut self.bindings,
            d.bindings,
            |a, b| a == b,
            |_| String::new(),
        )?;
        if let Some(origin) = &mut self.origin {
            origin.definitions = Some(DefinitionsOrigin { path, from_toml });
        }
        Ok(())
    }

    /// How an entry is named in errors about it.
    fn describe(&self, array: &str, i: usize) -> String {
        let named = match array {
            "users" => self.users.get(i).map(|u| format!("user '{}'", u.name)),
            "vhosts" => self.vhosts.get(i).map(|v| format!("vhost '{}'", v.name)),
            "permissions" => self
                .permissions
                .get(i)
                .map(|p| format!("permissions of user '{}' in vhost '{}'", p.user, p.vhost)),
            "topic_permissions" => self.topic_permissions.get(i).map(|p| {
                format!(
                    "topic permissions of user '{}' for exchange '{}' in vhost '{}'",
                    p.user, p.exchange, p.vhost
                )
            }),
            "policies" => self
                .policies
                .get(i)
                .map(|p| format!("policy '{}' in vhost '{}'", p.name, p.vhost)),
            "exchanges" => self
                .exchanges
                .get(i)
                .map(|x| format!("exchange '{}' in vhost '{}'", x.name, x.vhost)),
            "queues" => self
                .queues
                .get(i)
                .map(|q| format!("queue '{}' in vhost '{}'", q.name, q.vhost)),
            "bindings" => self.bindings.get(i).map(|b| {
                format!(
                    "binding of {} '{}' to exchange '{}' in vhost '{}'",
                    b.destination_type, b.destination, b.source, b.vhost
                )
            }),
            _ => None,
        };
        named.unwrap_or_else(|| format!("{array}[{i}]"))
    }

    /// The error for a problem validation found: at its line in the TOML file, or,
    /// for an entry that came from the definitions file, naming that file and the entry.
    fn refusal(&self, problem: Problem) -> ConfigError {
        let Some(origin) = &self.origin else {
            return ConfigError::Missing {
                path: "<configuration>".into(),
                reason: problem.reason,
            };
        };
        if let (Some(defs), Some((array, index))) = (&origin.definitions, problem.entry()) {
            if defs.holds(array, index) {
                // The reason without its TOML-style prefix ("queues: ", "users.NAME: "):
                // the entry's name says it.
                let user = self.users.get(index).map(|u| u.name.as_str()).unwrap_or("");
                let reason = problem
                    .reason
                    .strip_prefix(&format!("{array}: "))
                    .or_else(|| {
                        let prefix = format!("users.{user}: ");
                        (array == "users")
                            .then(|| problem.reason.strip_prefix(&prefix))
                            .flatten()
                    })
                    .unwrap_or(&problem.reason)
                    .to_string();
                return ConfigError::Entity {
                    path: defs.path.clone(),
                    what: self.describe(array, index),
                    reason,
                };
            }
        }
        match problem.line_in(&origin.text) {
            Some((line, column)) => ConfigError::Invalid {
                path: origin.path.clone(),
                line,
                column,
                reason: problem.reason,
            },
            None => ConfigError::Missing {
                path: origin.path.clone(),
                reason: problem.reason,
            },
        }
    }

    /// An error about the `index`th entry of a top-level array of tables
    /// (`exchanges`, `queues`, `bindings`), at that entry's line; for an entry of
    /// the definitions file, naming that file (`reason` names the entry).
    pub fn entry_error(&self, array: &'static str, index: usize, reason: String) -> ConfigError {
        let Some(origin) = &self.origin else {
            return ConfigError::Missing {
                path: "<configuration>".into(),
                reason,
            };
        };
        if let Some(defs) = origin
            .definitions
            .as_ref()
            .filter(|d| d.holds(array, index))
        {
            return ConfigError::Missing {
                path: defs.path.clone(),
                reason,
            };
        }
        let problem = Problem {
            at: vec![vec![Seg::Key(array), Seg::Index(index)]],
            reason,
        };
        match problem.line_in(&origin.text) {
            Some((line, column)) => ConfigError::Invalid {
                path: origin.path.clone(),
                line,
                column,
                reason: problem.reason,
            },
            None => ConfigError::Missing {
                path: origin.path.clone(),
                reason: problem.reason,
            },
        }
    }

    /// Runs start-up's checks on a configuration built in memory (the file's with
    /// what the management API added); the reason of the first failure.
    pub fn check(&self) -> Result<(), String> {
        self.validate().map_err(|p| p.reason)
    }

    fn validate(&self) -> Result<(), Problem> {
        use Seg::{Index, Key};
        let l = &self.limits;
        let limit = |key: &'static str, reason: String| Problem {
            at: vec![vec![Key("limits"), Key(key)]],
            reason: format!("limits.{key}: {reason}"),
        };
        for (table, tls_listen) in [
            (
                "management",
                self.management.as_ref().map(|m| &m.tls_listen),
            ),
            (
                "prometheus",
                self.prometheus.as_ref().map(|m| &m.tls_listen),
            ),
        ] {
            if tls_listen.is_some_and(|l| !l.is_empty()) && self.tls.is_none() {
                return Err(Problem {
                    at: vec![vec![Key(table), Key("tls_listen")]],
                    reason: format!(
                        "{table}.tls_listen: HTTPS needs a certificate, and there is no [tls] table"
                    ),
                });
            }
        }
        if let Some(m) = &self.management {
            if !(100..=3_600_000).contains(&m.collect_statistics_interval) {
                return Err(Problem {
                    at: vec![vec![Key("management"), Key("collect_statistics_interval")]],
                    reason: format!(
                        "management.collect_statistics_interval: {} is outside 100..=3600000 (milliseconds)",
                        m.collect_statistics_interval
                    ),
                });
            }
        }
        if self.listen.is_empty() {
            return Err(Problem {
                at: vec![vec![Key("listen")]],
                reason: "listen: at least one address is needed".into(),
            });
        }
        if !(FRAME_MAX_MIN..=FRAME_MAX_MAX).contains(&l.frame_max) {
            return Err(limit(
                "frame_max",
                format!(
                    "{} is outside {FRAME_MAX_MIN}..={FRAME_MAX_MAX} (the AMQP minimum to 16 MiB)",
                    l.frame_max
                ),
            ));
        }
        if l.channel_max == 0 {
            return Err(limit("channel_max", "must be at least 1".into()));
        }
        for (key, secs) in [
            ("handshake_timeout", l.handshake_timeout),
            ("frame_timeout", l.frame_timeout),
        ] {
            if !(1..=TIMEOUT_MAX_SECS).contains(&secs) {
                return Err(limit(
                    key,
                    format!("{secs} s is outside 1..={TIMEOUT_MAX_SECS} s"),
                ));
            }
        }
        if !(1..=MAX_MESSAGE_SIZE_MAX).contains(&l.max_message_size) {
            return Err(limit(
                "max_message_size",
                format!(
                    "{} is outside 1..={MAX_MESSAGE_SIZE_MAX} bytes (512 MiB, as in RabbitMQ)",
                    l.max_message_size
                ),
            ));
        }
        if !(SEGMENT_SIZE_MIN..=SEGMENT_SIZE_MAX).contains(&l.segment_size) {
            return Err(limit(
                "segment_size",
                format!(
                    "{} is outside {SEGMENT_SIZE_MIN}..={SEGMENT_SIZE_MAX} bytes (64 KiB to 1 GiB)",
                    l.segment_size
                ),
            ));
        }
        if l.memory_high_watermark < MIB {
            return Err(limit(
                "memory_high_watermark",
                format!(
                    "{} is below the minimum of {MIB} bytes",
                    l.memory_high_watermark
                ),
            ));
        }
        if !(l.memory_high_watermark_relative > 0.0 && l.memory_high_watermark_relative <= 1.0) {
            return Err(limit(
                "memory_high_watermark_relative",
                format!(
                    "{} is outside (0, 1] (a share of the memory the process may use)",
                    l.memory_high_watermark_relative
                ),
            ));
        }
        if l.queue_memory_budget > l.memory_high_watermark {
            return Err(Problem {
                // Either key may be the one that was set; name whichever the file has.
                at: vec![
                    vec![Key("limits"), Key("queue_memory_budget")],
                    vec![Key("limits"), Key("memory_high_watermark")],
                ],
                reason: format!(
                    "limits.queue_memory_budget: {} is above limits.memory_high_watermark ({})",
                    l.queue_memory_budget, l.memory_high_watermark
                ),
            });
        }
        if !(1..=HEADER_DEPTH_MAX).contains(&l.max_header_depth) {
            return Err(limit(
                "max_header_depth",
                format!("{} is outside 1..={HEADER_DEPTH_MAX}", l.max_header_depth),
            ));
        }
        if l.max_table_fields == 0 {
            return Err(limit("max_table_fields", "must be at least 1".into()));
        }
        if self.vhosts.is_empty() {
            return Err(Problem {
                at: vec![vec![Key("vhosts")]],
                reason: "vhosts: at least one vhost is needed".into(),
            });
        }
        let known = |v: &str| self.vhosts.iter().any(|h| h.name == v);
        let entries = self
            .exchanges
            .iter()
            .map(|x| ("exchanges", &x.vhost, &x.arguments))
            .enumerate()
            .chain(
                self.queues
                    .iter()
                    .map(|q| ("queues", &q.vhost, &q.arguments))
                    .enumerate(),
            )
            .chain(
                self.bindings
                    .iter()
                    .map(|b| ("bindings", &b.vhost, &b.arguments))
                    .enumerate(),
            );
        for (i, (array, vhost, arguments)) in entries {
            let at = |key: &'static str| {
                vec![
                    vec![Key(array), Index(i), Key(key)],
                    vec![Key(array), Index(i)],
                ]
            };
            if !known(vhost) {
                return Err(Problem {
                    at: at("vhost"),
                    reason: format!("{array}: unknown vhost '{vhost}'"),
                });
            }
            if let Err(why) = field_table(arguments) {
                return Err(Problem {
                    at: at("arguments"),
                    reason: format!("{array}: arguments: {why}"),
                });
            }
        }
        for (i, p) in self.permissions.iter().enumerate() {
            let at = |key: &'static str| {
                vec![
                    vec![Key("permissions"), Index(i), Key(key)],
                    vec![Key("permissions"), Index(i)],
                ]
            };
            if !self.users.iter().any(|u| u.name == p.user) {
                return Err(Problem {
                    at: at("user"),
                    reason: format!("permissions: unknown user '{}'", p.user),
                });
            }
            if !known(&p.vhost) {
                return Err(Problem {
                    at: at("vhost"),
                    reason: format!("permissions: unknown vhost '{}'", p.vhost),
                });
            }
            for (key, re) in [
                ("configure", &p.configure),
                ("write", &p.write),
                ("read", &p.read),
            ] {
                if let Err(e) = regex::Regex::new(re) {
                    return Err(Problem {
                        at: at(key),
                        reason: format!("permissions: {key}: not a regular expression: {e}"),
                    });
                }
            }
        }
        for (i, p) in self.topic_permissions.iter().enumerate() {
            let at = |key: &'static str| {
                vec![
                    vec![Key("topic_permissions"), Index(i), Key(key)],
                    vec![Key("topic_permissions"), Index(i)],
                ]
            };
            if !self.users.iter().any(|u| u.name == p.user) {
                return Err(Problem {
                    at: at("user"),
                    reason: format!("topic_permissions: unknown user '{}'", p.user),
                });
            }
            if !known(&p.vhost) {
                return Err(Problem {
                    at: at("vhost"),
                    reason: format!("topic_permissions: unknown vhost '{}'", p.vhost),
                });
            }
            for (key, re) in [("write", &p.write), ("read", &p.read)] {
                // Checked as it will run: with the user and vhost put in.
                let re = re
                    .replace("{username}", &p.user)
                    .replace("{vhost}", &p.vhost);
                if let Err(e) = regex::Regex::new(&re) {
                    return Err(Problem {
                        at: at(key),
                        reason: format!("topic_permissions: {key}: not a regular expression: {e}"),
                    });
                }
            }
        }
        for (i, p) in self.policies.iter().enumerate() {
            let at = |key: &'static str| {
                vec![
                    vec![Key("policies"), Index(i), Key(key)],
                    vec![Key("policies"), Index(i)],
                ]
            };
            if !known(&p.vhost) {
                return Err(Problem {
                    at: at("vhost"),
                    reason: format!("policies: '{}': unknown vhost '{}'", p.name, p.vhost),
                });
            }
            if let Err(why) = crate::model::policy::Policy::from_config(p) {
                let key = why.split(':').next().unwrap_or("");
                let key = ["pattern", "apply-to", "definition"]
                    .into_iter()
                    .find(|k| *k == key)
                    .unwrap_or("definition");
                return Err(Problem {
                    at: at(key),
                    reason: format!("policies: '{}': {why}", p.name),
                });
            }
        }
        for (i, b) in self.bindings.iter().enumerate() {
            if !matches!(b.destination_type.as_str(), "queue" | "exchange") {
                return Err(Problem {
                    at: vec![
                        vec![Key("bindings"), Index(i), Key("destination_type")],
                        vec![Key("bindings"), Index(i)],
                    ],
                    reason: format!(
                        "bindings: destination_type '{}' is neither 'queue' nor 'exchange'",
                        b.destination_type
                    ),
                });
            }
        }
        for (i, u) in self.users.iter().enumerate() {
            let at = |key: &'static str| {
                vec![
                    vec![Key("users"), Index(i), Key(key)],
                    vec![Key("users"), Index(i)],
                ]
            };
            match (&u.password, &u.password_hash) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(Problem {
                        at: at("password_hash"),
                        reason: format!(
                            "users.{}: give either password or password_hash, not {}",
                            u.name,
                            if u.password.is_some() {
                                "both"
                            } else {
                                "neither"
                            }
                        ),
                    })
                }
                // "" = no password at all, as RabbitMQ's cleared passwords: such a
                // user logs in only with a client certificate (EXTERNAL).
                (None, Some(hash)) if hash.is_empty() => {}
                (None, Some(hash)) => {
                    if let Err(why) = crate::auth::Credential::hashed(hash, &u.hashing_algorithm) {
                        return Err(Problem {
                            at: at("password_hash"),
                            reason: format!("users.{}: {why}", u.name),
                        });
                    }
                }
                (Some(_), None) => {}
            }
            for v in &u.vhosts {
                if !self.vhosts.iter().any(|h| &h.name == v) {
                    return Err(Problem {
                        at: vec![
                            vec![Key("users"), Index(i), Key("vhosts")],
                            vec![Key("users"), Index(i)],
                        ],
                        reason: format!("users.{}: unknown vhost '{}'", u.name, v),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Adds `theirs` (from the definitions file at `path`) after `ours` (from the TOML
/// file): an entity both have must be equal, and is then kept once.
fn join<T: PartialEq>(
    origin: Option<&Origin>,
    path: &str,
    array: &'static str,
    ours: &mut Vec<T>,
    theirs: Vec<T>,
    same_entity: impl Fn(&T, &T) -> bool,
    describe: impl Fn(&T) -> String,
) -> Result<(), ConfigError> {
    let toml_len = ours.len();
    for entry in theirs {
        match ours[..toml_len].iter().position(|o| same_entity(o, &entry)) {
            Some(i) if ours[i] == entry => {}
            Some(i) => {
                let reason = format!(
                    "{} is also in {path}, with other properties: keep one of the two",
                    describe(&entry)
                );
                let toml_path = origin.map_or("<configuration>", |o| o.path.as_str());
                let problem = Problem {
                    at: vec![vec![Seg::Key(array), Seg::Index(i)]],
                    reason,
                };
                return Err(match origin.and_then(|o| problem.line_in(&o.text)) {
                    Some((line, column)) => ConfigError::Invalid {
                        path: toml_path.to_string(),
                        line,
                        column,
                        reason: problem.reason,
                    },
                    None => ConfigError::Missing {
                        path: toml_path.to_string(),
                        reason: problem.reason,
                    },
                });
            }
            None => ours.push(entry),
        }
    }
    Ok(())
}

/// A TOML table as AMQP arguments: integers become longs, strings long strings,
/// booleans, floats (doubles), arrays and nested tables keep their shape. Dates
/// have no AMQP counterpart here and are refused.
pub fn field_table(t: &toml::Table) -> Result<amq_protocol::types::FieldTable, String> {
    use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
    // Recursive, but only as deep as any table a client may send (the file is the
    // operator's, and the limit keeps it far from the stack's).
    fn value(v: &toml::Value, depth: usize) -> Result<AMQPValue, String> {
        if depth > HEADER_DEPTH_MAX as usize {
            return Err(format!("nested deeper than {HEADER_DEPTH_MAX} levels"));
        }
        Ok(match v {
            toml::Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
            toml::Value::Integer(n) => AMQPValue::LongLongInt(*n),
            toml::Value::Float(f) => AMQPValue::Double(*f),
            toml::Value::Boolean(b) => AMQPValue::Boolean(*b),
            toml::Value::Array(a) => {
                let mut out = FieldArray::default();
                for v in a {
                    out.push(value(v, depth + 1)?);
                }
                AMQPValue::FieldArray(out)
            }
            toml::Value::Table(t) => AMQPValue::FieldTable(table(t, depth + 1)?),
            toml::Value::Datetime(d) => {
                return Err(format!("{d}: a date has no AMQP argument type here"))
            }
        })
    }
    fn table(t: &toml::Table, depth: usize) -> Result<FieldTable, String> {
        let mut out = FieldTable::default();
        for (k, v) in t {
            let key = ShortString::try_new(k.clone())
                .map_err(|_| format!("key '{k}' is longer than 255 bytes"))?;
            out.insert(key, value(v, depth)?);
        }
        Ok(out)
    }
    table(t, 1)
}

/// One step of the way to a key: a table key or an array index.
enum Seg {
    Key(&'static str),
    Index(usize),
}

/// Why validation refused a parsed file, and the keys that caused it, best first.
struct Problem {
    at: Vec<Vec<Seg>>,
    reason: String,
}

impl Problem {
    /// The entry of a top-level array the problem is about, if it is about one.
    fn entry(&self) -> Option<(&'static str, usize)> {
        match self.at.first()?.as_slice() {
            [Seg::Key(array), Seg::Index(i), ..] => Some((*array, *i)),
            _ => None,
        }
    }

    /// The line and column of the first of its keys that the file has. The text is
    /// parsed again with toml's own parser, keeping spans, so `[limits]` tables,
    /// dotted keys and inline tables all resolve to where the key is written.
    fn line_in(&self, text: &str) -> Option<(usize, usize)> {
        let doc = toml_edit::ImDocument::parse(text).ok()?;
        self.at
            .iter()
            .find_map(|path| locate(doc.as_item(), path))
            .map(|offset| position(text, offset))
    }
}

/// The byte offset of the key at `path` (of the value, when the last step is an index).
fn locate(root: &toml_edit::Item, path: &[Seg]) -> Option<usize> {
    let mut item = root;
    let mut offset = None;
    for seg in path {
        match seg {
            Seg::Key(k) => {
                let (key, value) = item.as_table_like()?.get_key_value(k)?;
                offset = key.span().or_else(|| value.span()).map(|s| s.start);
                item = value;
            }
            Seg::Index(i) => {
                item = item.get(*i)?;
                offset = item.span().map(|s| s.start).or(offset);
            }
        }
    }
    offset
}

/// The 1-based line and column (in characters) of a byte offset.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before[before.rfind('\n').map_or(0, |i| i + 1)..]
        .chars()
        .count()
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses() {
        let c = Config::default();
        assert_eq!(c.listen[0].port(), 5672);
        assert_eq!(c.limits.frame_max, 131072);
        assert_eq!(c.users[0].name, "guest");
    }

    #[test]
    fn bad_file_names_line_and_reason() {
        let text = "listen = [\"0.0.0.0:5672\"]\ndata_dir = \"x\"\n[limits]\nframe_max = \"big\"\n";
        let err = Config::parse(text, "my.toml").unwrap_err().to_string();
        assert!(err.starts_with("my.toml:4:"), "{err}");
    }

    const HEAD: &str = "listen = [\"0.0.0.0:5672\"]\ndata_dir = \"x\"\n[[vhosts]]\nname = \"/\"\n";

    /// `HEAD` (4 lines), then `[limits]` on line 5 and `body` from line 6.
    fn with_limits(body: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!("{HEAD}[limits]\n{body}"), "c.toml")
    }

    fn refusal(body: &str) -> String {
        match with_limits(body) {
            Ok(_) => panic!("accepted: {body}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn huge_handshake_timeout_is_refused_at_its_line() {
        // i64::MAX is the largest integer TOML has; as seconds it overflowed the
        // handshake deadline of every connection.
        let err = refusal("channel_max = 10\nhandshake_timeout = 9223372036854775807\n");
        assert!(
            err.starts_with("c.toml:7:1: limits.handshake_timeout:"),
            "{err}"
        );
        let err = refusal("handshake_timeout = 18446744073709551615\n");
        assert!(err.starts_with("c.toml:6:"), "{err}");
    }

    #[test]
    fn huge_frame_max_is_refused_at_its_line() {
        let err = refusal("frame_max = 4294967295\n");
        assert!(err.starts_with("c.toml:6:1: limits.frame_max:"), "{err}");
    }

    #[test]
    fn every_bounded_limit_names_its_line() {
        for (key, value) in [
            ("frame_max", "4095"),
            ("frame_max", "16777217"),
            ("channel_max", "0"),
            ("handshake_timeout", "0"),
            ("handshake_timeout", "3601"),
            ("frame_timeout", "0"),
            ("frame_timeout", "3601"),
            ("max_message_size", "0"),
            ("max_message_size", "536870913"),
            ("memory_high_watermark", "1048575"),
            ("queue_memory_budget", "1073741825"),
            ("segment_size", "65535"),
            ("segment_size", "1073741825"),
            ("max_header_depth", "0"),
            ("max_header_depth", "129"),
            ("max_table_fields", "0"),
        ] {
            let err = refusal(&format!("heartbeat = 5\n\n{key} = {value}\n"));
            assert!(
                err.starts_with(&format!("c.toml:8:1: limits.{key}: ")),
                "{key} = {value}: {err}"
            );
        }
    }

    #[test]
    fn heartbeat_beyond_u16_is_refused_at_its_line() {
        let err = refusal("heartbeat = 65536\n");
        assert!(err.starts_with("c.toml:6:"), "{err}");
    }

    #[test]
    fn bounds_themselves_are_accepted() {
        let c = with_limits(
            "frame_max = 16777216\nhandshake_timeout = 3600\nframe_timeout = 1\n\
             max_message_size = 536870912\nmemory_high_watermark = 1048576\n\
             queue_memory_budget = 1048576\nmax_header_depth = 128\nmax_table_fields = 1\n",
        )
        .unwrap();
        assert_eq!(c.limits.frame_max, 16 * 1024 * 1024);
        assert!(with_limits("frame_max = 4096\nqueue_memory_budget = 0\n").is_ok());
    }

    #[test]
    fn inline_and_dotted_limits_are_located() {
        let top = "listen = [\"0.0.0.0:5672\"]\ndata_dir = \"x\"\n";
        let vhosts = "[[vhosts]]\nname = \"/\"\n";
        let text = format!("{top}\nlimits = {{ heartbeat = 1, frame_max = 1 }}\n{vhosts}");
        let err = Config::parse(&text, "c.toml").unwrap_err().to_string();
        // The column is the key's, inside the inline table.
        assert!(err.starts_with("c.toml:4:27: limits.frame_max:"), "{err}");
        let text = format!("{top}limits.heartbeat = 1\nlimits.frame_max = 1\n{vhosts}");
        let err = Config::parse(&text, "c.toml").unwrap_err().to_string();
        assert!(err.starts_with("c.toml:4:8: limits.frame_max:"), "{err}");
    }

    #[test]
    fn budget_above_watermark_names_whichever_key_is_set() {
        let err = refusal("memory_high_watermark = 2097152\n");
        assert!(
            err.starts_with("c.toml:6:1: limits.queue_memory_budget:"),
            "{err}"
        );
        let err = refusal("memory_high_watermark = 2097152\nqueue_memory_budget = 2097153\n");
        assert!(
            err.starts_with("c.toml:7:1: limits.queue_memory_budget:"),
            "{err}"
        );
    }

    #[test]
    fn other_validation_errors_name_their_line() {
        let text = "listen = []\ndata_dir = \"x\"\n[[vhosts]]\nname = \"/\"\n";
        let err = Config::parse(text, "c.toml").unwrap_err().to_string();
        assert!(err.starts_with("c.toml:1:1: listen:"), "{err}");
        let text =
            format!("{HEAD}[[users]]\nname = \"u\"\npassword = \"p\"\nvhosts = [\"nope\"]\n");
        let err = Config::parse(&text, "c.toml").unwrap_err().to_string();
        assert!(
            err.starts_with("c.toml:8:1: users.u: unknown vhost"),
            "{err}"
        );
        // Nothing to point at when the file leaves the key out.
        let text = "listen = [\"0.0.0.0:5672\"]\ndata_dir = \"x\"\n";
        let err = Config::parse(text, "c.toml").unwrap_err().to_string();
        assert_eq!(err, "c.toml: vhosts: at least one vhost is needed");
    }

    #[test]
    fn new_limits_have_defaults_and_parse() {
        let d = Config::default().limits;
        assert_eq!(d.max_connections, 65536);
        assert_eq!(d.max_connections_per_user, 0);
        assert_eq!(d.max_consumers_per_channel, 65535);
        assert_eq!(
            (
                d.max_queues_per_vhost,
                d.max_exchanges_per_vhost,
                d.max_bindings_per_exchange
            ),
            (0, 0, 0)
        );
        assert_eq!((d.max_header_depth, d.max_table_fields), (32, 4096));
        assert_eq!(d.frame_timeout, 60);
        // The file's values are the built-in defaults, so a copied file changes nothing.
        let l = Limits::default();
        assert_eq!(format!("{d:?}"), format!("{l:?}"));
        let c = with_limits(
            "max_connections = 3\nmax_connections_per_user = 2\nmax_consumers_per_channel = 1\n\
             max_queues_per_vhost = 4\nmax_exchanges_per_vhost = 5\nmax_bindings_per_exchange = 6\n\
             max_header_depth = 7\nmax_table_fields = 8\nframe_timeout = 9\n",
        )
        .unwrap()
        .limits;
        assert_eq!(
            [
                c.max_connections,
                c.max_connections_per_user,
                c.max_consumers_per_channel,
                c.max_queues_per_vhost,
                c.max_exchanges_per_vhost,
                c.max_bindings_per_exchange,
                c.max_header_depth,
                c.max_table_fields,
            ],
            [3, 2, 1, 4, 5, 6, 7, 8]
        );
        assert_eq!(c.frame_timeout, 9);
    }

    #[test]
    fn unknown_key_is_rejected() {
        let text =
            "listen = [\"0.0.0.0:5672\"]\ndata_dir = \"x\"\nlisen = 1\n[[vhosts]]\nname=\"/\"\n";
        let err = Config::parse(text, "c.toml").unwrap_err().to_string();
        assert!(err.contains("c.toml:3:"), "{err}");
        assert!(err.contains("lisen"), "{err}");
    }
}
