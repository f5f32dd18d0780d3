//! The `warrenmq` command: parses flags, loads the configuration, starts the broker
//! and shuts it down gracefully on SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use warrenmq::Config;

#[derive(Parser)]
#[command(
    name = "warrenmq",
    version,
    about = "An AMQP 0-9-1 message broker that RabbitMQ clients use unchanged"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to listen on for AMQP (repeatable); replaces the configured list.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Vec<SocketAddr>,
    /// Address for the management HTTP API (repeatable); turns it on, replacing the
    /// configured `[management]` addresses.
    #[arg(long, value_name = "ADDR:PORT")]
    management: Vec<SocketAddr>,
    /// Address for Prometheus metrics (repeatable); turns them on, replacing the
    /// configured `[prometheus]` addresses.
    #[arg(long, value_name = "ADDR:PORT")]
    prometheus: Vec<SocketAddr>,
    /// Configuration file (TOML); without it the embedded default is used.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory for durable state.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// error, warn, info, debug or trace (RUST_LOG, when set, takes precedence).
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Reads a password from standard input and prints a `password_hash` for it, in
    /// RabbitMQ's format (rabbit_password_hashing_sha256, random salt).
    HashPassword,
    /// Checks a configuration file as start-up would (syntax, keys, bounds, users,
    /// topology) without starting the broker; prints a summary, or FILE:LINE:COLUMN: reason.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Reads RabbitMQ definitions (what `rabbitmqctl export_definitions` writes),
    /// checks them as start-up would and prints them as WarrenMQ TOML; what has no
    /// WarrenMQ equivalent is listed on standard error.
    ImportDefinitions {
        /// The JSON file.
        file: PathBuf,
    },
    /// Prints RabbitMQ definitions (3.10's JSON) of the configuration's users, vhosts,
    /// permissions and policies, and of its topology and the durable topology stored
    /// in the data directory. The broker must be stopped: it holds the data directory.
    ExportDefinitions {
        /// Configuration file (TOML); without it the embedded default is used.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Data directory whose stored topology is exported; default: the configuration's.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
}

fn print_warnings(config: &Config) {
    for w in &config.warnings {
        eprintln!("warrenmq: warning: {w}");
    }
}

