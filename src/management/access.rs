//! The management API's write side for users, permissions, topic permissions and
//! policies. Changes are kept in the store (`crate::live`) and applied as a SIGHUP
//! applies the file's: a new user logs in at once, a policy applies to existing
//! queues at once. Entries the configuration file defines are the file's, and the
//! API refuses to change them, naming the file.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::{ApiError, Caller, Role};
use crate::config::{Config, PermissionConfig, PolicyConfig, TopicPermissionConfig, User};
use crate::live::Live;
use crate::session::context::BrokerState;

type St = State<Arc<BrokerState>>;

use super::write::json_body as body;

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

fn file_owned(what: String) -> ApiError {
    ApiError::bad_request(format!(
        "{what} is defined in the configuration file: change it there (and send SIGHUP)"
    ))
}

/// Applies one change to what the API has made: checked as start-up checks the
/// configuration, stored, then applied. Returns whether an entry was created.
async fn change(
    s: &BrokerState,
    f: impl FnOnce(&mut Live, &Config) -> Result<bool, ApiError>,
) -> Result<bool, ApiError> {
    let created = {
        let mut live = s.live.lock().unwrap_or_else(|p| p.into_inner());
        let file = s.file_config.load();
        let mut next = live.clone();
        let created = f(&mut next, &file)?;
        let joined = next.join(&file);
        joined.check().map_err(ApiError::bad_request)?;
        next.save(&*s.store).map_err(ApiError::internal)?;
        *live = next;
        s.refresh(&joined);
        created
    };
    s.store
        .synced()
        .await
        .map_err(|e| ApiError::internal(format!("store failure: {e}")))?;
    Ok(created)
}

/// Policies are for administrators and policymakers (not monitoring users).
fn may_set_policies(c: &super::Caller) -> Result<(), ApiError> {
    let tagged = |t: &str| c.user.tags.iter().any(|x| x == t);
    if tagged("administrator") || tagged("policymaker") {
        Ok(())
    } else {
        Err(ApiError::not_authorised("Not policymaker user"))
    }
}

/// Replaces the entry `same` finds, or adds `entry`; true when added.
fn upsert<T>(list: &mut Vec<T>, same: impl Fn(&T) -> bool, entry: T) -> bool {
    match list.iter_mut().find(|e| same(e)) {
        Some(e) => {
            *e = entry;
            false
        }
        None => {
            list.push(entry);
            true
        }
    }
}

/// Removes what `same` finds; 404 when nothing was there.
fn remove<T>(list: &mut Vec<T>, same: impl Fn(&T) -> bool) -> Result<(), ApiError> {
    let before = list.len();
    list.retain(|e| !same(e));
    if list.len() == before {
        return Err(ApiError::not_found());
    }
    Ok(())
}

fn created_or_updated(created: bool) -> Response {
    if created {
        StatusCode::CREATED.into_response()
    } else {
        StatusCode::NO_CONTENT.into_response()
    }
}

