//! `warrenmqctl`: the everyday verbs of rabbitmqctl and the health checks of
//! rabbitmq-diagnostics, over the broker's management HTTP API (RabbitMQ 3.10's
//! paths, basic auth, JSON), so that it works against WarrenMQ and RabbitMQ alike
//! and needs nothing but the API's address and a user.
//!
//! Output follows rabbitmqctl: informational lines ("Listing queues for vhost / ...")
//! unless `-q`, then a header line and tab-separated rows (`--formatter table`);
//! `--formatter tsv` prints the rows alone, `--formatter json` the API's JSON.
//!
//! Exit codes are the BSD sysexits codes that RabbitMQ's CLI tools use
//! (RabbitMQ.CLI.Core.ExitCodes, deps/rabbitmq_cli/lib/rabbitmq/cli/core/exit_codes.ex),
//! checked against rabbitmqctl and rabbitmq-diagnostics 3.10.8:
//!
//! | code | name           | here                                                       | RabbitMQ's tools                          |
//! |------|----------------|------------------------------------------------------------|-------------------------------------------|
//! | 0    | EX_OK          | done; a health check passed                                | same                                      |
//! | 64   | EX_USAGE       | bad command line: unknown command, option or column        | same (`list_queues nosuchkey` exits 64)   |
//! | 65   | EX_DATAERR     | the API refused the request (400) or what it names is not there (404): queue, exchange, vhost, connection | `not_found`, `no_such_vhost`, bad arguments exit 65 |
//! | 67   | EX_NOUSER      | the user named does not exist                              | `no_such_user` (`delete_user nosuch` exits 67) |
//! | 69   | EX_UNAVAILABLE | the broker cannot be reached; a health check failed (the API's 503); the broker does not support the request (405) or failed (5xx) | node unreachable and failed checks exit 69 (`rabbitmq-diagnostics check_port_listener 1`) |
//! | 70   | EX_SOFTWARE    | the answer is not HTTP or JSON as expected, or is too large; a local file cannot be written | an exception in a command exits 70 |
//! | 75   | EX_TEMPFAIL    | connected, but no answer within `--timeout`                | timeouts exit 75                          |
//! | 77   | EX_NOPERM      | the API refused the credentials or the user's rights (401, 403) | no equivalent: rabbitmqctl authenticates with the Erlang cookie, and a wrong cookie shows as an unreachable node (69). 77 is sysexits' code for it, so that a probe tells bad credentials from a down broker |

#[path = "warrenmqctl/http.rs"]
mod http;
#[path = "warrenmqctl/output.rs"]
mod output;

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Parser, Subcommand};
use serde_json::{json, Map, Value};

use output::{Formatter, Listing};

const EXIT_CODES: &str = "\
Exit codes (sysexits, as RabbitMQ's CLI tools): 0 done or check passed; 64 bad command line; \
65 refused request or no such object; 67 no such user; 69 broker unreachable, check failed \
or request not supported; 70 unexpected answer; 75 timed out; 77 credentials or rights refused.";

#[derive(Parser)]
#[command(
    name = "warrenmqctl",
    version,
    about = "rabbitmqctl's and rabbitmq-diagnostics' everyday commands over the management HTTP API \
             of WarrenMQ (or RabbitMQ)",
    after_help = EXIT_CODES
)]
struct Cli {
    /// The management API's address. Plain http:// only: https would need a TLS client,
    /// which this tool does not have.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "WARRENMQCTL_URL",
        default_value = "http://127.0.0.1:15672",
        value_name = "URL"
    )]
    url: String,
    /// The API user.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "WARRENMQCTL_USER",
        default_value = "guest",
        value_name = "NAME"
    )]
    user: String,
    /// The API user's password; prefer the environment variable, which other users
    /// cannot read from the process list.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "WARRENMQCTL_PASSWORD",
        default_value = "guest",
        hide_env_values = true,
        hide_default_value = true,
        value_name = "PASSWORD"
    )]
    password: String,
    /// The virtual host of commands that work in one.
    #[arg(
        short = 'p',
        long,
        global = true,
        help_heading = "Global options",
        default_value = "/",
        value_name = "VHOST"
    )]
    vhost: String,
    /// No informational messages.
    #[arg(short = 'q', long, global = true, help_heading = "Global options")]
    quiet: bool,
    /// No informational messages and no table header line.
    #[arg(short = 's', long, global = true, help_heading = "Global options")]
    silent: bool,
    /// No table header line.
    #[arg(long, global = true, help_heading = "Global options")]
    no_table_headers: bool,
    /// Seconds to wait for each answer of the API, connecting included.
    #[arg(
        short = 't',
        long,
        global = true,
        help_heading = "Global options",
        default_value_t = 10,
        value_name = "SECS",
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    timeout: u64,
    /// Output format.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_enum,
        default_value = "table"
    )]
    formatter: Formatter,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[command(rename_all = "snake_case")]
