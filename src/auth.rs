//! Who may connect: SASL PLAIN and AMQPLAIN responses checked against the users in
//! the configuration. As in RabbitMQ, a user may be restricted to loopback clients.
//! Failed logins are slowed down per client address (`LoginThrottle`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use amq_protocol::types::parsing::parse_field_table;
use amq_protocol::types::AMQPValue;
use sha2::{Digest, Sha256};

use crate::config::User;

/// `\0user\0password` (an authorization identity before the first NUL is ignored).
pub fn parse_plain(response: &[u8]) -> Option<(String, String)> {
    let mut parts = response.split(|b| *b == 0);
    let _authzid = parts.next()?;
    let user = parts.next()?;
    let pass = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    Some((
        String::from_utf8(user.to_vec()).ok()?,
        String::from_utf8(pass.to_vec()).ok()?,
    ))
}

/// A field table without its length prefix, holding LOGIN and PASSWORD.
pub fn parse_amqplain(response: &[u8]) -> Option<(String, String)> {
    let mut framed = Vec::with_capacity(response.len() + 4);
    framed.extend_from_slice(&(response.len() as u32).to_be_bytes());
    framed.extend_from_slice(response);
    // Unauthenticated bytes: bound the table before the recursive decoder sees it.
    crate::protocol::walk_table(&framed, 0, &crate::protocol::TableLimits::default()).ok()?;
    let (_, table) = parse_field_table(&framed[..]).ok()?;
    let text = |k: &str| match table.inner().get(k)? {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    };
    Some((text("LOGIN")?, text("PASSWORD")?))
}

/// A user's secret as configured: plain text, or RabbitMQ's salted hash.
pub enum Credential {
    Plain(Vec<u8>),
    /// An empty `password_hash`, as RabbitMQ exports a user whose password was
    /// cleared: no password logs in.
    NoPassword,
    Hashed {
        algorithm: Hashing,
        salt: [u8; 4],
        hash: Vec<u8>,
    },
}

/// RabbitMQ's password hashing modules. MD5 is RabbitMQ's legacy one (users made
/// before 3.6, or with `password_hashing_module = rabbit_password_hashing_md5`):
/// their exported hashes log in here too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hashing {
    Sha256,
    Sha512,
    Md5,
}

impl Hashing {
    pub fn parse(name: &str) -> Option<Hashing> {
        match name {
            "rabbit_password_hashing_sha256" => Some(Hashing::Sha256),
            "rabbit_password_hashing_sha512" => Some(Hashing::Sha512),
            "rabbit_password_hashing_md5" => Some(Hashing::Md5),
            _ => None,
        }
    }

    fn digest(self, salt: &[u8; 4], password: &[u8]) -> Vec<u8> {
        match self {
            Hashing::Sha256 => Sha256::new()
                .chain_update(salt)
                .chain_update(password)
                .finalize()
                .to_vec(),
            Hashing::Sha512 => sha2::Sha512::new()
                .chain_update(salt)
                .chain_update(password)
                .finalize()
                .to_vec(),
            Hashing::Md5 => md5::Md5::new()
                .chain_update(salt)
                .chain_update(password)
                .finalize()
                .to_vec(),
        }
    }

    fn len(self) -> usize {
        match self {
            Hashing::Sha256 => 32,
            Hashing::Sha512 => 64,
            Hashing::Md5 => 16,
        }
    }
}

impl Credential {
    /// A `password_hash` as RabbitMQ writes it: base64 of salt + digest; "" for a
    /// user without a password.
    pub fn hashed(text: &str, algorithm: &str) -> Result<Credential, String> {
        use base64::Engine;
        let algorithm = Hashing::parse(algorithm).ok_or_else(|| {
            format!("unsupported hashing_algorithm '{algorithm}' (rabbit_password_hashing_sha256, rabbit_password_hashing_sha512 or rabbit_password_hashing_md5)")
        })?;
        if text.trim().is_empty() {
            return Ok(Credential::NoPassword);
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| format!("password_hash is not base64: {e}"))?;
        if bytes.len() != 4 + algorithm.len() {
            return Err(format!(
                "password_hash is {} bytes long; {algorithm:?} hashes are {} (a 4-byte salt and the digest)",
                bytes.len(),
                4 + algorithm.len()
            ));
        }
        let mut salt = [0u8; 4];
        salt.copy_from_slice(&bytes[..4]);
        Ok(Credential::Hashed {
            algorithm,
            salt,
            hash: bytes[4..].to_vec(),
        })
    }