/// `warrenmq import-definitions FILE.json`: TOML on stdout, warnings on stderr.
fn import_definitions(path: &std::path::Path) -> ExitCode {
    let checked =
        Config::from_definitions(path).and_then(|c| warrenmq::declare::check(&c).map(|_| c));
    match checked {
        Ok(c) => {
            print_warnings(&c);
            print!(
                "{}",
                warrenmq::definitions::to_toml(&c, &path.display().to_string())
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("warrenmq: {e}");
            ExitCode::from(2)
        }
    }
}

/// `warrenmq export-definitions`: JSON on stdout, what it could not carry on stderr.
fn export_definitions(config: Option<&std::path::Path>, data_dir: Option<PathBuf>) -> ExitCode {
    let config = match config.map(Config::load) {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            eprintln!("warrenmq: bad configuration: {e}");
            return ExitCode::from(2);
        }
        None => Config::default(),
    };
    print_warnings(&config);
    let dir = data_dir.unwrap_or_else(|| config.data_dir.clone());
    let stored = match warrenmq::definitions::read_stored(&dir) {
        Ok(s) => s,
        Err(warrenmq::store::StoreError::Locked(dir)) => {
            eprintln!(
                "warrenmq: data directory {} is in use by a running broker: stop it to export                  its stored topology (exporting from a running broker will come with the HTTP API)",
                dir.display()
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("warrenmq: {e}");
            return ExitCode::from(2);
        }
    };
    if stored.is_none() {
        eprintln!(
            "warrenmq: no stored state in {}: exporting the configuration alone",
            dir.display()
        );
    }
    match warrenmq::definitions::export(&config, stored.as_ref()) {
        Ok(export) => {
            for w in &export.warnings {
                eprintln!("warrenmq: warning: {w}");
            }
            match serde_json::to_string_pretty(&export.json) {
                Ok(text) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("warrenmq: cannot write the definitions: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("warrenmq: {e}");
            ExitCode::from(2)
        }
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    let checked = Config::load(path).and_then(|c| {
        if let Err(e) = EnvFilter::try_new(&c.log_level) {
            eprintln!(
                "warrenmq: {}: bad log_level '{}': {e}",
                path.display(),
                c.log_level
            );
            return Ok(None);
        }
        warrenmq::declare::check(&c).map(|s| Some((c, s)))
    });
    if let Ok(Some((c, _))) = &checked {
        print_warnings(c);
    }
    match checked.map(|c| c.map(|(_, s)| s)) {
        Ok(Some(s)) => {
            let listeners: Vec<String> = s.listeners.iter().map(|a| a.to_string()).collect();
            println!("{}: ok", path.display());
            println!("  listeners: {}", listeners.join(", "));
            if !s.tls_listeners.is_empty() {
                let tls: Vec<String> = s.tls_listeners.iter().map(|a| a.to_string()).collect();
                println!("  tls listeners: {}", tls.join(", "));
            }
            println!("  vhosts: {}", s.vhosts.join(", "));
            println!("  users: {}", s.users);
            println!(
                "  exchanges: {}, queues: {}, bindings: {}",
                s.exchanges, s.queues, s.bindings
            );
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::from(2),
        Err(e) => {
            eprintln!("warrenmq: {e}");
            ExitCode::from(2)
        }
    }
}

/// `warrenmq hash-password`: the password comes from stdin, never from the command
/// line, where other users and the shell's history would see it.
fn hash_password() -> ExitCode {
    use std::io::Read;
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("warrenmq: cannot read the password from standard input: {e}");
        return ExitCode::from(2);
    }
    let password = input
        .strip_suffix('\n')
        .map(|p| p.strip_suffix('\r').unwrap_or(p))
        .unwrap_or(&input);
    if password.is_empty() {
        eprintln!("warrenmq: the password is empty");
        return ExitCode::from(2);
    }
    let salt = match warrenmq::auth::random_salt() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("warrenmq: cannot read random bytes for the salt: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "{}",
        warrenmq::auth::hash_password(password.as_bytes(), salt)
    );
    ExitCode::SUCCESS
}

impl Cli {
    /// The command line's flags win over the file, at start and on reload alike.
    fn override_file(&self, config: &mut Config) {
        if !self.listen.is_empty() {
            config.listen = self.listen.clone();
        }
        if !self.prometheus.is_empty() {
            let tls_listen = config
                .prometheus
                .take()
                .map(|p| p.tls_listen)
                .unwrap_or_default();
            config.prometheus = Some(warrenmq::config::PrometheusConfig {
                listen: self.prometheus.clone(),
                tls_listen,
            });
        }
        if !self.management.is_empty() {
            let mut m = config.management.take().unwrap_or_default();
            m.listen = self.management.clone();
            config.management = Some(m);
        }
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(level) = &self.log_level {
            config.log_level = level.clone();
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::HashPassword) => return hash_password(),
        Some(Command::CheckConfig { file }) => return check_config(file),
        Some(Command::ImportDefinitions { file }) => return import_definitions(file),
        Some(Command::ExportDefinitions { config, data_dir }) => {
            let config = config.as_ref().or(cli.config.as_ref());
            let data_dir = data_dir.clone().or_else(|| cli.data_dir.clone());
            return export_definitions(config.map(PathBuf::as_path), data_dir);
        }
        None => {}
    }
    let mut config = match &cli.config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("warrenmq: bad configuration: {e}");
                return ExitCode::from(2);
            }
        },
        None => Config::default(),
    };
    cli.override_file(&mut config);
    let filter =
        EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(&config.log_level));
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            eprintln!("warrenmq: bad log level '{}': {e}", config.log_level);
            return ExitCode::from(2);
        }
    };
    match config.log_format {
        warrenmq::config::LogFormat::Text => {
            tracing_subscriber::fmt().with_env_filter(filter).init()
        }
        warrenmq::config::LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_env_filter(filter)
            .init(),
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("warrenmq: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let broker = match warrenmq::start(config).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        // SIGHUP re-reads the file; SIGTERM and SIGINT stop the broker.
        let mut signals = Signals::new();
        while let Signal::Reload = signals.next().await {
            let Some(path) = &cli.config else {
                tracing::warn!(
                    "SIGHUP: the broker runs on its embedded configuration, which cannot change"
                );
                continue;
            };
            match Config::load(path) {
                Ok(mut config) => {
                    cli.override_file(&mut config);
                    broker.reload(config);
                }
                Err(e) => tracing::error!("configuration reload refused, nothing changed: {e}"),
            }
        }
        tracing::info!("shutting down");
        broker.shutdown().await;
        ExitCode::SUCCESS
    })
}

enum Signal {
    Stop,
    Reload,
}

/// The signals the broker acts on, registered once so that none is missed
/// between two waits.
struct Signals {
    streams: Option<(
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
    )>,
}

impl Signals {
    fn new() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let streams = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(t), Ok(i), Ok(h)) => Some((t, i, h)),
            _ => None,
        };
        Signals { streams }
    }

    async fn next(&mut self) -> Signal {
        let Some((t, i, h)) = &mut self.streams else {
            let _ = tokio::signal::ctrl_c().await;
            return Signal::Stop;
        };
        tokio::select! {
            _ = t.recv() => Signal::Stop,
            _ = i.recv() => Signal::Stop,
            _ = h.recv() => Signal::Reload,
        }
    }
}
