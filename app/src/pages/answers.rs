//! Turns the ai topic's messages into answers: one per run, its chunks joined in `seq` order.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::protocol::{Envelope, MessageKind, TOPIC_AI};

/// One answer of the sample ai publisher, as far as its messages have arrived.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    pub run_id: String,
    /// From `datastream-start`; `None` while that message is missing.
    pub prompt: Option<String>,
    /// Chunk texts by `seq`; the first copy of a repeated `seq` wins.
    chunks: BTreeMap<u64, String>,
    /// From `datastream-end`; its arrival completes the answer.
    pub expected_chunks: Option<u64>,
    /// Why the publisher stopped early, when the end says it did.
    pub failure: Option<String>,
}

impl Answer {
    /// The answer text so far: the received chunks in `seq` order.
    pub fn text(&self) -> String {
        self.chunks.values().map(String::as_str).collect()
    }

    pub fn chunks_received(&self) -> usize {
        self.chunks.len()
    }

    /// The end arrived: the publisher has sent everything it will.
    pub fn is_finished(&self) -> bool {
        self.expected_chunks.is_some()
    }

    /// Finished without failing, and every part arrived: the start and chunks `0..expected`,
    /// none missing.
    pub fn is_complete(&self) -> bool {
        let Some(expected) = self.expected_chunks else {
            return false;
        };
        if self.failure.is_some() {
            return false;
        }
        let contiguous = self
            .chunks
            .keys()
            .next_back()
            .map_or(expected == 0, |last| last + 1 == expected);
        self.prompt.is_some() && self.chunks.len() as u64 == expected && contiguous
    }
}

#[derive(Deserialize)]
struct StartData {
    prompt: String,
}

#[derive(Deserialize)]
struct ChunkData {
    seq: u64,
    text: String,
}

#[derive(Deserialize)]
struct EndData {
    chunks: u64,
    #[serde(default)]
    error: Option<String>,
}

/// Groups `messages` into answers, in the order their first message arrived. Messages of
/// other topics, without a run id, or with data of the wrong shape are skipped.
// Limitation: the page regroups every message on each delivery, which is linear in the
// history; an incremental fold over `fresh_data` would lift that for long sessions.
pub fn group_answers(messages: &[Envelope]) -> Vec<Answer> {
    let mut answers: Vec<Answer> = Vec::new();
    for message in messages.iter().filter(|m| m.topic == TOPIC_AI) {
        let Some(run_id) = message.run_id.as_ref().or(message.stream_id.as_ref()) else {
            continue;
        };
        let index = match answers.iter().position(|a| &a.run_id == run_id) {
            Some(index) => index,
            None => {
                answers.push(Answer {
                    run_id: run_id.clone(),
                    ..Answer::default()
                });
                answers.len() - 1
            }
        };
        absorb(&mut answers[index], message);
    }
    answers.retain(|a| a.prompt.is_some() || a.chunks_received() > 0 || a.is_finished());
    answers
}