    pub fn of(user: &User) -> Option<Credential> {
        match (&user.password, &user.password_hash) {
            (Some(p), None) => Some(Credential::Plain(p.as_bytes().to_vec())),
            (None, Some(h)) => Credential::hashed(h, &user.hashing_algorithm).ok(),
            _ => None,
        }
    }

    /// Whether `password` is this secret, in time independent of where they differ.
    fn matches(&self, password: &[u8], password_digest: &[u8; 32]) -> bool {
        match self {
            Credential::Plain(p) => digests_eq(&digest(p), password_digest),
            Credential::NoPassword => false,
            Credential::Hashed {
                algorithm,
                salt,
                hash,
            } => {
                let got = algorithm.digest(salt, password);
                got.len() == hash.len()
                    && got.iter().zip(hash).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
            }
        }
    }
}

/// A new `password_hash` for `password` in RabbitMQ's default format
/// (`rabbit_password_hashing_sha256`), with the given salt.
pub fn hash_password(password: &[u8], salt: [u8; 4]) -> String {
    use base64::Engine;
    let mut out = salt.to_vec();
    out.extend(Hashing::Sha256.digest(&salt, password));
    base64::engine::general_purpose::STANDARD.encode(out)
}

/// A fresh random salt for `hash_password`, from the operating system.
pub fn random_salt() -> std::io::Result<[u8; 4]> {
    use std::io::Read;
    let mut salt = [0u8; 4];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut salt))?;
    Ok(salt)
}

/// What a permission is checked for, as in RabbitMQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Declaring and deleting.
    Configure,
    /// Publishing to an exchange, binding to a destination.
    Write,
    /// Consuming, getting and purging; the source of a binding.
    Read,
}

/// A user's permissions in one vhost, compiled. RabbitMQ matches each regular
/// expression anywhere in the name (not anchored) and reads "" as "nothing". The
/// usual ".*" needs no regex run: publishes check it per message.
#[derive(Debug)]
pub struct Permissions {
    configure: Rule,
    write: Rule,
    read: Rule,
}

#[derive(Debug)]
enum Rule {
    Nothing,
    Everything,
    Pattern(regex::Regex),
}

impl Rule {
    fn new(re: &str) -> Result<Rule, regex::Error> {
        Ok(match re {
            "" => Rule::Nothing,
            ".*" => Rule::Everything,
            re => Rule::Pattern(regex::Regex::new(re)?),
        })
    }

    fn allows(&self, name: &str) -> bool {
        match self {
            Rule::Nothing => false,
            Rule::Everything => true,
            Rule::Pattern(re) => re.is_match(name),
        }
    }
}

impl Permissions {
    /// Everything: a user granted a vhost by its `vhosts` list alone.
    pub fn all() -> Permissions {
        Permissions {
            configure: Rule::Everything,
            write: Rule::Everything,
            read: Rule::Everything,
        }
    }

    pub fn new(configure: &str, write: &str, read: &str) -> Result<Permissions, regex::Error> {
        Ok(Permissions {
            configure: Rule::new(configure)?,
            write: Rule::new(write)?,
            read: Rule::new(read)?,
        })
    }

    pub fn allows(&self, access: Access, name: &str) -> bool {
        match access {
            Access::Configure => self.configure.allows(name),
            Access::Write => self.write.allows(name),
            Access::Read => self.read.allows(name),
        }
    }
}

