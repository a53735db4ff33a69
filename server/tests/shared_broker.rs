//! Several hosts sharing one broker through Redis: fan-out across hosts, resuming on another
//! host or after a restart, sign-out reaching every host, shared sessions, and losing Redis.
//! Each test starts its own `redis-server` on a loopback port.

mod support;

use std::time::{Duration, Instant};

use app::api::ssr::RealtimeHost;
use app::protocol::{close, ServerReply};
use support::{position, recovery, RedisServer, Seen, TestHost};

#[tokio::test]
async fn a_message_published_on_one_host_reaches_its_subscribers_on_every_host() {
    let redis = RedisServer::start().await;
    let (a, b) = (
        TestHost::sharing(&redis).await,
        TestHost::sharing(&redis).await,
    );
    let mut alice_on_a = a.connect().await;
    alice_on_a.subscribe(&a.token("alice", "s-a"), None).await;
    let mut alice_on_b = b.connect().await;
    alice_on_b.subscribe(&b.token("alice", "s-a"), None).await;
    let mut bob_on_b = b.connect().await;
    bob_on_b.subscribe(&b.token("bob", "s-b"), None).await;

    let first = a.publish("alice", 1).await;
    let second = b.publish("alice", 2).await;
    assert_eq!(
        first.epoch, second.epoch,
        "one channel, one epoch on every host"
    );
    assert_eq!(
        second.offset,
        first.offset + 1,
        "one offset sequence on every host"
    );
    for client in [&mut alice_on_a, &mut alice_on_b] {
        let got = [client.message().await, client.message().await];
        assert_eq!(
            got.map(|m| (m.offset, m.data["n"].as_u64())),
            [(first.offset, Some(1)), (second.offset, Some(2))]
        );
    }
    assert!(
        bob_on_b.stays_quiet(Duration::from_millis(300)).await,
        "bob saw alice's messages"
    );
}

#[tokio::test]
async fn a_client_resumes_on_another_host_with_nothing_lost_or_doubled() {
    let redis = RedisServer::start().await;
    let (a, b) = (
        TestHost::sharing(&redis).await,
        TestHost::sharing(&redis).await,
    );
    let token = a.token("alice", "s-a");
    let mut on_a = a.connect().await;
    on_a.subscribe(&token, None).await;
    a.publish("alice", 1).await;
    let last = on_a.message().await.position();
    drop(on_a);

    // Missed while away, published through both hosts.
    for n in 2..=4 {
        let host = if n % 2 == 0 { &a } else { &b };
        host.publish("alice", n).await;
    }
    let mut on_b = b.connect().await;
    let reply = on_b.subscribe(&token, Some(last.clone())).await;
    let recovery = recovery(&reply);
    assert!(recovery.complete, "{recovery:?}");
    assert_eq!(recovery.replayed, 3);
    let replayed: Vec<u64> = [
        on_b.message().await,
        on_b.message().await,
        on_b.message().await,
    ]
    .iter()
    .map(|m| m.offset)
    .collect();
    assert_eq!(
        replayed,
        vec![last.offset + 1, last.offset + 2, last.offset + 3]
    );

    a.publish("alice", 5).await;
    assert_eq!(on_b.message().await.data["n"], 5);
    assert!(
        on_b.stays_quiet(Duration::from_millis(300)).await,
        "a message came twice"
    );
}

#[tokio::test]
async fn the_history_outlives_a_host_restart() {
    let redis = RedisServer::start().await;
    let mut a = TestHost::sharing(&redis).await;
    let token = a.token("alice", "s-a");
    let mut client = a.connect().await;
    client.subscribe(&token, None).await;
    a.publish("alice", 1).await;
    let last = client.message().await.position();
    a.shut_down().await;
    assert_eq!(client.closed().await.0, close::SERVICE_RESTART);
    drop(a);

    let restarted = TestHost::sharing(&redis).await;
    restarted.publish("alice", 2).await;
    let mut client = restarted.connect().await;
    let reply = client.subscribe(&token, Some(last)).await;
    let recovery = recovery(&reply);
    assert!(recovery.complete, "the restart lost history: {recovery:?}");
    assert_eq!(client.message().await.data["n"], 2);
}