enum Command {
    /// The broker's product, version, uptime, alarms, memory, totals and listeners
    /// (GET /api/overview and /api/nodes).
    Status,
    /// Queues of the vhost [default columns: name messages].
    ListQueues {
        /// Columns to show (see the error of an unknown one for the list).
        columns: Vec<String>,
    },
    /// Exchanges of the vhost [name type].
    ListExchanges { columns: Vec<String> },
    /// Bindings of the vhost [source_name source_kind destination_name destination_kind
    /// routing_key arguments].
    ListBindings { columns: Vec<String> },
    /// Client connections, all vhosts [user peer_host peer_port state].
    ListConnections { columns: Vec<String> },
    /// Channels, all vhosts [name user consumer_count messages_unacknowledged].
    ListChannels { columns: Vec<String> },
    /// Consumers of the vhost [queue_name channel consumer_tag ack_required
    /// prefetch_count active arguments].
    ListConsumers { columns: Vec<String> },
    /// Users [user tags].
    ListUsers { columns: Vec<String> },
    /// Virtual hosts [name].
    ListVhosts { columns: Vec<String> },
    /// Users' permissions in the vhost [user configure write read].
    ListPermissions { columns: Vec<String> },
    /// Policies of the vhost [vhost name pattern apply-to definition priority].
    ListPolicies { columns: Vec<String> },
    /// Removes every ready message of a queue.
    PurgeQueue { name: String },
    /// Deletes a queue.
    DeleteQueue {
        name: String,
        /// Only if it has no messages.
        #[arg(short = 'e', long = "if-empty")]
        if_empty: bool,
        /// Only if it has no consumers.
        #[arg(short = 'u', long = "if-unused")]
        if_unused: bool,
    },
    /// Closes a client connection (its name as list_connections name shows it); the
    /// client gets CONNECTION_FORCED (320) with the reason.
    CloseConnection {
        name: String,
        #[arg(allow_hyphen_values = true)]
        reason: String,
    },
    /// Closes the connections of the vhost (or of every vhost with --global).
    CloseAllConnections {
        #[arg(allow_hyphen_values = true)]
        reason: String,
        /// Connections of every vhost.
        #[arg(long)]
        global: bool,
        /// Close at most this many.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Milliseconds to wait between two closures.
        #[arg(long = "per-connection-delay", value_name = "MS")]
        per_connection_delay: Option<u64>,
    },
    /// Writes the broker's definitions (GET /api/definitions) as JSON to FILE, or to
    /// standard output for "-".
    ExportDefinitions { file: String },
    /// Imports definitions (a RabbitMQ or WarrenMQ export, JSON) from FILE, or from
    /// standard input without one, into the running broker (POST /api/definitions).
    ImportDefinitions { file: Option<String> },
    /// Declares a queue (PUT /api/queues/VHOST/NAME).
    DeclareQueue {
        name: String,
        #[arg(long, default_value_t = true, action = ArgAction::Set, value_name = "BOOL")]
        durable: bool,
        #[arg(long = "auto-delete")]
        auto_delete: bool,
        /// x-queue-type: classic or quorum.
        #[arg(long = "type", value_name = "TYPE")]
        queue_type: Option<String>,
        /// Queue arguments as a JSON object, e.g. '{"x-max-length": 1000}'.
        #[arg(long, value_name = "JSON")]
        arguments: Option<String>,
    },
    /// Declares an exchange of TYPE: direct, fanout, topic or headers.
    DeclareExchange {
        name: String,
        #[arg(value_name = "TYPE")]
        kind: String,
        #[arg(long, default_value_t = true, action = ArgAction::Set, value_name = "BOOL")]
        durable: bool,
        #[arg(long = "auto-delete")]
        auto_delete: bool,
        #[arg(long)]
        internal: bool,
        /// Exchange arguments as a JSON object.
        #[arg(long, value_name = "JSON")]
        arguments: Option<String>,
    },
    /// Publishes a message ("" or amq.default is the default exchange); without
    /// PAYLOAD, or with "-", the payload is read from standard input.
    Publish {
        exchange: String,
        routing_key: String,
        #[arg(allow_hyphen_values = true)]
        payload: Option<String>,
        /// Message properties as a JSON object, e.g. '{"delivery_mode": 2}'.
        #[arg(long, value_name = "JSON")]
        properties: Option<String>,
    },
    /// Gets messages from a queue [routing_key exchange message_count payload
    /// payload_bytes payload_encoding redelivered].
    Get {
        queue: String,
        columns: Vec<String>,
        #[arg(long, default_value_t = 1, value_name = "N")]
        count: u32,
        /// What happens to the messages got: ack_requeue_true leaves them in the queue.
        #[arg(long, value_enum, default_value = "ack_requeue_true")]
        ackmode: AckMode,
        /// Payload encoding: auto (text when it is UTF-8) or base64.
        #[arg(long, default_value = "auto", value_parser = ["auto", "base64"])]
        encoding: String,
        /// Show at most this many bytes of each payload.
        #[arg(long, value_name = "BYTES")]
        truncate: Option<u64>,
    },
    /// Health check: the API answers and accepts the credentials.
    Ping,
    /// Health check: the broker is running.
    CheckRunning,
    /// Health check: no resource alarm (memory, disk) is in effect.
    CheckLocalAlarms,
    /// Health check: a TCP connection opens to every listener's port.
    CheckPortConnectivity,
    /// Health check: every virtual host is running.
    CheckVirtualHosts,
    /// Health check: a listener is active on PORT.
    CheckPortListener { port: u16 },
    /// Health check: a listener is active for PROTOCOL (amqp, amqp/ssl, http, ...).
    CheckProtocolListener { protocol: String },
    /// Adds a user (PUT /api/users/NAME); without PASSWORD it is read from standard input.
    AddUser {
        name: String,
        // Ids apart from the global --user and --password, which they would replace.
        #[arg(id = "new_password", value_name = "PASSWORD")]
        password: Option<String>,
        /// Comma-separated tags, e.g. administrator or monitoring.
        #[arg(long, default_value = "")]
        tags: String,
    },
    /// Deletes a user.
    DeleteUser { name: String },
    /// Changes a user's password; without PASSWORD it is read from standard input.
    ChangePassword {
        name: String,
        #[arg(id = "new_password", value_name = "PASSWORD")]
        password: Option<String>,
    },
    /// Replaces a user's tags (none clears them).
    SetUserTags { name: String, tags: Vec<String> },
    /// Sets a user's permissions in the vhost (regular expressions).
    SetPermissions {
        #[arg(id = "username", value_name = "USER")]
        user: String,
        #[arg(allow_hyphen_values = true)]
        configure: String,
        #[arg(allow_hyphen_values = true)]
        write: String,
        #[arg(allow_hyphen_values = true)]
        read: String,
    },
    /// Removes a user's permissions in the vhost.
    ClearPermissions {
        #[arg(id = "username", value_name = "USER")]
        user: String,
    },
    /// Adds a virtual host.
    AddVhost {
        name: String,
        #[arg(long)]
        description: Option<String>,
        /// Comma-separated tags.
        #[arg(long)]
        tags: Option<String>,
        #[arg(long = "default-queue-type", value_name = "TYPE")]
        default_queue_type: Option<String>,
    },
    /// Deletes a virtual host and everything in it.
    DeleteVhost { name: String },
    /// Sets a policy in the vhost: DEFINITION is a JSON object, e.g. '{"max-length": 1000}'.
    SetPolicy {
        name: String,
        #[arg(allow_hyphen_values = true)]
        pattern: String,
        definition: String,
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i64,
        /// queues, exchanges or all.
        #[arg(long = "apply-to", default_value = "all", value_parser = ["queues", "exchanges", "all"])]
        apply_to: String,
    },
    /// Removes a policy from the vhost.
    ClearPolicy { name: String },
}

#[derive(Clone, Copy, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
enum AckMode {
    AckRequeueTrue,
    AckRequeueFalse,
    RejectRequeueTrue,
    RejectRequeueFalse,
}

impl AckMode {
    fn name(self) -> &'static str {
        match self {
            AckMode::AckRequeueTrue => "ack_requeue_true",
            AckMode::AckRequeueFalse => "ack_requeue_false",
            AckMode::RejectRequeueTrue => "reject_requeue_true",
            AckMode::RejectRequeueFalse => "reject_requeue_false",
        }
    }
}

/// Why a command failed, as its exit code and message (see the table above).
#[derive(Debug)]
enum Failure {
    Usage(String),
    Data(String),
    NoUser(String),
    Unavailable(String),
    Software(String),
    TempFail(String),
    NoPerm(String),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 64,
            Failure::Data(_) => 65,
            Failure::NoUser(_) => 67,
            Failure::Unavailable(_) => 69,
            Failure::Software(_) => 70,
            Failure::TempFail(_) => 75,
            Failure::NoPerm(_) => 77,
        }
    }

    fn message(&self) -> &str {
        match self {
            Failure::Usage(m)
            | Failure::Data(m)
            | Failure::NoUser(m)
            | Failure::Unavailable(m)
            | Failure::Software(m)
            | Failure::TempFail(m)
            | Failure::NoPerm(m) => m,
        }
    }
}

type Done = Result<(), Failure>;

/// Users, vhosts, permissions and policies change through the API in RabbitMQ; a
/// broker that refuses the request is most likely WarrenMQ, which reads them from
/// its configuration file.
const ADMIN_HINT: &str = "WarrenMQ takes users, permissions, policies and vhosts from its \
configuration file: edit it and send the broker SIGHUP (a new vhost needs a restart)";

/// An answer of the API.
struct Reply {
    status: u16,
    phrase: String,
    /// The body as JSON (Null when empty, or not JSON in an error answer).
    body: Value,
    /// The body as text, for an error answer that is not JSON.
    text: String,
}