/// A user's topic permissions in one vhost: per topic exchange, patterns that a
/// routing key must match to publish (write) or bind (read). An exchange without an
/// entry allows every key, as in RabbitMQ.
#[derive(Debug, Default)]
pub struct TopicPermissions {
    by_exchange: HashMap<String, (Rule, Rule)>,
}

impl TopicPermissions {
    pub fn is_empty(&self) -> bool {
        self.by_exchange.is_empty()
    }

    pub fn allows(&self, access: Access, exchange: &str, routing_key: &str) -> bool {
        match (self.by_exchange.get(exchange), access) {
            (None, _) => true,
            (Some((write, _)), Access::Write) => write.allows(routing_key),
            (Some((_, read)), _) => read.allows(routing_key),
        }
    }
}

/// Topic permissions per (user, vhost).
pub type TopicTable = HashMap<(String, String), std::sync::Arc<TopicPermissions>>;

/// Compiles `[[topic_permissions]]`. As RabbitMQ's internal backend: `{username}`
/// and `{vhost}` in a pattern stand for the user and vhost, and "" matches only
/// the empty routing key.
pub fn topic_table(entries: &[crate::config::TopicPermissionConfig]) -> TopicTable {
    let mut table: HashMap<(String, String), TopicPermissions> = HashMap::new();
    for p in entries {
        let rule = |re: &str| {
            let re = re
                .replace("{username}", &p.user)
                .replace("{vhost}", &p.vhost);
            match re.as_str() {
                "" => Rule::new("^$"),
                re => Rule::new(re),
            }
        };
        // Validated with the configuration; an entry that does not compile here
        // (a variable that made it invalid) allows nothing.
        let write = rule(&p.write).unwrap_or(Rule::Nothing);
        let read = rule(&p.read).unwrap_or(Rule::Nothing);
        table
            .entry((p.user.clone(), p.vhost.clone()))
            .or_default()
            .by_exchange
            .insert(p.exchange.clone(), (write, read));
    }
    table
        .into_iter()
        .map(|(k, v)| (k, std::sync::Arc::new(v)))
        .collect()
}

/// Every user's permissions per vhost, from the configuration.
pub type PermissionTable = HashMap<(String, String), std::sync::Arc<Permissions>>;

pub fn permission_table(entries: &[crate::config::PermissionConfig]) -> PermissionTable {
    entries
        .iter()
        .filter_map(|p| {
            // Validated with the configuration: an entry that does not compile
            // here cannot happen, and would grant nothing.
            let perms = Permissions::new(&p.configure, &p.write, &p.read).ok()?;
            Some((
                (p.user.clone(), p.vhost.clone()),
                std::sync::Arc::new(perms),
            ))
        })
        .collect()
}

pub enum AuthFailure {
    BadCredentials,
    NotFromLoopback,
}

pub fn authenticate<'a>(
    users: &'a [User],
    mechanism: &str,
    response: &[u8],
    peer: IpAddr,
) -> Result<&'a User, AuthFailure> {
    let creds = match mechanism {
        "PLAIN" => parse_plain(response),
        "AMQPLAIN" => parse_amqplain(response),
        _ => None,
    };
    let (name, password) = creds.ok_or(AuthFailure::BadCredentials)?;
    let (name, pass) = (digest(name.as_bytes()), digest(password.as_bytes()));
    // Every user is checked, whatever matched, so that the time taken tells neither
    // whether the name exists nor anything about its password.
    let mut found = None;
    for u in users {
        let secret = Credential::of(u);
        let hit = digests_eq(&digest(u.name.as_bytes()), &name)
            & secret.is_some_and(|c| c.matches(password.as_bytes(), &pass));
        if hit && found.is_none() {
            found = Some(u);
        }
    }
    let user = found.ok_or(AuthFailure::BadCredentials)?;
    // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d.
    if user.loopback_only && !peer.to_canonical().is_loopback() {
        return Err(AuthFailure::NotFromLoopback);
    }
    Ok(user)
}

