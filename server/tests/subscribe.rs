//! The subscribe flow over real sockets: receive, isolation, refused tokens.

mod support;

use std::time::Duration;

use app::protocol::{close, ServerReply};
use support::{Seen, TestHost};

#[tokio::test]
async fn subscriber_receives_what_is_published_to_its_channel() {
    let host = TestHost::start().await;
    let mut alice = host.connect().await;
    let reply = alice.subscribe(&host.token("alice", "s-a"), None).await;
    let ServerReply::Subscribed {
        channel, topics, ..
    } = reply
    else {
        unreachable!()
    };
    assert_eq!(channel, "user:alice");
    assert_eq!(topics, vec!["ai".to_string()]);

    for n in 0..3 {
        host.publish("alice", n).await;
    }
    for n in 0..3 {
        let m = alice.message().await;
        assert_eq!(m.channel, "user:alice");
        assert_eq!(m.topic, "ai");
        assert_eq!(m.data["n"], n);
        assert_eq!(m.offset, n + 1);
        assert!(!m.id.is_empty() && m.created_at > 0);
    }
}

#[tokio::test]
async fn users_never_see_each_others_messages() {
    let host = TestHost::start().await;
    let mut alice = host.connect().await;
    let mut bob = host.connect().await;
    alice.subscribe(&host.token("alice", "s-a"), None).await;
    bob.subscribe(&host.token("bob", "s-b"), None).await;

    host.publish("alice", 1).await;
    host.publish("bob", 2).await;
    assert_eq!(alice.message().await.data["n"], 1);
    assert_eq!(bob.message().await.data["n"], 2);
    assert!(
        alice.stays_quiet(Duration::from_millis(300)).await,
        "alice got bob's message"
    );
    assert!(
        bob.stays_quiet(Duration::from_millis(300)).await,
        "bob got alice's message"
    );
}

#[tokio::test]
async fn a_forged_token_is_refused_with_its_close_code() {
    let host = TestHost::start().await;
    let token = host.token("alice", "s-a");
    let (head, sig) = token.rsplit_once('.').unwrap();
    let forged = format!("{head}.{}", sig.chars().rev().collect::<String>());

    let mut c = host.connect().await;
    match c.auth(&forged, None).await {
        Seen::Reply(ServerReply::Closing { code, .. }) => assert_eq!(code, close::TOKEN_INVALID),
        other => panic!("expected closing notice, got {other:?}"),
    }
    let (code, reason) = c.closed().await;
    assert_eq!(code, close::TOKEN_INVALID);
    assert!(reason.contains("invalid token"), "{reason}");
}

#[tokio::test]
async fn garbage_and_expired_tokens_are_refused() {
    let host = TestHost::start().await;
    let mut c = host.connect().await;
    c.auth("not.a.token", None).await;
    assert_eq!(c.closed().await.0, close::TOKEN_INVALID);

    let host = TestHost::with(|c| c.token_ttl = Duration::from_secs(1)).await;
    let token = host.token("alice", "s-a");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut c = host.connect().await;
    c.auth(&token, None).await;
    assert_eq!(c.closed().await.0, close::TOKEN_EXPIRED);
}