impl Reply {
    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The API's reason for a refusal: `reason` (or `error`) of its JSON body, or the
    /// status line.
    fn reason(&self) -> String {
        let field = |k: &str| match self.body.get(k) {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(v) if !v.is_null() && !v.is_string() => Some(v.to_string()),
            _ => None,
        };
        if let Some(r) = field("reason").or_else(|| field("error")) {
            return r;
        }
        let text = self.text.trim();
        if !text.is_empty() && !text.starts_with('<') && text.len() <= 300 {
            return text.to_string();
        }
        format!("{} {}", self.status, self.phrase)
    }
}

struct Ctl {
    client: http::Client,
    url: String,
    user: String,
    vhost: String,
    formatter: Formatter,
    /// Informational messages.
    chatty: bool,
    /// The table's header line.
    header: bool,
    /// Result lines (all but silent and json).
    results: bool,
}

/// Writes a line to standard output; a closed pipe (`| head`) ends the program
/// quietly, another failure with EX_SOFTWARE.
fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{text}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("Error: cannot write to standard output: {e}");
        std::process::exit(70);
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// A JSON object given on the command line.
fn json_object(what: &str, text: Option<&str>) -> Result<Map<String, Value>, Failure> {
    let Some(text) = text else {
        return Ok(Map::new());
    };
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Failure::Data(format!(
            "{what} must be a JSON object, e.g. '{{\"key\": 1}}'"
        ))),
        Err(e) => Err(Failure::Data(format!("{what} is not JSON: {e}"))),
    }
}

/// A password given as an argument, or the first line of standard input.
fn password_from(arg: Option<String>) -> Result<String, Failure> {
    if let Some(p) = arg {
        return Ok(p);
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| Failure::Data(format!("cannot read the password from standard input: {e}")))?;
    let p = line.trim_end_matches(['\n', '\r']).to_string();
    if p.is_empty() {
        return Err(Failure::Data(
            "no password: give it as an argument or on standard input".into(),
        ));
    }
    Ok(p)
}

/// A user's tags from the API, which sends a list (or, in older versions, a
/// comma-separated string).
fn tags_of(user: &Value) -> String {
    match user.get("tags") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(","),
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    }
}

fn enc(segment: &str) -> String {
    http::encode(segment)
}

impl Ctl {
    fn info(&self, text: &str) {
        if self.chatty {
            say(text);
        }
    }

    fn result(&self, text: &str) {
        if self.results {
            say(text);
        }
    }

    /// One request; failures here are the transport's (no connection, timeout,
    /// not HTTP, not JSON).
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, Failure> {
        let raw = body.map(|b| b.to_string().into_bytes());
        let r = self
            .client
            .send(method, path, raw.as_deref(), headers)
            .map_err(|e| match e {
                http::Error::Connect(reason) => {
                    Failure::Unavailable(format!("unable to connect to {}: {reason}", self.url))
                }
                http::Error::Timeout => Failure::TempFail(format!(
                    "{method} {path} at {} timed out after {} s (--timeout)",
                    self.url,
                    self.client.timeout.as_secs()
                )),
                http::Error::Protocol(reason) => Failure::Software(format!(
                    "{} did not answer {method} {path} as the management API would: {reason}",
                    self.url
                )),
            })?;
        let text = String::from_utf8_lossy(&r.body).into_owned();
        let parsed = if text.trim().is_empty() {
            Ok(Value::Null)
        } else {
            serde_json::from_str::<Value>(&text)
        };
        let ok = (200..300).contains(&r.status);
        let body = match parsed {
            Ok(v) => v,
            Err(e) if ok => {
                return Err(Failure::Software(format!(
                    "{} answered {method} {path} with something that is not JSON: {e}",
                    self.url
                )))
            }
            Err(_) => Value::Null,
        };
        Ok(Reply {
            status: r.status,
            phrase: r.phrase,
            body,
            text,
        })
    }

    /// The failure an error answer means. `missing` is what a 404 means for this
    /// request (None: the generic message).
    fn refused(&self, r: &Reply, method: &str, path: &str, missing: Option<Failure>) -> Failure {
        let reason = r.reason();
        match r.status {
            401 | 403 => Failure::NoPerm(format!(
                "{reason} (HTTP {} for user '{}' at {})",
                r.status, self.user, self.url
            )),
            404 => missing.unwrap_or_else(|| {
                Failure::Data(format!(
                    "{reason}: {method} {path} answered 404 {}",
                    r.phrase
                ))
            }),
            405 | 501 => Failure::Unavailable(format!(
                "the broker at {} does not support {method} {path} ({} {})",
                self.url, r.status, r.phrase
            )),
            400..=499 => Failure::Data(reason),
            500..=599 => Failure::Unavailable(reason),
            _ => Failure::Software(format!(
                "unexpected answer to {method} {path}: {} {}",
                r.status, r.phrase
            )),
        }
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
        missing: Option<Failure>,
    ) -> Result<Reply, Failure> {
        let r = self.request(method, path, body, headers)?;
        if r.ok() {
            Ok(r)
        } else {
            Err(self.refused(&r, method, path, missing))
        }
    }

    fn get(&self, path: &str, missing: Option<Failure>) -> Result<Value, Failure> {
        Ok(self.call("GET", path, None, &[], missing)?.body)
    }

