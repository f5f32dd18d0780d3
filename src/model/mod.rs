//! The model of a broker's virtual hosts: exchanges, queues, the bindings between
//! them, messages, and what happens to messages that die. Nothing here knows
//! about connections or channels: queues deliver through the [`queue::Deliver`]
//! trait that the session layer implements, and topology changes arrive as
//! [`change::Change`] values whoever makes them.

mod bindings;
pub mod change;
pub mod dead_letter;
pub mod delayed;
pub mod exchange;
pub mod housekeeper;
pub mod message;
mod persist;
pub mod pmap;
pub mod policy;
pub mod queue;
pub mod recovery;
pub mod stats;
pub mod topology;
pub mod values;
pub mod vhost;

pub use recovery::Recovered;
