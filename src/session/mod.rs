//! The session layer: client connections and their channels. A connection task
//! reads frames and hands them to its channels; channels turn AMQP methods into
//! topology changes, publishes and deliveries on the model; an outbox per
//! connection gathers what goes back out.

pub mod channel;
pub mod connection;
pub mod context;
pub mod delivery;
pub mod outbox;
pub mod shared;
pub mod transport;
