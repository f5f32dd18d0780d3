//! WarrenMQ: an AMQP 0-9-1 message broker that RabbitMQ clients use unchanged.
//! See ARCHITECTURE.md for the path of a message through these modules.
pub mod auth;
pub mod broker;
pub mod config;
pub mod declare;
pub mod definitions;
pub mod disk;
pub mod error;
pub mod live;
pub mod management;
pub mod memory;
pub mod model;
pub mod protocol;
pub mod session;
pub mod store;
pub mod tls;
mod varint;

pub use broker::{start, BrokerHandle};
pub use config::Config;