    /// A request that RabbitMQ's API takes and WarrenMQ's does not yet (users,
    /// vhosts, permissions, policies): a refusal says where they come from instead.
    fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        missing: Option<Failure>,
    ) -> Result<Reply, Failure> {
        let r = self.request(method, path, body, &[])?;
        if r.ok() {
            return Ok(r);
        }
        Err(match (r.status, missing) {
            (405 | 501, _) => Failure::Unavailable(format!(
                "the broker at {} does not support {method} {path} ({} {}). {ADMIN_HINT}",
                self.url, r.status, r.phrase
            )),
            (404, None) => Failure::Data(format!(
                "{}: {method} {path} answered 404: the broker has no such object, or does not \
                 support this request. {ADMIN_HINT}",
                r.reason()
            )),
            (_, missing) => self.refused(&r, method, path, missing),
        })
    }

    fn no_vhost(&self) -> Failure {
        Failure::Data(format!("Virtual host '{}' does not exist", self.vhost))
    }

    fn show(&self, rows: Vec<Value>, columns: &[(String, String)], explicit: bool) {
        match self.formatter {
            Formatter::Json => say(&pretty(&output::json(rows, explicit.then_some(columns)))),
            Formatter::Table | Formatter::Tsv => {
                for line in output::lines(&rows, columns, self.header) {
                    say(&line);
                }
            }
        }
    }

    /// A listing: columns checked before anything is asked, then one GET.
    fn list(
        &self,
        listing: &Listing,
        path: &str,
        asked: &[String],
        banner: &str,
        missing: Option<Failure>,
        keep: impl Fn(&Value) -> bool,
    ) -> Done {
        let columns = listing.select(asked).map_err(Failure::Usage)?;
        self.info(banner);
        let body = self.get(path, missing)?;
        let Value::Array(rows) = body else {
            return Err(Failure::Software(format!(
                "GET {path} did not answer with a list"
            )));
        };
        let rows = rows.into_iter().filter(|r| keep(r)).collect();
        self.show(rows, &columns, !asked.is_empty());
        Ok(())
    }

    fn run(&self, command: Command) -> Done {
        let v = enc(&self.vhost);
        let vhost = self.vhost.as_str();
        match command {
            Command::Status => self.status(),
            Command::ListQueues { columns } => self.list(
                &QUEUES,
                &format!("/api/queues/{v}"),
                &columns,
                &format!("Listing queues for vhost {vhost} ..."),
                Some(self.no_vhost()),
                |_| true,
            ),
            Command::ListExchanges { columns } => self.list(
                &EXCHANGES,
                &format!("/api/exchanges/{v}"),
                &columns,
                &format!("Listing exchanges for vhost {vhost} ..."),
                Some(self.no_vhost()),
                |_| true,
            ),
            Command::ListBindings { columns } => self.list(
                &BINDINGS,
                &format!("/api/bindings/{v}"),
                &columns,
                &format!("Listing bindings for vhost {vhost}..."),
                Some(self.no_vhost()),
                |_| true,
            ),
            Command::ListConnections { columns } => self.list(
                &CONNECTIONS,
                "/api/connections",
                &columns,
                "Listing connections ...",
                None,
                |_| true,
            ),
            Command::ListChannels { columns } => self.list(
                &CHANNELS,
                "/api/channels",
                &columns,
                "Listing channels ...",
                None,
                |_| true,
            ),
            Command::ListConsumers { columns } => self.list(
                &CONSUMERS,
                &format!("/api/consumers/{v}"),
                &columns,
                &format!("Listing consumers in vhost {vhost} ..."),
                Some(self.no_vhost()),
                |_| true,
            ),
            Command::ListUsers { columns } => self.list(
                &USERS,
                "/api/users",
                &columns,
                "Listing users ...",
                None,
                |_| true,
            ),
            Command::ListVhosts { columns } => self.list(
                &VHOSTS,
                "/api/vhosts",
                &columns,
                "Listing vhosts ...",
                None,
                |_| true,
            ),
            // Every broker has /api/permissions; RabbitMQ's per-vhost path is not in WarrenMQ's.
            Command::ListPermissions { columns } => self.list(
                &PERMISSIONS,
                "/api/permissions",
                &columns,
                &format!("Listing permissions for vhost \"{vhost}\" ..."),
                None,
                |p| p.get("vhost").and_then(Value::as_str) == Some(vhost),
            ),
            Command::ListPolicies { columns } => self.list(
                &POLICIES,
                &format!("/api/policies/{v}"),
                &columns,
                &format!("Listing policies for vhost \"{vhost}\" ..."),
                Some(self.no_vhost()),
                |_| true,
            ),
            Command::PurgeQueue { name } => {
                self.info(&format!("Purging queue '{name}' in vhost '{vhost}' ..."));
                self.call(
                    "DELETE",
                    &format!("/api/queues/{v}/{}/contents", enc(&name)),
                    None,
                    &[],
                    Some(self.no_queue(&name)),
                )?;
                Ok(())
            }
            Command::DeleteQueue {
                name,
                if_empty,
                if_unused,
            } => self.delete_queue(&name, if_empty, if_unused),
            Command::CloseConnection { name, reason } => {
                self.info(&format!("Closing connection {name}, reason: {reason}..."));
                self.call(
                    "DELETE",
                    &format!("/api/connections/{}", enc(&name)),
                    None,
                    &[("X-Reason", &reason)],
                    Some(Failure::Data(format!(
                        "Connection '{name}' does not exist (see list_connections name)"
                    ))),
                )?;
                Ok(())
            }
            Command::CloseAllConnections {
                reason,
                global,
                limit,
                per_connection_delay,
            } => self.close_all(&reason, global, limit, per_connection_delay),
            Command::ExportDefinitions { file } => self.export_definitions(&file),
            Command::ImportDefinitions { file } => self.import_definitions(file.as_deref()),
            Command::DeclareQueue {
                name,
                durable,
                auto_delete,
                queue_type,
                arguments,
            } => {
                let mut args = json_object("--arguments", arguments.as_deref())?;
                if let Some(t) = queue_type {
                    args.insert("x-queue-type".into(), Value::String(t));
                }
                let body = json!({"durable": durable, "auto_delete": auto_delete, "arguments": args});
                self.declare("Queue", "queues", &name, &body)
            }
            Command::DeclareExchange {
                name,
                kind,
                durable,
                auto_delete,
                internal,
                arguments,
            } => {
                let args = json_object("--arguments", arguments.as_deref())?;
                let body = json!({"type": kind, "durable": durable, "auto_delete": auto_delete,
                                  "internal": internal, "arguments": args});
                self.declare("Exchange", "exchanges", &name, &body)
            }
            Command::Publish {
                exchange,
                routing_key,
                payload,
                properties,
            } => self.publish(&exchange, &routing_key, payload, properties.as_deref()),
            Command::Get {
                queue,
                columns,
                count,
                ackmode,
                encoding,
                truncate,
            } => self.get_messages(&queue, &columns, count, ackmode, &encoding, truncate),
            Command::Ping => self.ping(),
            Command::CheckRunning => self.check_running(),
            Command::CheckLocalAlarms => self.check(
                "/api/health/checks/local-alarms",
                &format!("Asking the broker at {} to report any local resource alarms ...", self.url),
                &format!("The broker at {} reported no local alarms", self.url),
            ),
            Command::CheckVirtualHosts => self.check(
                "/api/health/checks/virtual-hosts",
                &format!("Checking if all vhosts are running on the broker at {} ...", self.url),
                &format!("The broker at {} reported all vhosts as running", self.url),
            ),
            Command::CheckPortListener { port } => self.check(
                &format!("/api/health/checks/port-listener/{port}"),
                &format!(
                    "Asking the broker at {} if there's an active listener on port {port} ...",
                    self.url
                ),
                &format!(
                    "A listener for port {port} is running on the broker at {}.",
                    self.url
                ),
            ),
            Command::CheckProtocolListener { protocol } => self.check(
                &format!("/api/health/checks/protocol-listener/{}", enc(&protocol)),
                &format!(
                    "Asking the broker at {} if there's an active listener for protocol {protocol} ...",
                    self.url
                ),
                &format!(
                    "A listener for protocol {protocol} is running on the broker at {}.",
                    self.url
                ),
            ),
            Command::CheckPortConnectivity => self.check_port_connectivity(),
            Command::AddUser {
                name,
                password,
                tags,
            } => {
                let password = password_from(password)?;
                self.info(&format!("Adding user \"{name}\" ..."));
                self.admin(
                    "PUT",
                    &format!("/api/users/{}", enc(&name)),
                    Some(&json!({"password": password, "tags": tags})),
                    None,
                )?;
                self.result("Done. Don't forget to grant the user permissions to some virtual hosts! See 'warrenmqctl help set_permissions' to learn more.");
                Ok(())
            }
            Command::DeleteUser { name } => {
                self.info(&format!("Deleting user \"{name}\" ..."));
                self.admin(
                    "DELETE",
                    &format!("/api/users/{}", enc(&name)),
                    None,
                    Some(no_user(&name)),
                )?;
                Ok(())
            }
            Command::ChangePassword { name, password } => {
                let password = password_from(password)?;
                self.info(&format!("Changing password for user \"{name}\" ..."));
                let path = format!("/api/users/{}", enc(&name));
                let user = self.get(&path, Some(no_user(&name)))?;
                let body = json!({"password": password, "tags": tags_of(&user)});
                self.admin("PUT", &path, Some(&body), Some(no_user(&name)))?;
                Ok(())
            }
            Command::SetUserTags { name, tags } => {
                self.info(&format!(
                    "Setting tags for user \"{name}\" to [{}] ...",
                    tags.join(", ")
                ));
                let path = format!("/api/users/{}", enc(&name));
                let user = self.get(&path, Some(no_user(&name)))?;
                // The password stays as it is: PUT with the hash the API shows.
                let body = json!({
                    "password_hash": user.get("password_hash").cloned().unwrap_or(Value::Null),
                    "hashing_algorithm": user.get("hashing_algorithm").cloned().unwrap_or(Value::Null),
                    "tags": tags.join(","),
                });
                self.admin("PUT", &path, Some(&body), Some(no_user(&name)))?;
                Ok(())
            }
            Command::SetPermissions {
                user,
                configure,
                write,
                read,
            } => {
                self.info(&format!(
                    "Setting permissions for user \"{user}\" in vhost \"{vhost}\" ..."
                ));
                self.admin(
                    "PUT",
                    &format!("/api/permissions/{v}/{}", enc(&user)),
                    Some(&json!({"configure": configure, "write": write, "read": read})),
                    None,
                )?;
                Ok(())
            }
            Command::ClearPermissions { user } => {
                self.info(&format!(
                    "Clearing permissions for user \"{user}\" in vhost \"{vhost}\" ..."
                ));
                self.admin(
                    "DELETE",
                    &format!("/api/permissions/{v}/{}", enc(&user)),
                    None,
                    None,
                )?;
                Ok(())
            }
            Command::AddVhost {
                name,
                description,
                tags,
                default_queue_type,
            } => {
                self.info(&format!("Adding vhost \"{name}\" ..."));
                let mut body = Map::new();
                for (k, val) in [
                    ("description", description),
                    ("tags", tags),
                    ("default_queue_type", default_queue_type),
                ] {
                    if let Some(val) = val {
                        body.insert(k.into(), Value::String(val));
                    }
                }
                self.admin(
                    "PUT",
                    &format!("/api/vhosts/{}", enc(&name)),
                    Some(&Value::Object(body)),
                    None,
                )?;
                Ok(())
            }
            Command::DeleteVhost { name } => {
                self.info(&format!("Deleting vhost \"{name}\" ..."));
                self.admin(
                    "DELETE",
                    &format!("/api/vhosts/{}", enc(&name)),
                    None,
                    Some(Failure::Data(format!("Virtual host '{name}' does not exist"))),
                )?;
                Ok(())
            }
            Command::SetPolicy {
                name,
                pattern,
                definition,
                priority,
                apply_to,
            } => {
                let definition = json_object("the policy definition", Some(&definition))?;
                self.info(&format!(
                    "Setting policy \"{name}\" for pattern \"{pattern}\" to \"{}\" with priority \"{priority}\" for vhost \"{vhost}\" ...",
                    Value::Object(definition.clone())
                ));
                let body = json!({"pattern": pattern, "definition": definition,
                                  "priority": priority, "apply-to": apply_to});
                self.admin(
                    "PUT",
                    &format!("/api/policies/{v}/{}", enc(&name)),
                    Some(&body),
                    None,
                )?;
                Ok(())
            }
            Command::ClearPolicy { name } => {
                self.info(&format!(
                    "Clearing policy \"{name}\" on vhost \"{vhost}\" ..."
                ));
                self.admin(
                    "DELETE",
                    &format!("/api/policies/{v}/{}", enc(&name)),
                    None,
                    None,
                )?;
                Ok(())
            }
        }
    }

    fn no_queue(&self, name: &str) -> Failure {
        Failure::Data(format!(
            "Queue '{name}' in vhost '{}' does not exist",
            self.vhost
        ))
    }

    fn status(&self) -> Done {
        self.info(&format!("Status of the broker at {} ...", self.url));
        let overview = self.get("/api/overview", None)?;
        // Node figures need the monitoring tag; a management user still sees the rest.
        let nodes = match self.call("GET", "/api/nodes", None, &[], None) {
            Ok(r) => Some(r.body),
            Err(Failure::NoPerm(_)) => None,
            Err(e) => return Err(e),
        };
        let name = overview.get("node").and_then(Value::as_str).unwrap_or("");
        let node = nodes.as_ref().and_then(|n| {
            let list = n.as_array()?;
            list.iter()
                .find(|x| x.get("name").and_then(Value::as_str) == Some(name))
                .or_else(|| list.first())
                .cloned()
        });
        if self.formatter == Formatter::Json {
            say(&pretty(&json!({"overview": overview, "node": node})));
            return Ok(());
        }
        let text = |v: &Value, k: &str| -> String {
            match v.get(k) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => "unknown".into(),
                Some(other) => other.to_string(),
            }
        };
        let number = |v: &Value, path: &str| output::lookup(v, path).as_u64();
        let mut out = vec!["Runtime".to_string(), String::new()];
        let product = overview
            .get("product_name")
            .and_then(Value::as_str)
            .unwrap_or("RabbitMQ");
        out.push(format!("Product name: {product}"));
        out.push(format!(
            "Product version: {}",
            text(&overview, "product_version")
        ));
        // RabbitMQ's own version, or the one whose API another broker follows.
        let version = text(&overview, "rabbitmq_version");
        if product == "RabbitMQ" {
            out.push(format!("RabbitMQ version: {version}"));
        } else {
            out.push(format!("Management API of RabbitMQ version: {version}"));
        }
        out.push(format!("Node name: {}", text(&overview, "node")));
        if let Some(n) = &node {
            if let Some(ms) = number(n, "uptime") {
                out.push(format!("Uptime (seconds): {}", ms / 1000));
            }
            out.push(String::new());
            out.push("Alarms".into());
            out.push(String::new());
            let mut alarms = Vec::new();
            if n.get("mem_alarm") == Some(&Value::Bool(true)) {
                alarms.push("memory");
            }
            if n.get("disk_free_alarm") == Some(&Value::Bool(true)) {
                alarms.push("disk");
            }
            if alarms.is_empty() {
                out.push("(none)".into());
            } else {
                out.extend(alarms.iter().map(|a| format!("resource alarm: {a}")));
            }
            out.push(String::new());
            out.push("Memory".into());
            out.push(String::new());
            if let Some(used) = number(n, "mem_used") {
                out.push(format!("Total memory used: {}", output::bytes(used)));
            }
            if let Some(limit) = number(n, "mem_limit") {
                out.push(format!("Memory high watermark: {}", output::bytes(limit)));
            }
        } else {
            out.push(String::new());
            out.push("(uptime, alarms and memory need the monitoring or administrator tag)".into());
        }
        out.push(String::new());
        out.push("Totals".into());
        out.push(String::new());
        for (label, path) in [
            ("Connection count", "object_totals.connections"),
            ("Channel count", "object_totals.channels"),
            ("Queue count", "object_totals.queues"),
            ("Consumer count", "object_totals.consumers"),
            ("Exchange count", "object_totals.exchanges"),
            ("Messages", "queue_totals.messages"),
            ("Messages ready", "queue_totals.messages_ready"),
            (
                "Messages unacknowledged",
                "queue_totals.messages_unacknowledged",
            ),
        ] {
            if let Some(n) = number(&overview, path) {
                out.push(format!("{label}: {n}"));
            }
        }
        out.push(String::new());
        out.push("Listeners".into());
        out.push(String::new());
        for l in overview
            .get("listeners")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let protocol = text(l, "protocol");
            out.push(format!(
                "Interface: {}, port: {}, protocol: {protocol}, purpose: {}",
                text(l, "ip_address"),
                text(l, "port"),
                purpose(&protocol)
            ));
        }
        for line in out {
            say(&line);
        }
        Ok(())
    }

    fn delete_queue(&self, name: &str, if_empty: bool, if_unused: bool) -> Done {
        self.info(&format!(
            "Deleting queue '{name}' on vhost '{}' ...",
            self.vhost
        ));
        let path = format!("/api/queues/{}/{}", enc(&self.vhost), enc(name));
        // Asked first, for the count rabbitmqctl reports (the API does not return it).
        let q = self.get(&path, Some(self.no_queue(name)))?;
        let mut flags = Vec::new();
        if if_empty {
            flags.push("if-empty=true");
        }
        if if_unused {
            flags.push("if-unused=true");
        }
        let query = if flags.is_empty() {
            String::new()
        } else {
            format!("?{}", flags.join("&"))
        };
        self.call(
            "DELETE",
            &format!("{path}{query}"),
            None,
            &[],
            Some(self.no_queue(name)),
        )?;
        let n = q.get("messages").and_then(Value::as_u64).unwrap_or(0);
        self.result(&format!("Queue was successfully deleted with {n} messages"));
        Ok(())
    }

    fn close_all(
        &self,
        reason: &str,
        global: bool,
        limit: Option<usize>,
        delay: Option<u64>,
    ) -> Done {
        if global {
            self.info("Closing all connections in every vhost ...");
        } else {
            self.info(&format!(
                "Closing all connections in vhost {} ...",
                self.vhost
            ));
        }
        let list = self.get("/api/connections", None)?;
        let names: Vec<String> = list
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| global || c.get("vhost").and_then(Value::as_str) == Some(&self.vhost))
            .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_string))
            .take(limit.unwrap_or(usize::MAX))
            .collect();
        let mut closed = 0;
        for (i, name) in names.iter().enumerate() {
            if i > 0 {
                if let Some(ms) = delay {
                    std::thread::sleep(Duration::from_millis(ms));
                }
            }
            let r = self.request(
                "DELETE",
                &format!("/api/connections/{}", enc(name)),
                None,
                &[("X-Reason", reason)],
            )?;
            match r.status {
                // Gone in the meantime: nothing left to close.
                404 => {}
                _ if r.ok() => closed += 1,
                _ => {
                    let path = format!("/api/connections/{}", enc(name));
                    return Err(self.refused(&r, "DELETE", &path, None));
                }
            }
        }
        self.result(&format!("Closed {closed} connection(s)"));
        Ok(())
    }

    fn export_definitions(&self, file: &str) -> Done {
        if file != "-" {
            self.info(&format!(
                "Exporting definitions in JSON to a file at \"{file}\" ..."
            ));
        }
        let r = self.request("GET", "/api/definitions", None, &[])?;
        if matches!(r.status, 404 | 405) {
            return Err(Failure::Unavailable(format!(
                "the broker at {} cannot export definitions over its API (GET /api/definitions \
                 answered {} {}); WarrenMQ exports them with `warrenmq export-definitions \
                 --config FILE` while it is stopped",
                self.url, r.status, r.phrase
            )));
        }
        if !r.ok() {
            return Err(self.refused(&r, "GET", "/api/definitions", None));
        }
        let text = pretty(&r.body);
        if file == "-" {
            say(&text);
            return Ok(());
        }
        std::fs::write(file, format!("{text}\n"))
            .map_err(|e| Failure::Software(format!("cannot write {file}: {e}")))
    }

    /// rabbitmqctl's checks and words for the input (zero-sized, not JSON), then one
    /// POST; the broker applies the whole file before it answers.
    fn import_definitions(&self, file: Option<&str>) -> Done {
        let text = match file {
            Some(path) => {
                self.info(&format!(
                    "Importing definitions in JSON from a file at \"{path}\" ..."
                ));
                let bytes = std::fs::read(path).map_err(|e| {
                    Failure::Data(match e.kind() {
                        std::io::ErrorKind::NotFound => {
                            format!("Parent directory or file {path} does not exist")
                        }
                        std::io::ErrorKind::PermissionDenied => format!(
                            "No permissions to read from file {path} or its parent directory"
                        ),
                        _ => format!("Could not read from file {path}: {e}"),
                    })
                })?;
                if bytes.is_empty() {
                    return Err(Failure::Data(format!("File {path} is zero-sized")));
                }
                bytes
            }
            None => {
                self.info("Importing definitions in JSON from standard input ...");
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
                    .map_err(|e| Failure::Data(format!("cannot read standard input: {e}")))?;
                if bytes.is_empty() {
                    return Err(Failure::Usage("not enough arguments".into()));
                }
                bytes
            }
        };
        let definitions: Value = serde_json::from_slice(&text).map_err(|e| {
            Failure::Data(format!(
                "Failed to deserialise input (format: JSON) (error: {e})"
            ))
        })?;
        self.admin("POST", "/api/definitions", Some(&definitions), None)?;
        self.result("Successfully imported definitions.");
        Ok(())
    }

    /// PUT of a queue or an exchange: 201 created, 204 already there (and equivalent).
    fn declare(&self, what: &str, kind: &str, name: &str, body: &Value) -> Done {
        let r = self.call(
            "PUT",
            &format!("/api/{kind}/{}/{}", enc(&self.vhost), enc(name)),
            Some(body),
            &[],
            Some(self.no_vhost()),
        )?;
        if r.status == 204 {
            self.result(&format!(
                "{what} '{name}' already exists in vhost '{}' (unchanged)",
                self.vhost
            ));
        } else {
            self.result(&format!(
                "{what} '{name}' declared in vhost '{}'",
                self.vhost
            ));
        }
        Ok(())
    }

    fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: Option<String>,
        properties: Option<&str>,
    ) -> Done {
        let properties = json_object("--properties", properties)?;
        let raw = match payload.as_deref() {
            None | Some("-") => {
                let mut buf = Vec::new();
                std::io::stdin().read_to_end(&mut buf).map_err(|e| {
                    Failure::Data(format!("cannot read the payload from standard input: {e}"))
                })?;
                buf
            }
            Some(p) => p.as_bytes().to_vec(),
        };
        let (payload, encoding) = match String::from_utf8(raw) {
            Ok(s) => (s, "string"),
            Err(e) => {
                use base64::Engine;
                (
                    base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
                    "base64",
                )
            }
        };
        let name = if exchange.is_empty() {
            "amq.default"
        } else {
            exchange
        };
        let body = json!({"properties": properties, "routing_key": routing_key,
                          "payload": payload, "payload_encoding": encoding});
        let r = self.call(
            "POST",
            &format!("/api/exchanges/{}/{}/publish", enc(&self.vhost), enc(name)),
            Some(&body),
            &[],
            Some(Failure::Data(format!(
                "Exchange '{name}' in vhost '{}' does not exist",
                self.vhost
            ))),
        )?;
        if self.formatter == Formatter::Json {
            say(&pretty(&r.body));
        } else if r.body.get("routed") == Some(&Value::Bool(true)) {
            self.result("Message published");
        } else {
            self.result("Message published but NOT routed");
        }
        Ok(())
    }

    fn get_messages(
        &self,
        queue: &str,
        asked: &[String],
        count: u32,
        ackmode: AckMode,
        encoding: &str,
        truncate: Option<u64>,
    ) -> Done {
        let columns = MESSAGES.select(asked).map_err(Failure::Usage)?;
        self.info(&format!(
            "Getting up to {count} message(s) from queue '{queue}' in vhost '{}' ({}) ...",
            self.vhost,
            ackmode.name()
        ));
        let mut body = json!({"count": count, "ackmode": ackmode.name(), "encoding": encoding});
        if let (Some(t), Value::Object(m)) = (truncate, &mut body) {
            m.insert("truncate".into(), json!(t));
        }
        let r = self.call(
            "POST",
            &format!("/api/queues/{}/{}/get", enc(&self.vhost), enc(queue)),
            Some(&body),
            &[],
            Some(self.no_queue(queue)),
        )?;
        let Value::Array(rows) = r.body else {
            return Err(Failure::Software(
                "the API's answer to get is not a list".into(),
            ));
        };
        self.show(rows, &columns, !asked.is_empty());
        Ok(())
    }

    fn ping(&self) -> Done {
        self.info(&format!(
            "Will ping the broker at {}. This checks that its management API answers and accepts \
             the credentials. Timeout: {} ms.",
            self.url,
            self.client.timeout.as_millis()
        ));
        self.get("/api/overview", None)?;
        if self.formatter == Formatter::Json {
            say(&pretty(&json!({"result": "ok"})));
        } else {
            self.result("Ping succeeded");
        }
        Ok(())
    }

    fn check_running(&self) -> Done {
        self.info(&format!(
            "Checking if the broker at {} is running ...",
            self.url
        ));
        let overview = self.get("/api/overview", None)?;
        let product = overview
            .get("product_name")
            .and_then(Value::as_str)
            .unwrap_or("RabbitMQ");
        let name = overview.get("node").and_then(Value::as_str).unwrap_or("");
        let nodes = self.get("/api/nodes", None).map_err(|e| match e {
            Failure::NoPerm(m) => Failure::NoPerm(format!(
                "{m}; check_running reads GET /api/nodes, which needs the monitoring or \
                 administrator tag"
            )),
            other => other,
        })?;
        let node = nodes.as_array().and_then(|l| {
            l.iter()
                .find(|n| n.get("name").and_then(Value::as_str) == Some(name))
        });
        let running = node.and_then(|n| n.get("running")) == Some(&Value::Bool(true));
        if !running {
            return Err(Failure::Unavailable(format!(
                "{product} on node {name} is not running or has not fully booted yet"
            )));
        }
        if self.formatter == Formatter::Json {
            say(&pretty(&json!({"result": "ok", "node": name})));
        } else {
            self.result(&format!(
                "{product} on node {name} is fully booted and running"
            ));
        }
        Ok(())
    }

    /// A health check endpoint: 200 passes; the API's 503 fails with its reason.
    fn check(&self, path: &str, banner: &str, passed: &str) -> Done {
        self.info(banner);
        let r = self.call("GET", path, None, &[], None)?;
        if self.formatter == Formatter::Json {
            say(&pretty(&r.body));
        } else {
            self.result(passed);
        }
        Ok(())
    }

    fn check_port_connectivity(&self) -> Done {
        self.info(&format!(
            "Testing TCP connections to all active listeners of the broker at {} ...",
            self.url
        ));
        let overview = self.get("/api/overview", None)?;
        let host = &self.client.endpoint.host;
        let mut ok = Vec::new();
        let mut failed = Vec::new();
        for l in overview
            .get("listeners")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(port) = l
                .get("port")
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
            else {
                continue;
            };
            let ip = l.get("ip_address").and_then(Value::as_str).unwrap_or("");
            // A wildcard listener is reached at the API's own host.
            let target = match ip.parse::<std::net::IpAddr>() {
                Ok(a) if !a.is_unspecified() => a.to_string(),
                _ => host.clone(),
            };
            let protocol = l.get("protocol").and_then(Value::as_str).unwrap_or("?");
            match connect(&target, port, self.client.timeout) {
                Ok(()) => ok.push(port.to_string()),
                Err(e) => failed.push(format!(
                    "Interface: {ip}, port: {port}, protocol: {protocol}: {e}"
                )),
            }
        }
        if !failed.is_empty() {
            return Err(Failure::Unavailable(format!(
                "Connection to ports of the following listeners of the broker at {} failed:\n{}",
                self.url,
                failed.join("\n")
            )));
        }
        if self.formatter == Formatter::Json {
            say(&pretty(&json!({"result": "ok", "ports": ok})));
        } else {
            self.result(&format!(
                "Successfully connected to ports {} of the broker at {}.",
                ok.join(", "),
                self.url
            ));
        }
        Ok(())
    }
}

