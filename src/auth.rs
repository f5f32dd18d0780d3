//! Who may connect: SASL PLAIN and AMQPLAIN responses checked against the users in
//! the configuration. As in RabbitMQ, a user may be restricted to loopback clients.

use std::net::IpAddr;

use amq_protocol::types::parsing::parse_field_table;
use amq_protocol::types::AMQPValue;

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
    let (_, table) = parse_field_table(&framed[..]).ok()?;
    let text = |k: &str| match table.inner().get(k)? {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    };
    Some((text("LOGIN")?, text("PASSWORD")?))
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
    let (name, pass) = creds.ok_or(AuthFailure::BadCredentials)?;
    let user = users
        .iter()
        .find(|u| u.name == name && constant_time_eq(u.password.as_bytes(), pass.as_bytes()))
        .ok_or(AuthFailure::BadCredentials)?;
    // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d.
    if user.loopback_only && !peer.to_canonical().is_loopback() {
        return Err(AuthFailure::NotFromLoopback);
    }
    Ok(user)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapped_loopback_counts_as_loopback() {
        let users = vec![User {
            name: "guest".into(),
            password: "guest".into(),
            loopback_only: true,
            vhosts: vec!["/".into()],
        }];
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(authenticate(&users, "PLAIN", b"\0guest\0guest", mapped).is_ok());
        let remote: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert!(authenticate(&users, "PLAIN", b"\0guest\0guest", remote).is_err());
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
