//! Policies, as RabbitMQ's: an operator's settings for every queue (or exchange)
//! whose name matches a pattern, applied to those that exist and those declared
//! later, and changed without redeclaring anything. Of the policies that match,
//! the one of highest priority applies. Against a queue's own x-arguments,
//! numeric limits take the smaller value and the argument wins for the others
//! (rabbit_queue_type_util's `args_policy_lookup` with `res_min` / `res_arg`).

use std::sync::Arc;

use regex::Regex;

use super::queue::{Overflow, QueueArgs};
use crate::config::PolicyConfig;

/// What a policy applies to (`apply-to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyTo {
    All,
    Queues,
    ClassicQueues,
    QuorumQueues,
    Streams,
    Exchanges,
}

/// The kind of entity a policy is matched against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    ClassicQueue,
    QuorumQueue,
    Exchange,
}

impl ApplyTo {
    fn parse(s: &str) -> Option<ApplyTo> {
        Some(match s {
            "all" => ApplyTo::All,
            "queues" => ApplyTo::Queues,
            "classic_queues" => ApplyTo::ClassicQueues,
            "quorum_queues" => ApplyTo::QuorumQueues,
            "streams" => ApplyTo::Streams,
            "exchanges" => ApplyTo::Exchanges,
            _ => return None,
        })
    }

    fn covers(self, t: Target) -> bool {
        match self {
            ApplyTo::All => true,
            ApplyTo::Queues => t != Target::Exchange,
            ApplyTo::ClassicQueues => t == Target::ClassicQueue,
            ApplyTo::QuorumQueues => t == Target::QuorumQueue,
            ApplyTo::Streams => false,
            ApplyTo::Exchanges => t == Target::Exchange,
        }
    }
}

/// The keys of a policy's definition that the broker acts on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Definition {
    pub message_ttl: Option<u64>,
    pub expires: Option<u64>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Option<Overflow>,
    pub dead_letter_exchange: Option<Arc<str>>,
    pub dead_letter_routing_key: Option<Arc<str>>,
    pub alternate_exchange: Option<Arc<str>>,
    /// Quorum queues' delivery limit (the smaller of this and x-delivery-limit).
    pub delivery_limit: Option<u64>,
    /// Acknowledgement timeout in ms (the smaller of this and x-consumer-timeout).
    pub consumer_timeout: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub name: Arc<str>,
    pub pattern: Regex,
    pub apply_to: ApplyTo,
    pub priority: i64,
    pub definition: Definition,
}

/// Keys RabbitMQ accepts whose effect this broker does not have (mirroring,
/// federation, streams, quorum queues' memory limits and storage hints): accepted,
/// so that RabbitMQ's policies load, and named in a warning.
const IGNORED: &[&str] = &[
    "queue-mode",
    "queue-version",
    "ha-mode",
    "ha-params",
    "ha-sync-mode",
    "ha-sync-batch-size",
    "ha-promote-on-shutdown",
    "ha-promote-on-failure",
    "federation-upstream",
    "federation-upstream-set",
    "queue-master-locator",
    "queue-leader-locator",
    "max-in-memory-length",
    "max-in-memory-bytes",
    "max-age",
    "stream-max-segment-size-bytes",
    "dead-letter-strategy",
];

impl Policy {
    /// Checks a `[[policies]]` entry as RabbitMQ's validators do. Returns the
    /// policy and the keys it carries that have no effect here.
    pub fn from_config(p: &PolicyConfig) -> Result<(Policy, Vec<String>), String> {
        let pattern = Regex::new(&p.pattern)
            .map_err(|e| format!("pattern: not a regular expression: {e}"))?;
        let apply_to = ApplyTo::parse(&p.apply_to).ok_or_else(|| {
            format!(
                "apply-to: '{}' is not one of all, queues, classic_queues, quorum_queues, streams, exchanges",
                p.apply_to
            )
        })?;
        if p.definition.is_empty() {
            return Err("definition: empty".into());
        }
        let mut d = Definition::default();
        let mut ignored = Vec::new();
        for (key, value) in &p.definition {
            let int = |min: i64| match value.as_integer() {
                Some(n) if n >= min => Ok(n as u64),
                _ => Err(format!(
                    "definition: {key}: {value} is not an integer of at least {min}"
                )),
            };
            let text = || match value.as_str() {
                Some(s) => Ok(Some(Arc::<str>::from(s))),
                None => Err(format!("definition: {key}: {value} is not a string")),
            };
            match key.as_str() {
                "message-ttl" => d.message_ttl = Some(int(0)?),
                "expires" => d.expires = Some(int(1)?),
                "max-length" => d.max_length = Some(int(0)?),
                "max-length-bytes" => d.max_length_bytes = Some(int(0)?),
                "overflow" => {
                    d.overflow = Some(match value.as_str() {
                        Some("drop-head") => Overflow::DropHead,
                        Some("reject-publish") => Overflow::RejectPublish,
                        Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
                        _ => {
                            return Err(format!(
                            "definition: overflow: {value} is not one of drop-head, reject-publish, reject-publish-dlx"
                        ))
                        }
                    })
                }
                "dead-letter-exchange" => d.dead_letter_exchange = text()?,
                "dead-letter-routing-key" => d.dead_letter_routing_key = text()?,
                "alternate-exchange" => d.alternate_exchange = text()?,
                "delivery-limit" => d.delivery_limit = Some(int(0)?),
                "consumer-timeout" => d.consumer_timeout = Some(int(0)?),
                k if IGNORED.contains(&k) => ignored.push(k.to_string()),
                k => return Err(format!("definition: unknown key '{k}'")),
            }
        }
        let policy = Policy {
            name: p.name.as_str().into(),
            pattern,
            apply_to,
            priority: p.priority,
            definition: d,
        };
        Ok((policy, ignored))
    }
}