fn no_user(name: &str) -> Failure {
    Failure::NoUser(format!("User \"{name}\" does not exist"))
}

/// A TCP connection to host:port, opened and closed.
fn connect(host: &str, port: u16, timeout: Duration) -> Result<(), String> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .collect();
    let mut last = "no address".to_string();
    for a in addrs {
        match std::net::TcpStream::connect_timeout(&a, timeout) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// What a listener is for, in rabbitmqctl status's words.
fn purpose(protocol: &str) -> &'static str {
    match protocol {
        "amqp" => "AMQP 0-9-1",
        "amqp/ssl" => "AMQP 0-9-1 over TLS",
        "http" => "HTTP API",
        "http/prometheus" => "Prometheus exporter API over HTTP",
        "clustering" => "inter-node and CLI tool communication",
        _ => "",
    }
}

const QUEUES: Listing = Listing {
    command: "list_queues",
    columns: &[
        ("name", "name"),
        ("vhost", "vhost"),
        ("durable", "durable"),
        ("auto_delete", "auto_delete"),
        ("exclusive", "exclusive"),
        ("arguments", "arguments"),
        ("type", "type"),
        ("state", "state"),
        ("node", "node"),
        ("policy", "policy"),
        ("operator_policy", "operator_policy"),
        ("effective_policy_definition", "effective_policy_definition"),
        ("consumers", "consumers"),
        ("exclusive_consumer_tag", "exclusive_consumer_tag"),
        ("single_active_consumer_tag", "single_active_consumer_tag"),
        ("messages", "messages"),
        ("messages_ready", "messages_ready"),
        ("messages_unacknowledged", "messages_unacknowledged"),
        ("messages_persistent", "messages_persistent"),
        ("message_bytes", "message_bytes"),
        ("message_bytes_ready", "message_bytes_ready"),
        (
            "message_bytes_unacknowledged",
            "message_bytes_unacknowledged",
        ),
        ("message_bytes_ram", "message_bytes_ram"),
        ("message_bytes_paged_out", "message_bytes_paged_out"),
        ("message_bytes_persistent", "message_bytes_persistent"),
        ("head_message_timestamp", "head_message_timestamp"),
        ("idle_since", "idle_since"),
        ("memory", "memory"),
        ("consumer_utilisation", "consumer_utilisation"),
    ],
    default: &["name", "messages"],
};

