//! Protocol errors as values. Each carries the AMQP reply code, RabbitMQ's reply
//! text form (`NOT_FOUND - no queue 'q' in vhost '/'`) and the method that caused
//! it; whether it closes a channel or the whole connection follows from the code.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpError {
    pub code: u16,
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
}

impl fmt::Display for AmqpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

impl std::error::Error for AmqpError {}

pub type AmqpResult<T> = Result<T, AmqpError>;

macro_rules! constructors {
    ($($name:ident => $code:expr, $label:expr;)*) => {
        impl AmqpError {
            $(
                pub fn $name(detail: String) -> AmqpError {
                    AmqpError { code: $code, text: format!("{} - {}", $label, detail), class_id: 0, method_id: 0 }
                }
            )*
        }
    };
}

constructors! {
    not_found => 404, "NOT_FOUND";
    access_refused => 403, "ACCESS_REFUSED";
    resource_locked => 405, "RESOURCE_LOCKED";
    precondition_failed => 406, "PRECONDITION_FAILED";
    connection_forced => 320, "CONNECTION_FORCED";
    frame_error => 501, "FRAME_ERROR";
    syntax_error => 502, "SYNTAX_ERROR";
    command_invalid => 503, "COMMAND_INVALID";
    channel_error => 504, "CHANNEL_ERROR";
    unexpected_frame => 505, "UNEXPECTED_FRAME";
    resource_error => 506, "RESOURCE_ERROR";
    not_allowed => 530, "NOT_ALLOWED";
    not_implemented => 540, "NOT_IMPLEMENTED";
    internal_error => 541, "INTERNAL_ERROR";
}

impl AmqpError {
    /// Soft errors (4xx, and 3xx replies) close only the channel; the rest close the connection.
    pub fn is_channel_error(&self) -> bool {
        matches!(self.code, 403..=406)
    }

    pub fn with_method(mut self, class_id: u16, method_id: u16) -> AmqpError {
        if self.class_id == 0 {
            self.class_id = class_id;
            self.method_id = method_id;
        }
        self
    }
}

/// Quotes a resource the way RabbitMQ does in reply texts: `queue 'q' in vhost '/'`.
pub fn queue_name(name: &str, vhost: &str) -> String {
    format!("queue '{name}' in vhost '{vhost}'")
}

pub fn exchange_name(name: &str, vhost: &str) -> String {
    format!("exchange '{name}' in vhost '{vhost}'")
}
