//! Hostile and broken clients: bad frames, cross-site upgrades, connection floods, and what
//! clients see when the host shuts down.

mod support;

use std::time::Duration;

use app::protocol::{close, ClientCommand, ErrorCode, ServerReply};
use support::{Seen, TestHost};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn malformed_and_unknown_commands_get_error_replies() {
    let host = TestHost::start().await;
    let mut c = host.connect().await;
    c.send_raw(Message::Text("{not json".into())).await;
    match c.next().await {
        Seen::Reply(ServerReply::Error { code, .. }) => assert_eq!(code, ErrorCode::BadCommand),
        other => panic!("{other:?}"),
    }
    c.subscribe(&host.token("alice", "s-a"), None).await;
    c.send_raw(Message::Text(r#"{"type":"launch","id":42}"#.into()))
        .await;
    match c.next().await {
        Seen::Reply(ServerReply::Error { id, code, .. }) => {
            assert_eq!((id, code), (Some(42), ErrorCode::BadCommand))
        }
        other => panic!("{other:?}"),
    }
    host.publish("alice", 1).await;
    assert_eq!(
        c.message().await.data["n"],
        1,
        "the connection survives bad commands"
    );
}

#[tokio::test]
async fn commands_before_auth_binary_frames_and_silence_are_closed_with_codes() {
    let host = TestHost::with(|c| c.limits.auth_timeout = Duration::from_secs(1)).await;
    let mut c = host.connect().await;
    c.send(&ClientCommand::Subscribe {
        id: 1,
        topics: vec!["ai".into()],
    })
    .await;
    assert_eq!(c.closed().await.0, close::AUTH_REQUIRED);

    let mut c = host.connect().await;
    c.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    assert_eq!(c.closed().await.0, close::UNSUPPORTED_DATA);

    let mut c = host.connect().await;
    assert_eq!(c.closed().await.0, close::AUTH_REQUIRED);
}

#[tokio::test]
async fn an_oversize_frame_is_refused_with_1009() {
    let host = TestHost::start().await;
    let mut c = host.connect().await;
    c.subscribe(&host.token("alice", "s-a"), None).await;
    let huge = format!(
        r#"{{"type":"subscribe","id":1,"topics":["{}"]}}"#,
        "a".repeat(20_000)
    );
    c.send_raw(Message::Text(huge.into())).await;
    let (code, reason) = c.closed().await;
    assert_eq!(code, close::FRAME_TOO_BIG);
    assert!(reason.contains("16384-byte limit"), "{reason}");
}

#[tokio::test]
async fn cross_site_upgrades_are_refused() {
    let host = TestHost::start().await;
    let err = host
        .connect_from("https://evil.example")
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("403"), "{err}");
    let same_site = format!("http://{}", host.addr);
    assert!(host.connect_from(&same_site).await.is_ok());
}

#[tokio::test]
async fn connections_per_user_are_limited() {
    let host = TestHost::with(|c| c.limits.max_conns_per_user = 2).await;
    let token = host.token("alice", "s-a");
    let mut a = host.connect().await;
    let mut b = host.connect().await;
    a.subscribe(&token, None).await;
    b.subscribe(&token, None).await;
    let mut third = host.connect().await;
    third.auth(&token, None).await;
    let (code, reason) = third.closed().await;
    assert_eq!(code, close::TOO_MANY_CONNECTIONS);
    assert!(reason.contains("2 connections"), "{reason}");

    let mut bob = host.connect().await;
    bob.subscribe(&host.token("bob", "s-b"), None).await;
}

#[tokio::test]
async fn shutdown_tells_clients_to_come_back() {
    let mut host = TestHost::start().await;
    let mut c = host.connect().await;
    c.subscribe(&host.token("alice", "s-a"), None).await;
    host.shut_down().await;
    match c.next().await {
        Seen::Reply(ServerReply::Closing { code, .. }) => assert_eq!(code, close::SERVICE_RESTART),
        other => panic!("expected a closing notice, got {other:?}"),
    }
    assert_eq!(c.closed().await.0, close::SERVICE_RESTART);
}

#[tokio::test]
async fn clients_that_leave_before_auth_do_not_crash_their_connection_task() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));

    let host = TestHost::start().await;
    let mut closes_politely = host.connect().await;
    closes_politely.send_raw(Message::Close(None)).await;
    let hangs_up = host.connect().await;
    drop(hangs_up);
    let mut empty_topics = host.connect().await;
    let id = empty_topics.next_id();
    let token = host.token("alice", "s-a");
    empty_topics
        .send(&ClientCommand::Auth {
            id,
            token,
            topics: Some(vec![]),
            resume: None,
        })
        .await;
    match empty_topics.next().await {
        Seen::Reply(ServerReply::Error { code, message, .. }) => {
            assert_eq!(code, ErrorCode::BadCommand);
            assert!(message.contains("at least one topic"), "{message}");
        }
        other => panic!("expected an error reply, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "a connection task panicked"
    );
    assert!(
        host.rt.connections.is_empty(),
        "a connection that never authenticated was kept"
    );
}

#[tokio::test]
async fn server_functions_refuse_malformed_and_oversize_forms_with_a_reason() {
    let host = TestHost::start().await;

    let (status, body) = host.post_form("/api/sign_in", "nam=typo").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("BadInput") && body.contains("missing field"),
        "{body}"
    );

    let (status, body) = host.post_form("/api/sign_in", "name=%FF%FE").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("valid UTF-8"), "{body}");

    let (status, body) = host.post_form("/api/subscription_token", "topics=ai").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("could not be read"), "{body}");

    let huge = format!("prompt={}", "a".repeat(100 * 1024));
    let (status, body) = host.post_form("/api/ask", &huge).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("larger than 64 KiB"), "{body}");

    // Sent without a length, the body is cut off at the same limit, with the same answer.
    let (status, body) = host.post_chunked_form("/api/ask", &huge).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("larger than 64 KiB"), "{body}");
}