const EXCHANGES: Listing = Listing {
    command: "list_exchanges",
    columns: &[
        ("name", "name"),
        ("vhost", "vhost"),
        ("type", "type"),
        ("durable", "durable"),
        ("auto_delete", "auto_delete"),
        ("internal", "internal"),
        ("arguments", "arguments"),
        ("policy", "policy"),
    ],
    default: &["name", "type"],
};

const BINDINGS: Listing = Listing {
    command: "list_bindings",
    columns: &[
        ("source_name", "source"),
        ("source_kind", "=exchange"),
        ("destination_name", "destination"),
        ("destination_kind", "destination_type"),
        ("routing_key", "routing_key"),
        ("arguments", "arguments"),
        ("vhost", "vhost"),
        ("properties_key", "properties_key"),
        ("source", "source"),
        ("destination", "destination"),
        ("destination_type", "destination_type"),
    ],
    default: &[
        "source_name",
        "source_kind",
        "destination_name",
        "destination_kind",
        "routing_key",
        "arguments",
    ],
};

const CONNECTIONS: Listing = Listing {
    command: "list_connections",
    columns: &[
        ("name", "name"),
        ("user", "user"),
        ("vhost", "vhost"),
        ("state", "state"),
        ("protocol", "protocol"),
        ("auth_mechanism", "auth_mechanism"),
        ("channels", "channels"),
        ("channel_max", "channel_max"),
        ("frame_max", "frame_max"),
        ("timeout", "timeout"),
        ("connected_at", "connected_at"),
        ("host", "host"),
        ("port", "port"),
        ("peer_host", "peer_host"),
        ("peer_port", "peer_port"),
        ("ssl", "ssl"),
        ("ssl_protocol", "ssl_protocol"),
        ("recv_oct", "recv_oct"),
        ("send_oct", "send_oct"),
        ("recv_cnt", "recv_cnt"),
        ("send_cnt", "send_cnt"),
        ("send_pend", "send_pend"),
        ("client_properties", "client_properties"),
        ("type", "type"),
        ("node", "node"),
    ],
    default: &["user", "peer_host", "peer_port", "state"],
};