#[tokio::test]
async fn sign_out_on_one_host_closes_sockets_on_the_others_and_refuses_the_session_everywhere() {
    let redis = RedisServer::start().await;
    let (a, b) = (
        TestHost::sharing(&redis).await,
        TestHost::sharing(&redis).await,
    );
    let token = a.token("alice", "s-out");
    let mut on_b = b.connect().await;
    on_b.subscribe(&token, None).await;

    let signed_out = Instant::now();
    a.rt.session_ended("s-out");
    let (code, reason) = on_b.closed().await;
    assert_eq!(code, close::SESSION_ENDED, "{reason}");
    assert!(
        signed_out.elapsed() < Duration::from_secs(1),
        "{:?}",
        signed_out.elapsed()
    );

    // A host that was not there when it happened refuses the session's tokens as well.
    let late = TestHost::sharing(&redis).await;
    let mut on_late = late.connect().await;
    match on_late.auth(&token, None).await {
        Seen::Closed(code, _) | Seen::Reply(ServerReply::Closing { code, .. }) => {
            assert_eq!(code, close::SESSION_ENDED)
        }
        other => panic!("expected the session's token refused, got {other:?}"),
    }
}

#[tokio::test]
async fn a_session_made_on_one_host_is_known_to_another() {
    let redis = RedisServer::start().await;
    let (a, b) = (
        TestHost::sharing(&redis).await,
        TestHost::sharing(&redis).await,
    );
    let (status, cookie, body) = a.post_form_as("/api/sign_in", None, "name=Ada").await;
    assert_eq!(status, 200, "{body}");
    let cookie = cookie.expect("a session cookie");

    let (status, _, body) = b.post_form_as("/api/current_user", Some(&cookie), "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"name\":\"Ada\""), "{body}");
    let (status, _, body) = b
        .post_form_as("/api/subscription_token", Some(&cookie), "topics[0]=ai")
        .await;
    assert_eq!(status, 200, "{body}");

    let (status, _, _) = b.post_form_as("/api/sign_out", Some(&cookie), "").await;
    assert_eq!(status, 200);
    let (_, _, body) = a.post_form_as("/api/current_user", Some(&cookie), "").await;
    assert_eq!(
        body, "null",
        "signed out on one host, still signed in on another"
    );
}

