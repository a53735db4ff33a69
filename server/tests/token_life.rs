//! The token for the whole life of a connection: expiry, in-band refresh, sign-out, session
//! expiry, and topics changed on an open connection.

mod support;

use std::time::{Duration, Instant, SystemTime};

use app::api::ssr::RealtimeHost;
use app::protocol::{close, ClientCommand, ErrorCode, ServerReply};
use support::{Seen, TestHost};

#[tokio::test]
async fn in_band_refresh_keeps_a_connection_alive_across_many_ttls() {
    let host = TestHost::with(|c| c.token_ttl = Duration::from_secs(2)).await;
    let mut c = host.connect().await;
    c.subscribe(&host.token("alice", "s-a"), None).await;
    let started = Instant::now();
    let mut n = 0;
    // Seven seconds is more than three lifetimes of one token.
    while started.elapsed() < Duration::from_secs(7) {
        tokio::time::sleep(Duration::from_millis(900)).await;
        let id = c.next_id();
        c.send(&ClientCommand::Refresh {
            id,
            token: host.token("alice", "s-a"),
        })
        .await;
        match c.next().await {
            Seen::Reply(ServerReply::Ack { id: acked, .. }) => assert_eq!(acked, id),
            other => panic!("refresh not acknowledged: {other:?}"),
        }
        host.publish("alice", n).await;
        assert_eq!(c.message().await.data["n"], n);
        n += 1;
    }
}

#[tokio::test]
async fn without_refresh_the_connection_stops_at_expiry() {
    let host = TestHost::with(|c| c.token_ttl = Duration::from_secs(2)).await;
    let mut c = host.connect().await;
    c.subscribe(&host.token("alice", "s-a"), None).await;
    let (code, _) = c.closed().await;
    assert_eq!(code, close::TOKEN_EXPIRED);
    host.publish("alice", 1).await;
}