const CHANNELS: Listing = Listing {
    command: "list_channels",
    columns: &[
        ("name", "name"),
        ("number", "number"),
        ("connection", "connection_details.name"),
        ("user", "user"),
        ("vhost", "vhost"),
        ("state", "state"),
        ("consumer_count", "consumer_count"),
        ("prefetch_count", "prefetch_count"),
        ("global_prefetch_count", "global_prefetch_count"),
        ("confirm", "confirm"),
        ("transactional", "transactional"),
        ("messages_unacknowledged", "messages_unacknowledged"),
        ("messages_unconfirmed", "messages_unconfirmed"),
        ("messages_uncommitted", "messages_uncommitted"),
        ("acks_uncommitted", "acks_uncommitted"),
        ("node", "node"),
    ],
    default: &["name", "user", "consumer_count", "messages_unacknowledged"],
};

const CONSUMERS: Listing = Listing {
    command: "list_consumers",
    columns: &[
        ("queue_name", "queue.name"),
        ("channel", "channel_details.name"),
        ("channel_pid", "channel_details.name"),
        ("connection", "channel_details.connection_name"),
        ("consumer_tag", "consumer_tag"),
        ("ack_required", "ack_required"),
        ("exclusive", "exclusive"),
        ("prefetch_count", "prefetch_count"),
        ("active", "active"),
        ("activity_status", "activity_status"),
        ("arguments", "arguments"),
        ("vhost", "queue.vhost"),
    ],
    default: &[
        "queue_name",
        "channel",
        "consumer_tag",
        "ack_required",
        "prefetch_count",
        "active",
        "arguments",
    ],
};