#[tokio::test]
async fn losing_redis_closes_subscribers_with_the_restart_code_and_they_resume_once_it_is_back() {
    let mut redis = RedisServer::start().await;
    let host = TestHost::sharing(&redis).await;
    let token = host.token("alice", "s-a");
    let mut client = host.connect().await;
    client.subscribe(&token, None).await;
    host.publish("alice", 1).await;
    let last = client.message().await.position();

    let (_, cookie, _) = host.post_form_as("/api/sign_in", None, "name=Ada").await;
    let cookie = cookie.expect("a session cookie");

    redis.stop();
    let (code, reason) = client.closed().await;
    assert_eq!(code, close::SERVICE_RESTART, "{reason}");
    let (status, _, body) = host
        .post_form_as("/api/current_user", Some(&cookie), "")
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("Unavailable"), "{body}");
    let refused = host
        .publish_to("alice", "ai", serde_json::json!({ "n": 2 }))
        .await;
    assert!(refused.is_err(), "a publish without redis was accepted");
    let publisher = host
        .rt
        .tokens
        .mint_publisher("test", Duration::from_secs(60))
        .unwrap();
    let one = r#"{"channel":"user:alice","topic":"ai","data":{"n":2}}"#;
    let path = server::publish_api::PUBLISH_PATH;
    let (status, body) = host.post_json(path, Some(&publisher), one).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("0 of 1 messages were published"), "{body}");

    // Redis comes back empty, so the client must hear that its history is gone.
    redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let reply = loop {
        let mut client = host.connect().await;
        match client.auth(&token, Some(last.clone())).await {
            Seen::Reply(reply @ ServerReply::Subscribed { .. }) => break reply,
            Seen::Closed(code, _) | Seen::Reply(ServerReply::Closing { code, .. })
                if code == close::SERVICE_RESTART => {}
            other => panic!("expected subscribed or a restart close, got {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "the host never got its link back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let recovery = recovery(&reply);
    assert!(!recovery.complete);
    assert_eq!(recovery.reason.as_deref(), Some("epoch_changed"));
    assert_ne!(position(&reply).epoch, last.epoch);

    // The host claimed its secret again on the empty Redis: an impostor still cannot join.
    let mut config = support::test_config();
    config.redis_url = Some(redis.url());
    config.token_secret = Some(b"a-different-secret-0123456789abcdefghij".to_vec());
    let refused = server::host::Realtime::new(config).await.err();
    assert!(matches!(
        refused,
        Some(server::host::StartError::SecretMismatch)
    ));
}

#[tokio::test]
async fn a_host_with_another_token_secret_refuses_to_start() {
    let redis = RedisServer::start().await;
    let _first = TestHost::sharing(&redis).await;
    let mut config = support::test_config();
    config.redis_url = Some(redis.url());
    config.token_secret = Some(b"a-different-secret-0123456789abcdefghij".to_vec());
    let refused = server::host::Realtime::new(config).await.err();
    assert!(
        matches!(refused, Some(server::host::StartError::SecretMismatch)),
        "a host with its own secret joined: its tokens would fail on the others"
    );
}

#[tokio::test]
async fn a_channel_that_expires_while_a_client_listens_goes_on_under_a_new_epoch() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let host = TestHost::with(move |c| {
        c.redis_url = Some(url);
        c.limits.history_max_age = Duration::from_secs(1);
    })
    .await;
    let mut client = host.connect().await;
    client.subscribe(&host.token("alice", "s-a"), None).await;
    let mut last = None;
    for n in 1..=3 {
        last = Some(host.publish("alice", n).await);
        assert_eq!(client.message().await.data["n"], n);
    }

    // Idle for longer than the history lives: Redis drops the channel, epoch and all.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let fresh = host.publish("alice", 4).await;
    assert_ne!(Some(&fresh.epoch), last.as_ref().map(|p| &p.epoch));
    assert_eq!(fresh.offset, 1);
    let message = client.message().await;
    assert_eq!((message.offset, message.data["n"].as_u64()), (1, Some(4)));
}

#[tokio::test]
async fn an_answer_rides_out_a_stalled_redis_and_arrives_whole() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let host = TestHost::with(move |c| {
        c.redis_url = Some(url);
        c.ai_answer_words = 40;
        c.ai_chunk_delay = Duration::from_millis(20);
    })
    .await;
    let mut client = host.connect().await;
    client.subscribe(&host.token("alice", "s-a"), None).await;
    host.rt
        .start_answer("user:alice".into(), "why is the sky blue?".into())
        .unwrap();

    let mut seqs = std::collections::BTreeSet::new();
    let mut stalled = false;
    let end = loop {
        let message = client.message().await;
        match message.kind {
            app::protocol::MessageKind::Chunk => {
                seqs.insert(message.data["seq"].as_u64().unwrap());
            }
            app::protocol::MessageKind::DatastreamEnd => break message,
            _ => {}
        }
        if seqs.len() == 5 && !stalled {
            // Longer than a request may take: publishes time out and are tried again.
            stalled = true;
            redis.pause(true);
            tokio::time::sleep(Duration::from_secs(3)).await;
            redis.pause(false);
        }
    };
    assert!(stalled);
    assert_eq!(
        end.data.get("error"),
        None,
        "the answer gave up: {}",
        end.data
    );
    let expected = end.data["chunks"].as_u64().unwrap();
    assert_eq!(seqs.len() as u64, expected, "pieces missing");
    assert_eq!(
        seqs.iter().copied().collect::<Vec<_>>(),
        (0..expected).collect::<Vec<_>>()
    );
}