#[tokio::test]
async fn a_bad_refresh_closes_the_connection_and_never_extends_it() {
    let host = TestHost::start().await;
    let forged = {
        let t = host.token("alice", "s-a");
        let (head, _) = t.rsplit_once('.').unwrap();
        format!("{head}.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
    };
    let expired_host = TestHost::with(|c| c.token_ttl = Duration::from_secs(1)).await;
    let expired = expired_host.token("alice", "s-a");
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let cases = [
        ("forged", forged),
        ("another user", host.token("bob", "s-b")),
        ("another session", host.token("alice", "s-other")),
        ("expired", expired),
    ];
    for (what, token) in cases {
        let mut c = host.connect().await;
        c.subscribe(&host.token("alice", "s-a"), None).await;
        let id = c.next_id();
        c.send(&ClientCommand::Refresh { id, token }).await;
        let (code, reason) = c.closed().await;
        assert_eq!(code, close::REFRESH_REJECTED, "{what}: {reason}");
    }
}

#[tokio::test]
async fn sign_out_closes_live_sockets_within_a_second_and_refuses_its_tokens() {
    let host = TestHost::start().await;
    let token = host.token("alice", "s-a");
    let mut tab1 = host.connect().await;
    let mut tab2 = host.connect().await;
    let mut other_session = host.connect().await;
    tab1.subscribe(&token, None).await;
    tab2.subscribe(&token, None).await;
    other_session
        .subscribe(&host.token("alice", "s-phone"), None)
        .await;

    let signed_out = Instant::now();
    host.rt.session_ended("s-a");
    assert_eq!(tab1.closed().await.0, close::SESSION_ENDED);
    assert_eq!(tab2.closed().await.0, close::SESSION_ENDED);
    assert!(
        signed_out.elapsed() < Duration::from_secs(1),
        "took {:?}",
        signed_out.elapsed()
    );

    let mut late = host.connect().await;
    late.auth(&token, None).await;
    assert_eq!(
        late.closed().await.0,
        close::SESSION_ENDED,
        "a token of the ended session worked"
    );

    host.publish("alice", 1).await;
    assert_eq!(
        other_session.message().await.data["n"],
        1,
        "the other session was closed too"
    );
}

#[tokio::test]
async fn an_expiring_session_closes_its_sockets() {
    let host = TestHost::start().await;
    let mut c = host.connect().await;
    c.subscribe(&host.token("alice", "s-a"), None).await;
    let expires = SystemTime::now() + Duration::from_millis(500);
    host.rt.session_seen("s-a", expires);
    let (code, reason) = c.closed().await;
    assert_eq!(code, close::SESSION_ENDED);
    assert_eq!(reason, "session expired");
    let late = SystemTime::now()
        .duration_since(expires)
        .unwrap_or_default();
    assert!(
        late < Duration::from_secs(1),
        "closed {late:?} after the session expired"
    );
}

#[tokio::test]
async fn topics_change_on_an_open_connection_within_the_token() {
    let host = TestHost::with(|c| {
        c.topics = vec!["ai".into(), "news".into(), "status".into()];
        c.limits.max_topics_per_conn = 2;
    })
    .await;
    let mut c = host.connect().await;
    let token = host.token_for("alice", "s-a", &["ai", "news"]);
    let id = c.next_id();
    c.send(&ClientCommand::Auth {
        id,
        token,
        topics: Some(vec!["ai".into()]),
        resume: None,
    })
    .await;
    assert!(matches!(
        c.next().await,
        Seen::Reply(ServerReply::Subscribed { .. })
    ));

    host.publish_to("alice", "news", serde_json::json!("skipped"))
        .await
        .unwrap();
    let id = c.next_id();
    c.send(&ClientCommand::Subscribe {
        id,
        topics: vec!["news".into()],
    })
    .await;
    match c.next().await {
        Seen::Reply(ServerReply::Ack {
            id: acked, topics, ..
        }) => {
            assert_eq!(acked, id);
            assert_eq!(topics, vec!["ai".to_string(), "news".to_string()]);
        }
        other => panic!("expected ack, got {other:?}"),
    }
    host.publish_to("alice", "news", serde_json::json!("wanted"))
        .await
        .unwrap();
    assert_eq!(c.message().await.data, "wanted");

    let id = c.next_id();
    c.send(&ClientCommand::Subscribe {
        id,
        topics: vec!["status".into()],
    })
    .await;
    match c.next().await {
        Seen::Reply(ServerReply::Error {
            id: Some(e), code, ..
        }) => {
            assert_eq!((e, code), (id, ErrorCode::TopicForbidden))
        }
        other => panic!("expected topic_forbidden, got {other:?}"),
    }

    let id = c.next_id();
    c.send(&ClientCommand::Unsubscribe {
        id,
        topics: vec!["news".into()],
    })
    .await;
    assert!(matches!(
        c.next().await,
        Seen::Reply(ServerReply::Ack { .. })
    ));
    host.publish_to("alice", "news", serde_json::json!("after"))
        .await
        .unwrap();
    host.publish_to("alice", "ai", serde_json::json!("still"))
        .await
        .unwrap();
    assert_eq!(c.message().await.data, "still");
}

#[tokio::test]
async fn too_many_topics_is_refused_not_trimmed() {
    let host = TestHost::with(|c| {
        c.topics = vec!["ai".into(), "news".into(), "status".into()];
        c.limits.max_topics_per_conn = 2;
    })
    .await;
    let mut c = host.connect().await;
    let token = host.token_for("alice", "s-a", &["ai", "news", "status"]);
    match c.auth(&token, None).await {
        Seen::Reply(ServerReply::Error { code, message, .. }) => {
            assert_eq!(code, ErrorCode::TooManyTopics);
            assert!(message.contains("at most 2"), "{message}");
        }
        other => panic!("expected too_many_topics, got {other:?}"),
    }
}
