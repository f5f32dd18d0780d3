//! Failed logins are answered late, from the same client address ever later up to a
//! cap, while a correct login is answered at once.

mod common;
mod support;

use std::time::{Duration, Instant};

use lapin::{Connection, ConnectionProperties};
use warrenmq::auth::LoginThrottle;

/// Longer than any pause the throttle may impose, with room for a loaded machine.
const PATIENCE: Duration = Duration::from_secs(20);

/// Connects and returns how long the broker took to answer, and its refusal if any.
async fn attempt(url: &str) -> (Duration, Option<(u16, String)>) {
    let started = Instant::now();
    let r = tokio::time::timeout(
        PATIENCE,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .expect("the broker answered within the throttle's cap");
    let took = started.elapsed();
    match r {
        Ok(conn) => {
            let _ = conn.close(200, "bye".into()).await;
            (took, None)
        }
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(err) => (
                took,
                Some((err.get_id(), err.get_message().as_str().to_string())),
            ),
            other => panic!("expected an AMQP connection.close, got {other:?}"),
        },
    }
}

/// A wrong password gets its 403 no sooner than the throttle's first pause, the next
/// one from the same address later still; a correct login right after is not held.
#[tokio::test]
async fn failed_logins_are_delayed_and_correct_login_is_not() {
    let b = common::start().await;
    if b.is_external() {
        eprintln!("the pauses are WarrenMQ's own: nothing to check on an external broker");
        return;
    }
    let wrong = b.url().replace("guest:guest@", "guest:not-the-password@");

    let (took, refused) = attempt(&wrong).await;
    let (code, text) = refused.expect("a wrong password is refused");
    assert_eq!(code, 403, "{text}");
    assert!(text.starts_with("ACCESS_REFUSED"), "{text}");
    assert!(took >= LoginThrottle::FIRST_DELAY, "refused after {took:?}");

    let (took, refused) = attempt(&wrong).await;
    assert_eq!(refused.map(|r| r.0), Some(403));
    let second = LoginThrottle::FIRST_DELAY + LoginThrottle::STEP;
    assert!(took >= second, "second refusal after {took:?}");

    // A third failure would now wait 3 s; the right password is answered well before.
    let (took, refused) = attempt(&b.url()).await;
    assert_eq!(refused, None, "guest/guest logs in");
    assert!(
        took < second + LoginThrottle::STEP,
        "a correct login waited {took:?}"
    );
}

/// An unknown user waits like a wrong password, so the pause tells nothing about
/// which names exist.
#[tokio::test]
async fn unknown_user_is_delayed_like_a_wrong_password() {
    let b = common::start().await;
    if b.is_external() {
        return;
    }
    let url = b.url().replace("guest:guest@", "nobody-here:guest@");
    let (took, refused) = attempt(&url).await;
    assert_eq!(refused.map(|r| r.0), Some(403));
    assert!(took >= LoginThrottle::FIRST_DELAY, "refused after {took:?}");
}