/// The policy that applies to `name`: the matching one of highest priority (the
/// first in the list among equals, so the outcome does not depend on hashing).
pub fn matching<'a>(policies: &'a [Policy], name: &str, target: Target) -> Option<&'a Policy> {
    let mut best: Option<&Policy> = None;
    for p in policies {
        if p.apply_to.covers(target)
            && p.pattern.is_match(name)
            && best.is_none_or(|b| p.priority > b.priority)
        {
            best = Some(p);
        }
    }
    best
}

/// A queue's effective settings: its declared arguments with the policy applied.
pub fn effective(declared: &QueueArgs, policy: Option<&Definition>) -> QueueArgs {
    let Some(p) = policy else {
        return declared.clone();
    };
    let min = |arg: Option<u64>, pol: Option<u64>| match (arg, pol) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    QueueArgs {
        message_ttl: min(declared.message_ttl, p.message_ttl),
        expires: min(declared.expires, p.expires),
        max_length: min(declared.max_length, p.max_length),
        max_length_bytes: min(declared.max_length_bytes, p.max_length_bytes),
        delivery_limit: min(declared.delivery_limit, p.delivery_limit),
        consumer_timeout: min(declared.consumer_timeout, p.consumer_timeout),
        overflow: match (declared.overflow_declared, p.overflow) {
            (false, Some(o)) => o,
            _ => declared.overflow,
        },
        dead_letter_exchange: declared
            .dead_letter_exchange
            .clone()
            .or_else(|| p.dead_letter_exchange.clone()),
        dead_letter_routing_key: declared
            .dead_letter_routing_key
            .clone()
            .or_else(|| p.dead_letter_routing_key.clone()),
        ..declared.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, pattern: &str, priority: i64, def: &str) -> Policy {
        let cfg = PolicyConfig {
            name: name.into(),
            vhost: "/".into(),
            pattern: pattern.into(),
            apply_to: "all".into(),
            priority,
            definition: toml::from_str(def).unwrap(),
        };
        Policy::from_config(&cfg).unwrap().0
    }

    #[test]
    fn the_highest_priority_match_applies() {
        let ps = vec![
            policy("low", "^q", 0, "max-length = 5"),
            policy("high", "^q\\.", 10, "max-length = 7"),
            policy("other", "^x", 99, "max-length = 9"),
        ];
        let p = matching(&ps, "q.1", Target::ClassicQueue).unwrap();
        assert_eq!(&*p.name, "high");
        assert_eq!(
            &*matching(&ps, "q1", Target::ClassicQueue).unwrap().name,
            "low"
        );
        assert!(matching(&ps, "z", Target::ClassicQueue).is_none());
    }

    #[test]
    fn limits_take_the_smaller_and_arguments_win_the_rest() {
        let p = policy(
            "p",
            ".*",
            0,
            "max-length = 10\nmessage-ttl = 500\ndead-letter-exchange = \"pol\"\noverflow = \"reject-publish\"",
        );
        let declared = QueueArgs {
            max_length: Some(20),
            message_ttl: Some(100),
            dead_letter_exchange: Some("arg".into()),
            ..QueueArgs::default()
        };
        let e = effective(&declared, Some(&p.definition));
        assert_eq!(e.max_length, Some(10));
        assert_eq!(e.message_ttl, Some(100));
        assert_eq!(e.dead_letter_exchange.as_deref(), Some("arg"));
        assert_eq!(e.overflow, Overflow::RejectPublish);
    }

    #[test]
    fn bad_definitions_are_refused_and_foreign_keys_named() {
        let cfg = |def: &str| PolicyConfig {
            name: "p".into(),
            vhost: "/".into(),
            pattern: ".*".into(),
            apply_to: "queues".into(),
            priority: 0,
            definition: toml::from_str(def).unwrap(),
        };
        assert!(Policy::from_config(&cfg("expires = 0")).is_err());
        assert!(Policy::from_config(&cfg("max-length = \"ten\"")).is_err());
        assert!(Policy::from_config(&cfg("colour = \"blue\"")).is_err());
        let (_, ignored) = Policy::from_config(&cfg("ha-mode = \"all\"\nmax-length = 1")).unwrap();
        assert_eq!(ignored, vec!["ha-mode".to_string()]);
    }
}