/// EXTERNAL: the user is the one a verified client certificate names (its common
/// name); the certificate stands in for the password.
pub fn authenticate_external<'a>(
    users: &'a [User],
    name: &str,
    peer: IpAddr,
) -> Result<&'a User, AuthFailure> {
    let user = users
        .iter()
        .find(|u| u.name == name)
        .ok_or(AuthFailure::BadCredentials)?;
    if user.loopback_only && !peer.to_canonical().is_loopback() {
        return Err(AuthFailure::NotFromLoopback);
    }
    Ok(user)
}

/// Secrets up to this many bytes are all hashed at the same cost.
const PADDED_LEN: usize = 256;

/// SHA-256 of the length and the secret, zero-padded to `PADDED_LEN`: the same number
/// of compression rounds for every secret up to that length, so that hashing a stored
/// password does not time its length, while the length prefix keeps "a" and "a\0" apart.
fn digest(secret: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((secret.len() as u64).to_be_bytes());
    h.update(secret);
    h.update(&[0u8; PADDED_LEN][..PADDED_LEN.saturating_sub(secret.len())]);
    h.finalize().into()
}

/// Fixed-size inputs and no early exit: the time does not depend on where they differ.
fn digests_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// How long to hold back the answer to a failed login, per client address. Like
/// RabbitMQ's pause before closing a connection whose handshake failed, it makes
/// guessing passwords slow; here the pause grows with repeated failures, up to a cap.
/// Memory is bounded: at most `capacity` addresses are tracked, the oldest go first.
pub struct LoginThrottle {
    capacity: usize,
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

impl LoginThrottle {
    /// The pause after a first failure.
    pub const FIRST_DELAY: Duration = Duration::from_secs(1);
    /// Each further failure within `WINDOW` adds this much.
    pub const STEP: Duration = Duration::from_secs(1);
    /// No failure waits longer: a client is held, never hung.
    pub const MAX_DELAY: Duration = Duration::from_secs(5);
    /// An address whose last failure is older than this starts again from `FIRST_DELAY`.
    pub const WINDOW: Duration = Duration::from_secs(60);
    /// Addresses tracked by the broker's throttle: a few hundred KiB at most.
    pub const CAPACITY: usize = 4096;