const USERS: Listing = Listing {
    command: "list_users",
    columns: &[
        ("user", "name"),
        ("name", "name"),
        ("tags", "tags"),
        ("hashing_algorithm", "hashing_algorithm"),
        ("limits", "limits"),
    ],
    default: &["user", "tags"],
};

const VHOSTS: Listing = Listing {
    command: "list_vhosts",
    columns: &[
        ("name", "name"),
        ("description", "description"),
        ("tags", "tags"),
        ("default_queue_type", "default_queue_type"),
        ("tracing", "tracing"),
        ("cluster_state", "cluster_state"),
        ("messages", "messages"),
        ("messages_ready", "messages_ready"),
        ("messages_unacknowledged", "messages_unacknowledged"),
    ],
    default: &["name"],
};

const PERMISSIONS: Listing = Listing {
    command: "list_permissions",
    columns: &[
        ("user", "user"),
        ("configure", "configure"),
        ("write", "write"),
        ("read", "read"),
        ("vhost", "vhost"),
    ],
    default: &["user", "configure", "write", "read"],
};

const POLICIES: Listing = Listing {
    command: "list_policies",
    columns: &[
        ("vhost", "vhost"),
        ("name", "name"),
        ("pattern", "pattern"),
        ("apply-to", "apply-to"),
        ("definition", "definition"),
        ("priority", "priority"),
    ],
    default: &[
        "vhost",
        "name",
        "pattern",
        "apply-to",
        "definition",
        "priority",
    ],
};

const MESSAGES: Listing = Listing {
    command: "get",
    columns: &[
        ("routing_key", "routing_key"),
        ("exchange", "exchange"),
        ("message_count", "message_count"),
        ("payload", "payload"),
        ("payload_bytes", "payload_bytes"),
        ("payload_encoding", "payload_encoding"),
        ("redelivered", "redelivered"),
        ("properties", "properties"),
    ],
    default: &[
        "routing_key",
        "exchange",
        "message_count",
        "payload",
        "payload_bytes",
        "payload_encoding",
        "redelivered",
    ],
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // Help and version go to standard output and succeed; a bad command line
            // exits with EX_USAGE, as rabbitmqctl's does.
            return ExitCode::from(if e.use_stderr() { 64 } else { 0 });
        }
    };
    let endpoint = match http::Endpoint::parse(&cli.url) {
        Ok(e) => e,
        Err(reason) => {
            eprintln!("Error: {reason}");
            return ExitCode::from(64);
        }
    };
    let formatter = cli.formatter;
    let table = formatter == Formatter::Table;
    let ctl = Ctl {
        client: http::Client::new(
            endpoint,
            &cli.user,
            &cli.password,
            Duration::from_secs(cli.timeout),
        ),
        url: cli.url.trim_end_matches('/').to_string(),
        user: cli.user.clone(),
        vhost: cli.vhost.clone(),
        formatter,
        chatty: table && !cli.quiet && !cli.silent,
        header: table && !cli.silent && !cli.no_table_headers,
        results: formatter != Formatter::Json && !cli.silent,
    };
    match ctl.run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("Error: {}", f.message());
            ExitCode::from(f.code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// A command's own USER or PASSWORD argument is not the API's credentials.
    #[test]
    fn arguments_do_not_replace_the_credentials() {
        let cli = Cli::try_parse_from([
            "warrenmqctl",
            "--user",
            "admin",
            "--password",
            "secret",
            "change_password",
            "bob",
            "new",
        ])
        .unwrap();
        assert_eq!(
            (cli.user.as_str(), cli.password.as_str()),
            ("admin", "secret")
        );
        assert!(
            matches!(cli.command, Command::ChangePassword { password: Some(p), .. } if p == "new")
        );
        let cli =
            Cli::try_parse_from(["warrenmqctl", "set_permissions", "bob", ".*", "", "^x"]).unwrap();
        assert_eq!(cli.user, "guest");
        assert!(matches!(cli.command, Command::SetPermissions { user, .. } if user == "bob"));
        let cli = Cli::try_parse_from([
            "warrenmqctl",
            "add_user",
            "bob",
            "pw",
            "--tags",
            "monitoring",
        ])
        .unwrap();
        assert_eq!(cli.password, "guest");
        let cli =
            Cli::try_parse_from(["warrenmqctl", "clear_permissions", "-p", "v", "bob"]).unwrap();
        assert_eq!((cli.user.as_str(), cli.vhost.as_str()), ("guest", "v"));
    }
}
