//! Users, permissions, topic permissions and policies made through the management
//! API while the broker runs. They are kept in the store (one JSON note, written
//! in order with everything else) so that they survive restarts, and joined to the
//! configuration file's at start-up, after every change and on SIGHUP. What the
//! file defines belongs to the file: the API refuses to change it, so the two
//! never disagree about who owns an entry.

use serde::{Deserialize, Serialize};

use crate::config::{
    Config, PermissionConfig, PolicyConfig, TopicPermissionConfig, User, VhostConfig,
};
use crate::store::Store;

const NOTE: &str = "live-definitions";

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Live {
    #[serde(default)]
    pub vhosts: Vec<VhostConfig>,
    #[serde(default)]
    pub users: Vec<User>,
    #[serde(default)]
    pub permissions: Vec<PermissionConfig>,
    #[serde(default)]
    pub topic_permissions: Vec<TopicPermissionConfig>,
    #[serde(default)]
    pub policies: Vec<PolicyConfig>,
}

impl Live {
    /// What the store holds; an unreadable record is logged and left out (the
    /// store keeps it until the next change overwrites it).
    pub fn load(store: &dyn Store) -> Live {
        match store.note(NOTE) {
            Ok(None) => Live::default(),
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!("the users and policies made through the management API cannot be read back ({e}); they are left out");
                Live::default()
            }),
            Err(e) => {
                tracing::error!("the users and policies made through the management API cannot be read back ({e}); they are left out");
                Live::default()
            }
        }
    }

    pub fn save(&self, store: &dyn Store) -> Result<(), String> {
        let bytes = serde_json::to_vec(self).map_err(|e| e.to_string())?;
        store.put_note(NOTE, bytes);
        Ok(())
    }

    /// The file's configuration with these entries added. An entry the file now
    /// defines too (it was added to the file after the API made it) is the file's:
    /// the API's copy is left out, with a warning.
    pub fn join(&self, file: &Config) -> Config {
        let mut c = file.clone();
        for v in &self.vhosts {
            if !file.vhosts.iter().any(|f| f.name == v.name) {
                c.vhosts.push(v.clone());
            }
        }
        for u in &self.users {
            if file.users.iter().any(|f| f.name == u.name) {
                tracing::warn!("user '{}' is in the configuration file now; the one made through the management API is ignored", u.name);
            } else {
                c.users.push(u.clone());
            }
        }
        for p in &self.permissions {
            if !file
                .permissions
                .iter()
                .any(|f| f.user == p.user && f.vhost == p.vhost)
            {
                c.permissions.push(p.clone());
            }
        }
        for p in &self.topic_permissions {
            if !file
                .topic_permissions
                .iter()
                .any(|f| f.user == p.user && f.vhost == p.vhost && f.exchange == p.exchange)
            {
                c.topic_permissions.push(p.clone());
            }
        }
        for p in &self.policies {
            if !file
                .policies
                .iter()
                .any(|f| f.name == p.name && f.vhost == p.vhost)
            {
                c.policies.push(p.clone());
            }
        }
        c
    }
}
