//! Feeds arbitrary text to both ends of the wire protocol: the server's parse of a client
//! command (and the id it echoes when that fails), and the client's parse of a server frame.
#![no_main]

use app::protocol::{command_id, encode_envelope, ClientCommand, Envelope, ServerFrame};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    // The socket only hands the server text frames, and a text frame is always UTF-8.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check_command(text);
    check_frame(text);
});

/// A command the server accepts must survive a trip back through JSON, and a JSON object that
/// parsed as a command carries the id an error reply would echo.
fn check_command(text: &str) {
    let id = command_id(text);
    let Ok(command) = ClientCommand::parse(text) else {
        return;
    };

    let encoded = serde_json::to_string(&command).expect("a parsed command serializes");
    let again: ClientCommand = serde_json::from_str(&encoded)
        .unwrap_or_else(|e| panic!("re-encoded command {encoded} does not parse: {e}"));
    assert_eq!(
        again, command,
        "command changed on a round trip through {encoded}"
    );

    // `ClientCommand::parse` takes only JSON objects, whose id `command_id` can always read.
    assert_eq!(
        id,
        Some(command_id_of(&command)),
        "command_id disagrees on {text}"
    );
}

fn command_id_of(command: &ClientCommand) -> u64 {
    match command {
        ClientCommand::Auth { id, .. }
        | ClientCommand::Refresh { id, .. }
        | ClientCommand::Subscribe { id, .. }
        | ClientCommand::Unsubscribe { id, .. } => *id,
    }
}

/// A frame the client accepts must re-encode to a frame of the same kind with the same fields.
fn check_frame(text: &str) {
    let Ok(frame) = ServerFrame::parse(text) else {
        return;
    };
    let encoded = match &frame {
        ServerFrame::Message(envelope) => encode_envelope(envelope),
        ServerFrame::Reply(reply) => serde_json::to_string(reply).expect("a reply serializes"),
    };
    let again = ServerFrame::parse(&encoded)
        .unwrap_or_else(|e| panic!("re-encoded frame {encoded} does not parse: {e}"));

    match (&frame, &again) {
        (ServerFrame::Message(a), ServerFrame::Message(b)) => {
            assert_eq!(
                without_data(a),
                without_data(b),
                "envelope changed via {encoded}"
            );
            assert!(
                same_data(&a.data, &b.data),
                "envelope data changed via {encoded}"
            );
        }
        (ServerFrame::Reply(a), ServerFrame::Reply(b)) => {
            assert_eq!(a, b, "reply changed via {encoded}")
        }
        _ => panic!("frame changed kind on a round trip through {encoded}"),
    }
}

fn without_data(envelope: &Envelope) -> Envelope {
    Envelope {
        data: Value::Null,
        ..envelope.clone()
    }
}

/// Most ulps a float may move on one trip through JSON: none, with serde_json's
/// `float_roundtrip` feature, which the workspace turns on.
const FLOAT_ULPS: u64 = 0;

/// Equal JSON, except that floats may differ by `FLOAT_ULPS`.
fn same_data(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() && y.is_f64() => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            x.is_sign_negative() == y.is_sign_negative()
                && x.to_bits().abs_diff(y.to_bits()) <= FLOAT_ULPS
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_data(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_data(v, w)))
        }
        _ => a == b,
    }
}
