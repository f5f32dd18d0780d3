//! WarrenMQ: an AMQP 0-9-1 message broker that RabbitMQ clients use unchanged.
//! See ARCHITECTURE.md for the path of a message through these modules.
pub mod auth;
pub mod broker;
pub mod channel;
pub mod config;
pub mod connection;
pub mod error;
pub mod exchange;
pub mod message;
pub mod outbox;
pub mod protocol;
pub mod queue;
pub mod store;
pub mod vhost;

pub use broker::{start, BrokerHandle};
pub use config::Config;