/// RabbitMQ's tags: "a,b" or a list.
fn tags(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

pub async fn put_user(
    State(s): St,
    c: Caller,
    Path(name): Path<String>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    c.require(Role::Administrator)?;
    let b = body(&raw)?;
    let (hash, algorithm) = match (text(&b, "password"), text(&b, "password_hash")) {
        (Some(password), _) => {
            let salt = crate::auth::random_salt()
                .map_err(|e| ApiError::internal(format!("no random salt: {e}")))?;
            (
                crate::auth::hash_password(password.as_bytes(), salt),
                "rabbit_password_hashing_sha256".to_string(),
            )
        }
        (None, Some(hash)) => (
            hash,
            text(&b, "hashing_algorithm")
                .unwrap_or_else(|| "rabbit_password_hashing_sha256".into()),
        ),
        (None, None) => {
            return Err(ApiError::bad_request(
                "Must specify password or password_hash".into(),
            ))
        }
    };
    let user = User {
        name: name.clone(),
        password: None,
        password_hash: Some(hash),
        hashing_algorithm: algorithm,
        tags: tags(b.get("tags")),
        loopback_only: false,
        vhosts: Vec::new(),
        max_connections: None,
        max_channels: None,
    };
    let created = change(&s, |live, file| {
        if file.users.iter().any(|u| u.name == name) {
            return Err(file_owned(format!("user '{name}'")));
        }
        Ok(upsert(&mut live.users, |u| u.name == name, user))
    })
    .await?;
    Ok(created_or_updated(created))
}

pub async fn delete_user(
    State(s): St,
    c: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    c.require(Role::Administrator)?;
    change(&s, |live, file| {
        if file.users.iter().any(|u| u.name == name) {
            return Err(file_owned(format!("user '{name}'")));
        }
        remove(&mut live.users, |u| u.name == name)?;
        live.permissions.retain(|p| p.user != name);
        live.topic_permissions.retain(|p| p.user != name);
        Ok(false)
    })
    .await?;
    // As RabbitMQ: a deleted user's connections are closed.
    for conn in s.connections() {
        if conn.user() == name {
            conn.request_close(format!("user '{name}' is deleted"));
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn put_permissions(
    State(s): St,
    c: Caller,
    Path((vhost, user)): Path<(String, String)>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    c.require(Role::Administrator)?;
    let b = body(&raw)?;
    let entry = PermissionConfig {
        user: user.clone(),
        vhost: vhost.clone(),
        configure: text(&b, "configure").unwrap_or_default(),
        write: text(&b, "write").unwrap_or_default(),
        read: text(&b, "read").unwrap_or_default(),
    };
    let created = change(&s, |live, file| {
        if file
            .permissions
            .iter()
            .any(|p| p.user == user && p.vhost == vhost)
        {
            return Err(file_owned(format!(
                "the permissions of user '{user}' in vhost '{vhost}'"
            )));
        }
        Ok(upsert(
            &mut live.permissions,
            |p| p.user == user && p.vhost == vhost,
            entry,
        ))
    })
    .await?;
    Ok(created_or_updated(created))
}

pub async fn delete_permissions(
    State(s): St,
    c: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    c.require(Role::Administrator)?;
    change(&s, |live, file| {
        if file
            .permissions
            .iter()
            .any(|p| p.user == user && p.vhost == vhost)
        {
            return Err(file_owned(format!(
                "the permissions of user '{user}' in vhost '{vhost}'"
            )));
        }
        remove(&mut live.permissions, |p| {
            p.user == user && p.vhost == vhost
        })?;
        Ok(false)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn put_topic_permissions(
    State(s): St,
    c: Caller,
    Path((vhost, user)): Path<(String, String)>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    c.require(Role::Administrator)?;
    let b = body(&raw)?;
    let Some(exchange) = text(&b, "exchange") else {
        return Err(ApiError::bad_request("exchange is required".into()));
    };
    let entry = TopicPermissionConfig {
        user: user.clone(),
        vhost: vhost.clone(),
        exchange: exchange.clone(),
        write: text(&b, "write").unwrap_or_default(),
        read: text(&b, "read").unwrap_or_default(),
    };
    let same = move |p: &TopicPermissionConfig| {
        p.user == user && p.vhost == vhost && p.exchange == exchange
    };
    let created = change(&s, |live, file| {
        if file.topic_permissions.iter().any(&same) {
            return Err(file_owned("these topic permissions".into()));
        }
        Ok(upsert(&mut live.topic_permissions, &same, entry))
    })
    .await?;
    Ok(created_or_updated(created))
}

pub async fn delete_topic_permissions(
    State(s): St,
    c: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    c.require(Role::Administrator)?;
    change(&s, |live, _| {
        remove(&mut live.topic_permissions, |p| {
            p.user == user && p.vhost == vhost
        })?;
        Ok(false)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn put_policy(
    State(s): St,
    c: Caller,
    Path((vhost, name)): Path<(String, String)>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    may_set_policies(&c)?;
    if !c.sees_vhost(&s, &vhost) {
        return Err(ApiError::not_authorised("Access refused."));
    }
    let b = body(&raw)?;
    let Some(pattern) = text(&b, "pattern") else {
        return Err(ApiError::bad_request("pattern is required".into()));
    };
    let definition: toml::Table = match b.get("definition") {
        Some(d) => serde_json::from_value(d.clone())
            .map_err(|e| ApiError::bad_request(format!("definition: {e}")))?,
        None => return Err(ApiError::bad_request("definition is required".into())),
    };
    let priority = match b.get("priority") {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        Some(Value::String(s)) => s.trim().parse().unwrap_or(0),
        _ => 0,
    };
    let entry = PolicyConfig {
        name: name.clone(),
        vhost: vhost.clone(),
        pattern,
        apply_to: text(&b, "apply-to").unwrap_or_else(|| "all".into()),
        priority,
        definition,
    };
    let created = change(&s, |live, file| {
        if file
            .policies
            .iter()
            .any(|p| p.name == name && p.vhost == vhost)
        {
            return Err(file_owned(format!("policy '{name}' in vhost '{vhost}'")));
        }
        Ok(upsert(
            &mut live.policies,
            |p| p.name == name && p.vhost == vhost,
            entry,
        ))
    })
    .await?;
    Ok(created_or_updated(created))
}

pub async fn delete_policy(
    State(s): St,
    c: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    may_set_policies(&c)?;
    if !c.sees_vhost(&s, &vhost) {
        return Err(ApiError::not_authorised("Access refused."));
    }
    change(&s, |live, file| {
        if file
            .policies
            .iter()
            .any(|p| p.name == name && p.vhost == vhost)
        {
            return Err(file_owned(format!("policy '{name}' in vhost '{vhost}'")));
        }
        remove(&mut live.policies, |p| p.name == name && p.vhost == vhost)?;
        Ok(false)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn put_vhost(
    State(s): St,
    c: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    c.require(Role::Administrator)?;
    if name.is_empty() {
        return Err(ApiError::bad_request("a vhost needs a name".into()));
    }
    if s.vhost(&name).is_some() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    // Kept first, so that a vhost that exists is always one the store knows.
    let created = change(&s, |live, file| {
        if file.vhosts.iter().any(|v| v.name == name) {
            return Err(file_owned(format!("vhost '{name}'")));
        }
        if live.vhosts.iter().any(|v| v.name == name) {
            return Ok(false);
        }
        live.vhosts.push(crate::config::VhostConfig {
            name: name.clone(),
            max_connections: None,
            max_queues: None,
        });
        Ok(true)
    })
    .await?;
    s.add_vhost(&name)
        .await
        .map_err(|e| ApiError::internal(format!("vhost '{name}' could not be started: {e}")))?;
    // Its limits and the policies that name it apply now that it exists.
    s.refresh(&s.current.load());
    Ok(created_or_updated(created))
}

pub async fn delete_vhost(
    State(s): St,
    c: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    c.require(Role::Administrator)?;
    change(&s, |live, file| {
        if file.vhosts.iter().any(|v| v.name == name) {
            return Err(file_owned(format!("vhost '{name}'")));
        }
        remove(&mut live.vhosts, |v| v.name == name)?;
        live.permissions.retain(|p| p.vhost != name);
        live.topic_permissions.retain(|p| p.vhost != name);
        live.policies.retain(|p| p.vhost != name);
        Ok(false)
    })
    .await?;
    s.remove_vhost(&name);
    s.store
        .synced()
        .await
        .map_err(|e| ApiError::internal(format!("store failure: {e}")))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// POST /api/definitions: a RabbitMQ definitions export joins what the API has
/// made (vhosts, users, permissions, topic permissions, policies), and its
/// exchanges, queues and bindings are declared. What the configuration file
/// defines is left as the file has it, and named in a warning; what the broker
/// has no equivalent for is named in a warning too. Refused declarations are
/// reported (400) after the rest has been applied, as RabbitMQ's import reports.
pub async fn post_definitions(
    State(s): St,
    c: Caller,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    c.require(Role::Administrator)?;
    let text = std::str::from_utf8(&raw)
        .map_err(|_| ApiError::bad_request("definitions: not UTF-8".into()))?;
    let d = crate::definitions::parse(text, "definitions")
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if let Some(w) = d.warning("POST /api/definitions") {
        tracing::warn!("{w}");
    }
    let mut kept = Vec::new();
    change(&s, |live, file| {
        for v in &d.vhosts {
            if file.vhosts.iter().any(|f| f.name == v.name) {
                kept.push(format!("vhost '{}'", v.name));
            } else {
                upsert(&mut live.vhosts, |x| x.name == v.name, v.clone());
            }
        }
        for u in &d.users {
            if file.users.iter().any(|f| f.name == u.name) {
                kept.push(format!("user '{}'", u.name));
            } else {
                upsert(&mut live.users, |x| x.name == u.name, u.clone());
            }
        }
        for p in &d.permissions {
            let same = |x: &PermissionConfig| x.user == p.user && x.vhost == p.vhost;
            if file.permissions.iter().any(same) {
                kept.push(format!("permissions of '{}' in '{}'", p.user, p.vhost));
            } else {
                upsert(&mut live.permissions, same, p.clone());
            }
        }
        for p in &d.topic_permissions {
            let same = |x: &TopicPermissionConfig| {
                x.user == p.user && x.vhost == p.vhost && x.exchange == p.exchange
            };
            if file.topic_permissions.iter().any(same) {
                kept.push(format!(
                    "topic permissions of '{}' in '{}'",
                    p.user, p.vhost
                ));
            } else {
                upsert(&mut live.topic_permissions, same, p.clone());
            }
        }
        for p in &d.policies {
            let same = |x: &PolicyConfig| x.name == p.name && x.vhost == p.vhost;
            if file.policies.iter().any(same) {
                kept.push(format!("policy '{}' in '{}'", p.name, p.vhost));
            } else {
                upsert(&mut live.policies, same, p.clone());
            }
        }
        Ok(true)
    })
    .await?;
    if !kept.is_empty() {
        tracing::warn!(
            "POST /api/definitions: the configuration file's own left as they are: {}",
            kept.join(", ")
        );
    }
    for v in &d.vhosts {
        if s.vhost(&v.name).is_none() {
            s.add_vhost(&v.name).await.map_err(|e| {
                ApiError::internal(format!("vhost '{}' could not be started: {e}", v.name))
            })?;
        }
    }
    s.refresh(&s.current.load());
    let mut topology = (**s.current.load()).clone();
    topology.origin = None;
    topology.exchanges = d.exchanges;
    topology.queues = d.queues;
    topology.bindings = d.bindings;
    let refused = crate::declare::apply_collecting(&topology, &s.vhost_map());
    s.store
        .synced()
        .await
        .map_err(|e| ApiError::internal(format!("store failure: {e}")))?;
    if !refused.is_empty() {
        return Err(ApiError::bad_request(refused.join("; ")));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
