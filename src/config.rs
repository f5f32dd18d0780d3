//! Broker configuration: a TOML file, or the default one embedded in the binary.
//! Kept apart so that start-up can reject a bad file with its path, line and reason
//! before anything listens.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The default configuration, shipped as `config/warrenmq.toml` and embedded here.
pub const DEFAULT_TOML: &str = include_str!("../config/warrenmq.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub data_dir: PathBuf,
    #[serde(default = "default_log_level")]
    pub log_level: String,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub users: Vec<User>,
    #[serde(default)]
    pub vhosts: Vec<VhostConfig>,
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
    pub queue_memory_budget: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frame_max: 131072,
            channel_max: 2047,
            heartbeat: 60,
            handshake_timeout: 10,
            max_message_size: 128 * 1024 * 1024,
            memory_high_watermark: 1024 * 1024 * 1024,
            queue_memory_budget: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub password: String,
    #[serde(default)]
    pub loopback_only: bool,
    #[serde(default = "all_vhosts")]
    pub vhosts: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostConfig {
    pub name: String,
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
    #[error("{path}:{line}: {reason}")]
    Parse {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
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

    pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
                .unwrap_or(1);
            ConfigError::Parse {
                path: path.to_string(),
                line,
                reason: e.message().to_string(),
            }
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let bad = |reason: String| {
            Err(ConfigError::Invalid {
                path: path.to_string(),
                reason,
            })
        };
        if self.listen.is_empty() {
            return bad("listen: at least one address is needed".into());
        }
        if self.limits.frame_max < 4096 {
            return bad(format!(
                "limits.frame_max: {} is below the AMQP minimum of 4096",
                self.limits.frame_max
            ));
        }
        if self.limits.channel_max == 0 {
            return bad("limits.channel_max: must be at least 1".into());
        }
        if self.vhosts.is_empty() {
            return bad("vhosts: at least one vhost is needed".into());
        }
        for u in &self.users {
            for v in &u.vhosts {
                if !self.vhosts.iter().any(|h| &h.name == v) {
                    return bad(format!("users.{}: unknown vhost '{}'", u.name, v));
                }
            }
        }
        Ok(())
    }
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

    #[test]
    fn unknown_key_is_rejected() {
        let text =
            "listen = [\"0.0.0.0:5672\"]\ndata_dir = \"x\"\nlisen = 1\n[[vhosts]]\nname=\"/\"\n";
        let err = Config::parse(text, "c.toml").unwrap_err().to_string();
        assert!(err.contains("c.toml:3:"), "{err}");
        assert!(err.contains("lisen"), "{err}");
    }
}
