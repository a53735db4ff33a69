//! Offsets, replay on resume, slow consumers and publish limits, over real sockets.

mod support;

use std::time::Duration;

use app::protocol::close;
use support::{position, recovery, TestHost};

#[tokio::test]
async fn resume_replays_missed_messages_in_order_then_goes_live_without_duplicates() {
    let host = TestHost::start().await;
    let token = host.token("alice", "s-a");
    let mut first = host.connect().await;
    first.subscribe(&token, None).await;
    host.publish("alice", 0).await;
    host.publish("alice", 1).await;
    assert_eq!(first.message().await.offset, 1);
    let last = first.message().await.position();
    drop(first);

    for n in 2..7 {
        host.publish("alice", n).await;
    }
    let mut again = host.connect().await;
    let reply = again.subscribe(&token, Some(last.clone())).await;
    let r = recovery(&reply);
    assert!(r.complete, "{r:?}");
    assert_eq!(r.replayed, 5);
    host.publish("alice", 7).await;
    let got: Vec<u64> = {
        let mut v = Vec::new();
        for _ in 0..6 {
            v.push(again.message().await.data["n"].as_u64().unwrap());
        }
        v
    };
    assert_eq!(got, vec![2, 3, 4, 5, 6, 7]);
    assert!(
        again.stays_quiet(Duration::from_millis(200)).await,
        "a message came twice"
    );
}

#[tokio::test]
async fn a_lost_history_is_reported_as_incomplete_recovery() {
    let host = TestHost::with(|c| c.limits.history_max_messages = 3).await;
    let token = host.token("alice", "s-a");
    let mut c = host.connect().await;
    let head = position(&c.subscribe(&token, None).await);
    drop(c);
    for n in 0..10 {
        host.publish("alice", n).await;
    }
    let mut c = host.connect().await;
    let reply = c.subscribe(&token, Some(head.clone())).await;
    let r = recovery(&reply);
    assert!(!r.complete);
    assert_eq!(r.reason.as_deref(), Some("history_expired"));
    assert_eq!(r.replayed, 3, "what history still holds is replayed");
    assert_eq!(c.message().await.data["n"], 7);

    // A restarted in-memory broker has a new epoch for every channel.
    let restarted = TestHost::start().await;
    let mut c = restarted.connect().await;
    let reply = c
        .subscribe(&restarted.token("alice", "s-a"), Some(head))
        .await;
    assert_eq!(recovery(&reply).reason.as_deref(), Some("epoch_changed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_is_cut_off_while_others_keep_receiving() {
    let host = TestHost::with(|c| c.limits.send_queue = 64).await;
    let mut stalled = host.connect().await;
    stalled
        .subscribe(&host.token("alice", "s-stalled"), None)
        .await;

    const FAST: usize = 4;
    const TOTAL: u64 = 400;
    let mut readers = Vec::new();
    for i in 0..FAST {
        let mut c = host.connect().await;
        c.subscribe(&host.token("alice", &format!("s-{i}")), None)
            .await;
        readers.push(tokio::spawn(async move {
            let mut expected = 1;
            while expected <= TOTAL {
                let m = c.message().await;
                assert_eq!(
                    m.offset, expected,
                    "fast reader {i} saw a gap or a duplicate"
                );
                expected += 1;
            }
        }));
    }

    // 400 messages of 48 KiB: far more than the stalled socket's queue and kernel buffers.
    let filler = "x".repeat(48 * 1024);
    for n in 0..TOTAL {
        host.publish_to("alice", "ai", serde_json::json!({ "n": n, "pad": filler }))
            .await
            .unwrap();
        tokio::task::yield_now().await;
    }
    // The stalled client reads again once publishing is over, and finds its close code after
    // whatever the kernel had buffered for it.
    let stalled = tokio::spawn(async move { stalled.closed().await });
    for r in readers {
        r.await.expect("every fast reader got every message");
    }
    let (code, reason) = stalled.await.unwrap();
    assert_eq!(code, close::SLOW_CONSUMER, "{reason}");
}

#[tokio::test]
async fn an_oversize_publish_is_refused_before_anyone_sees_it() {
    let host = TestHost::start().await;
    let mut c = host.connect().await;
    c.subscribe(&host.token("alice", "s-a"), None).await;
    let big = serde_json::json!({ "text": "x".repeat(512 * 1024) });
    let err = host.publish_to("alice", "ai", big).await.unwrap_err();
    assert!(err.to_string().contains("limit is 524288 bytes"), "{err}");
    assert!(
        c.stays_quiet(Duration::from_millis(200)).await,
        "part of it was delivered"
    );
    let next = host.publish("alice", 1).await;
    assert_eq!(next.offset, 1, "the refused publish took an offset");
    assert_eq!(c.message().await.offset, 1);
}

#[tokio::test]
async fn backends_publish_over_http_and_a_bad_batch_delivers_nothing() {
    let host = TestHost::start().await;
    let mut c = host.connect().await;
    c.subscribe(&host.token("alice", "s-a"), None).await;
    let publisher = host
        .rt
        .tokens
        .mint_publisher("test", Duration::from_secs(60))
        .unwrap();
    let path = server::publish_api::PUBLISH_PATH;

    let one = r#"{"channel":"user:alice","topic":"ai","data":{"n":1}}"#;
    let (status, body) = host.post_json(path, Some(&publisher), one).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(c.message().await.data["n"], 1);

    let big = "x".repeat(600 * 1024);
    let batch = format!(
        r#"[{{"channel":"user:alice","topic":"ai","data":{{"n":2}}}},
            {{"channel":"user:alice","topic":"ai","data":"{big}"}}]"#
    );
    let (status, body) = host.post_json(path, Some(&publisher), &batch).await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body.contains("message 1") && body.contains("limit is 524288"),
        "{body}"
    );
    assert!(
        c.stays_quiet(Duration::from_millis(200)).await,
        "part of a refused batch arrived"
    );

    // JSON that a subscriber's parser would reject is refused up front, not delivered broken.
    let unreadable = r#"[{"channel":"user:alice","topic":"ai","data":{"n":3}},
                         {"channel":"user:alice","topic":"ai","data":{"n":1e400}}]"#;
    let (status, body) = host.post_json(path, Some(&publisher), unreadable).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("message 1") && body.contains("out of range"),
        "{body}"
    );
    assert!(
        c.stays_quiet(Duration::from_millis(200)).await,
        "part of a refused batch arrived"
    );

    let (status, _) = host.post_json(path, None, one).await;
    assert_eq!(status, 401);
    let subscriber_token = host.token("alice", "s-a");
    let (status, _) = host.post_json(path, Some(&subscriber_token), one).await;
    assert_eq!(status, 401, "a subscription token must not publish");
    let unknown = r#"{"channel":"user:alice","topic":"billing","data":1}"#;
    let (status, body) = host.post_json(path, Some(&publisher), unknown).await;
    assert_eq!(status, 400);
    assert!(body.contains("unknown topic"), "{body}");
}