fn absorb(answer: &mut Answer, message: &Envelope) {
    let data = message.data.clone();
    match message.kind {
        MessageKind::DatastreamStart => {
            if let Ok(start) = serde_json::from_value::<StartData>(data) {
                answer.prompt.get_or_insert(start.prompt);
            }
        }
        MessageKind::Chunk => {
            if let Ok(chunk) = serde_json::from_value::<ChunkData>(data) {
                answer.chunks.entry(chunk.seq).or_insert(chunk.text);
            }
        }
        MessageKind::DatastreamEnd => {
            if let Ok(end) = serde_json::from_value::<EndData>(data) {
                if answer.expected_chunks.is_none() {
                    answer.expected_chunks = Some(end.chunks);
                    answer.failure = end.error;
                }
            }
        }
        MessageKind::Data => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn message(kind: MessageKind, run: &str, offset: u64, data: serde_json::Value) -> Envelope {
        Envelope {
            kind,
            id: format!("m{offset}"),
            channel: "user:u".into(),
            topic: TOPIC_AI.into(),
            data,
            created_at: 0,
            run_id: Some(run.into()),
            stream_id: Some(run.into()),
            epoch: "e".into(),
            offset,
        }
    }

    fn start(run: &str, offset: u64, prompt: &str) -> Envelope {
        message(
            MessageKind::DatastreamStart,
            run,
            offset,
            json!({ "prompt": prompt }),
        )
    }

    fn chunk(run: &str, offset: u64, seq: u64, text: &str) -> Envelope {
        message(
            MessageKind::Chunk,
            run,
            offset,
            json!({ "seq": seq, "text": text }),
        )
    }

    fn end(run: &str, offset: u64, chunks: u64) -> Envelope {
        message(
            MessageKind::DatastreamEnd,
            run,
            offset,
            json!({ "chunks": chunks }),
        )
    }

    #[test]
    fn chunks_join_in_seq_order_per_run() {
        let messages = vec![
            start("r1", 1, "why?"),
            chunk("r1", 2, 0, "Because "),
            start("r2", 3, "how?"),
            chunk("r1", 4, 2, "is."),
            chunk("r2", 5, 0, "Carefully."),
            chunk("r1", 6, 1, "it "),
            end("r1", 7, 3),
        ];
        let answers = group_answers(&messages);
        assert_eq!(answers.len(), 2);

        let first = &answers[0];
        assert_eq!(first.run_id, "r1");
        assert_eq!(first.prompt.as_deref(), Some("why?"));
        assert_eq!(first.text(), "Because it is.");
        assert_eq!(first.chunks_received(), 3);
        assert_eq!(first.expected_chunks, Some(3));
        assert!(first.is_complete());

        let second = &answers[1];
        assert_eq!(second.text(), "Carefully.");
        assert!(!second.is_complete());
    }

    #[test]
    fn repeated_chunks_count_once() {
        let messages = vec![
            start("r1", 1, "q"),
            chunk("r1", 2, 0, "a"),
            chunk("r1", 3, 0, "a-again"),
            chunk("r1", 4, 1, "b"),
        ];
        let answers = group_answers(&messages);
        assert_eq!(answers[0].text(), "ab");
        assert_eq!(answers[0].chunks_received(), 2);
    }

    #[test]
    fn an_answer_without_its_start_still_shows_its_text() {
        let answers = group_answers(&[chunk("r9", 1, 0, "late"), end("r9", 2, 1)]);
        assert_eq!(answers[0].prompt, None);
        assert_eq!(answers[0].text(), "late");
        assert!(answers[0].is_finished());
        assert!(
            !answers[0].is_complete(),
            "an answer joined mid-stream is not whole"
        );
    }

    #[test]
    fn a_missing_chunk_keeps_a_finished_answer_incomplete() {
        let answers = group_answers(&[
            start("r1", 1, "q"),
            chunk("r1", 2, 0, "a"),
            chunk("r1", 4, 2, "c"),
            end("r1", 5, 3),
        ]);
        assert!(answers[0].is_finished());
        assert!(!answers[0].is_complete());
    }

    #[test]
    fn other_topics_and_malformed_messages_are_skipped() {
        let mut other = chunk("r1", 1, 0, "x");
        other.topic = "news".into();
        let malformed = message(MessageKind::Chunk, "r2", 2, json!({ "text": "no seq" }));
        assert!(group_answers(&[other, malformed]).is_empty());
    }

    #[test]
    fn an_answer_whose_publisher_gave_up_is_never_complete() {
        let run = "r-failed";
        let messages = vec![
            message(MessageKind::DatastreamStart, run, 1, json!({"prompt": "p"})),
            message(MessageKind::Chunk, run, 2, json!({"seq": 0, "text": "a"})),
            message(
                MessageKind::DatastreamEnd,
                run,
                3,
                json!({"chunks": 1, "error": "broker unavailable"}),
            ),
        ];
        let answers = group_answers(&messages);
        assert!(answers[0].is_finished());
        assert!(!answers[0].is_complete());
        assert_eq!(answers[0].failure.as_deref(), Some("broker unavailable"));
    }
}