    pub fn new(capacity: usize) -> LoginThrottle {
        LoginThrottle {
            capacity: capacity.max(1),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Records a failed login from `peer` and returns how long to wait before answering.
    pub fn failed(&self, peer: IpAddr) -> Duration {
        self.failed_at(peer, Instant::now())
    }

    fn failed_at(&self, peer: IpAddr, now: Instant) -> Duration {
        let key = throttle_key(peer);
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = Failures {
            count: 1,
            last: now,
        };
        let count = match map.get_mut(&key) {
            Some(f) if now.saturating_duration_since(f.last) < Self::WINDOW => {
                f.count = f.count.saturating_add(1);
                f.last = now;
                f.count
            }
            Some(f) => {
                *f = fresh;
                1
            }
            None => {
                if map.len() >= self.capacity {
                    evict(&mut map, self.capacity, now);
                }
                map.insert(key, fresh);
                1
            }
        };
        Self::delay_for(count)
    }

    fn delay_for(failures: u32) -> Duration {
        Self::FIRST_DELAY
            .saturating_add(Self::STEP.saturating_mul(failures.saturating_sub(1)))
            .min(Self::MAX_DELAY)
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

impl Default for LoginThrottle {
    fn default() -> Self {
        LoginThrottle::new(Self::CAPACITY)
    }
}

/// Makes room for one more address: expired entries go, then the oldest.
fn evict(map: &mut HashMap<IpAddr, Failures>, capacity: usize, now: Instant) {
    map.retain(|_, f| now.saturating_duration_since(f.last) < LoginThrottle::WINDOW);
    while map.len() >= capacity {
        let Some(oldest) = map.iter().min_by_key(|(_, f)| f.last).map(|(k, _)| *k) else {
            return;
        };
        map.remove(&oldest);
    }
}

/// One IPv6 client usually holds a whole /64, so it counts as one address; IPv4
/// clients of a dual-stack listener are seen as ::ffff:a.b.c.d and count as IPv4.
fn throttle_key(peer: IpAddr) -> IpAddr {
    match peer.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapped_loopback_counts_as_loopback() {
        let users = vec![User {
            loopback_only: true,
            ..user("guest", "guest")
        }];
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(authenticate(&users, "PLAIN", b"\0guest\0guest", mapped).is_ok());
        let remote: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert!(authenticate(&users, "PLAIN", b"\0guest\0guest", remote).is_err());
    }

    fn user(name: &str, password: &str) -> User {
        User {
            name: name.into(),
            password: Some(password.into()),
            password_hash: None,
            hashing_algorithm: "rabbit_password_hashing_sha256".into(),
            tags: Vec::new(),
            loopback_only: false,
            vhosts: vec!["/".into()],
            max_connections: None,
            max_channels: None,
        }
    }

    fn hashed(name: &str, hash: &str, algorithm: &str) -> User {
        User {
            password: None,
            password_hash: Some(hash.into()),
            hashing_algorithm: algorithm.into(),
            ..user(name, "")
        }
    }

    /// Hashes made by RabbitMQ 3.10 itself
    /// (`rabbitmqctl eval 'base64:encode(rabbit_password:hash(Module, Password)).'`).
    #[test]
    fn rabbitmq_password_hashes_log_in() {
        let users = vec![
            hashed(
                "sha256",
                "g5yG+4dO1v7yUOBOIKUzgRa5/I161I7l+fe6JdUVOgg5KQbo",
                "rabbit_password_hashing_sha256",
            ),
            hashed(
                "sha512",
                "u2mb4WSjDs5t6AXU4rD6rX5kuwv9d7MbaXXDRyCoQctCoWJShf2io3F/uwixXWFOmRiunZgrIxeFbdmJFLKak4B8uoM=",
                "rabbit_password_hashing_sha512",
            ),
            hashed(
                "utf8",
                "RWf5d+CSRuph3P/WvPcK4biCbybceY3vfyrW+/oO50Kv0blr",
                "rabbit_password_hashing_sha256",
            ),
        ];
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let login = |n: &str, p: &str| {
            let r = format!("\0{n}\0{p}");
            authenticate(&users, "PLAIN", r.as_bytes(), ip).is_ok()
        };
        assert!(login("sha256", "test12"));
        assert!(!login("sha256", "test13"));
        assert!(login("sha512", "s3cret"));
        assert!(!login("sha512", "s3cre"));
        assert!(login("utf8", "grüße"));
        assert!(!login("utf8", "grusse"));
        // Ours, in RabbitMQ's format, checks the same way.
        let mine = hashed(
            "mine",
            &hash_password(b"pw", [1, 2, 3, 4]),
            "rabbit_password_hashing_sha256",
        );
        assert!(authenticate(&[mine], "PLAIN", b"\0mine\0pw", ip).is_ok());
        assert!(Credential::hashed("not base64!", "rabbit_password_hashing_sha256").is_err());
        assert!(Credential::hashed("AAAA", "rabbit_password_hashing_sha256").is_err());
        // An sha256 hash is too long for md5.
        assert!(Credential::hashed(
            "g5yG+4dO1v7yUOBOIKUzgRa5/I161I7l+fe6JdUVOgg5KQbo",
            "rabbit_password_hashing_md5"
        )
        .is_err());
        assert!(Credential::hashed("", "rabbit_password_hashing_bcrypt").is_err());
    }

    /// RabbitMQ's legacy module: base64 of a 4-byte salt and md5(salt + password).
    /// This hash is RabbitMQ 3.10's own, from config/examples/rabbitmq-3.10-definitions.json
    /// (user "legacy", made with password_hashing_module = rabbit_password_hashing_md5).
    #[test]
    fn rabbitmq_md5_hashes_log_in() {
        let users = vec![hashed(
            "legacy",
            "w5ZmFC+7qoc5/b6ZxGJ9m7okMso=",
            "rabbit_password_hashing_md5",
        )];
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(authenticate(&users, "PLAIN", b"\0legacy\0legacy-md5", ip).is_ok());
        assert!(authenticate(&users, "PLAIN", b"\0legacy\0legacy-md6", ip).is_err());
        // The same layout computed here: salt, then md5 of salt + password.
        use base64::Engine;
        let salt = [9u8, 8, 7, 6];
        let mut bytes = salt.to_vec();
        bytes.extend(
            md5::Md5::new()
                .chain_update(salt)
                .chain_update(b"pw")
                .finalize(),
        );
        let hash = base64::engine::general_purpose::STANDARD.encode(bytes);
        let mine = hashed("mine", &hash, "rabbit_password_hashing_md5");
        assert!(authenticate(&[mine], "PLAIN", b"\0mine\0pw", ip).is_ok());
    }

    /// RabbitMQ exports a user whose password was cleared with password_hash "":
    /// such a user cannot log in with any password, the empty one included.
    #[test]
    fn an_empty_password_hash_logs_nobody_in() {
        let users = vec![hashed("nopass", "", "rabbit_password_hashing_sha256")];
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for p in ["", "placeholder", "nopass"] {
            let r = format!("\0nopass\0{p}");
            assert!(
                authenticate(&users, "PLAIN", r.as_bytes(), ip).is_err(),
                "{p:?}"
            );
        }
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let shown = format!("{:?}", user("alice", "hunter2"));
        assert!(!shown.contains("hunter2"), "{shown}");
        let shown = format!(
            "{:?}",
            hashed(
                "bob",
                "g5yG+4dO1v7yUOBOIKUzgRa5/I161I7l+fe6JdUVOgg5KQbo",
                "rabbit_password_hashing_sha256"
            )
        );
        assert!(!shown.contains("g5yG"), "{shown}");
    }

    #[test]
    fn only_the_exact_name_and_password_log_in() {
        let users = vec![user("alice", "secret"), user("bob", "hunter2")];
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let ok = |n: &str, p: &str| {
            let r = format!("\0{n}\0{p}");
            authenticate(&users, "PLAIN", r.as_bytes(), ip)
                .ok()
                .map(|u| u.name.clone())
        };
        assert_eq!(ok("alice", "secret").as_deref(), Some("alice"));
        assert_eq!(ok("bob", "hunter2").as_deref(), Some("bob"));
        for (n, p) in [
            ("alice", "secre"),
            ("alice", "secret!"),
            ("alice", "secret\u{0}"),
            ("alice", ""),
            ("alice", "hunter2"),
            ("bob", "secret"),
            ("carol", "secret"),
            ("alic", "secret"),
        ] {
            assert_eq!(ok(n, p), None, "{n}/{p}");
        }
        // Past the padded length the comparison still holds.
        let long = "x".repeat(PADDED_LEN + 10);
        let users = vec![user("long", &long)];
        let r = format!("\0long\0{long}");
        assert!(authenticate(&users, "PLAIN", r.as_bytes(), ip).is_ok());
        let r = format!("\0long\0{}", &long[1..]);
        assert!(authenticate(&users, "PLAIN", r.as_bytes(), ip).is_err());
    }

    #[test]
    fn padded_digest_keeps_lengths_apart() {
        assert_ne!(digest(b"a"), digest(b"a\0"));
        assert_ne!(digest(b""), digest(b"\0"));
        assert_eq!(digest(b"guest"), digest(b"guest"));
    }

    #[test]
    fn throttle_delay_grows_to_a_cap_and_resets_after_the_window() {
        let t = LoginThrottle::new(16);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let t0 = Instant::now();
        let delays: Vec<Duration> = (0..8)
            .map(|i| t.failed_at(ip, t0 + Duration::from_secs(i)))
            .collect();
        let secs: Vec<u64> = delays.iter().map(|d| d.as_secs()).collect();
        assert_eq!(secs, [1, 2, 3, 4, 5, 5, 5, 5]);
        assert!(delays.iter().all(|d| *d <= LoginThrottle::MAX_DELAY));
        // Another address is not affected.
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        assert_eq!(t.failed_at(other, t0), LoginThrottle::FIRST_DELAY);
        // A quiet spell longer than the window starts the address afresh.
        let later = t0 + Duration::from_secs(7) + LoginThrottle::WINDOW;
        assert_eq!(t.failed_at(ip, later), LoginThrottle::FIRST_DELAY);
    }

    #[test]
    fn throttle_never_exceeds_the_cap_even_after_countless_failures() {
        let t = LoginThrottle::new(1);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let now = Instant::now();
        t.failed_at(ip, now);
        t.failures.lock().unwrap().get_mut(&ip).unwrap().count = u32::MAX - 1;
        assert_eq!(t.failed_at(ip, now), LoginThrottle::MAX_DELAY);
        assert_eq!(t.failed_at(ip, now), LoginThrottle::MAX_DELAY);
        assert_eq!(LoginThrottle::delay_for(u32::MAX), LoginThrottle::MAX_DELAY);
    }

    #[test]
    fn throttle_tracks_at_most_its_capacity_and_evicts_the_oldest() {
        let t = LoginThrottle::new(3);
        let t0 = Instant::now();
        let ip = |n: u8| IpAddr::from([198, 51, 100, n]);
        for n in 1..=3 {
            t.failed_at(ip(n), t0 + Duration::from_secs(u64::from(n)));
        }
        // .1 fails again, so .2 is now the oldest.
        assert_eq!(t.failed_at(ip(1), t0 + Duration::from_secs(4)).as_secs(), 2);
        t.failed_at(ip(4), t0 + Duration::from_secs(5));
        assert_eq!(t.tracked(), 3);
        let at = t0 + Duration::from_secs(6);
        assert_eq!(t.failed_at(ip(1), at).as_secs(), 3, ".1 was kept");
        assert_eq!(t.failed_at(ip(3), at).as_secs(), 2, ".3 was kept");
        assert_eq!(t.tracked(), 3);
        // .2 was evicted, so it starts again (and evicts .4, now the oldest).
        assert_eq!(t.failed_at(ip(2), at), LoginThrottle::FIRST_DELAY);
        assert_eq!(t.tracked(), 3);
        // Many addresses never grow it past its capacity.
        for n in 0..=255 {
            t.failed_at(IpAddr::from([203, 0, 113, n]), at);
        }
        assert_eq!(t.tracked(), 3);
    }

    #[test]
    fn throttle_counts_an_ipv6_slash_64_and_a_mapped_ipv4_as_one_address() {
        let t = LoginThrottle::new(16);
        let now = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(t.failed_at(a, now).as_secs(), 1);
        assert_eq!(t.failed_at(b, now).as_secs(), 2);
        assert_eq!(t.failed_at(c, now).as_secs(), 1);
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(t.failed_at(v4, now).as_secs(), 1);
        assert_eq!(t.failed_at(mapped, now).as_secs(), 2);
    }

    #[test]
    fn plain_response_splits_on_nul() {
        assert_eq!(
            parse_plain(b"\0guest\0secret"),
            Some(("guest".into(), "secret".into()))
        );
        assert_eq!(parse_plain(b"guest"), None);
    }

    #[test]
    fn amqplain_reads_login_and_password() {
        let mut r = Vec::new();
        r.push(5);
        r.extend_from_slice(b"LOGIN");
        r.push(b'S');
        r.extend_from_slice(&5u32.to_be_bytes());
        r.extend_from_slice(b"guest");
        r.push(8);
        r.extend_from_slice(b"PASSWORD");
        r.push(b'S');
        r.extend_from_slice(&3u32.to_be_bytes());
        r.extend_from_slice(b"pwd");
        assert_eq!(parse_amqplain(&r), Some(("guest".into(), "pwd".into())));
    }
}
