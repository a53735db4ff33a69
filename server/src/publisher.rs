//! The sample "ai" publisher: a background job per question that streams an answer into the
//! asker's channel as a start message, small chunks, and an end message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use serde_json::json;

use app::protocol::{MessageKind, TOPIC_AI};
use app::token::random_hex;

use crate::broker::{Broker, Draft, PublishError};

/// Tries per message before an answer gives up: about 8 s of broker outage in all.
const SEND_ATTEMPTS: u32 = 6;

/// Where answers come from. A real model client would implement this and stream its tokens.
pub trait AnswerSource: Send + Sync + 'static {
    fn answer(&self, prompt: &str) -> BoxStream<'static, Result<String, String>>;
}

/// Deterministic text built from the prompt, one word per chunk, with a delay between chunks
/// to look like a model thinking. The same prompt always gives the same answer.
pub struct SampleAnswers {
    pub words: usize,
    pub delay: Duration,
}

const VOCABULARY: &[&str] = &[
    "signals",
    "streams",
    "offsets",
    "replay",
    "channels",
    "topics",
    "tokens",
    "sockets",
    "hydration",
    "brokers",
    "latency",
    "history",
    "epochs",
    "chunks",
    "sessions",
    "queues",
    "answers",
    "clients",
    "servers",
    "messages",
    "backoff",
    "refresh",
    "fan-out",
    "delivery",
];

impl SampleAnswers {
    /// The whole answer as its chunks, without delay.
    pub fn chunks(&self, prompt: &str) -> Vec<String> {
        let mut state = fnv1a(prompt.as_bytes()) | 1;
        let mut next = move || {
            // xorshift64: small, deterministic, good enough for picking words.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut chunks = vec![format!("You asked about \"{}\". ", prompt.trim())];
        for i in 1..self.words {
            let word = VOCABULARY[(next() % VOCABULARY.len() as u64) as usize];
            let end = if i % 12 == 11 { ". " } else { " " };
            chunks.push(format!("{word}{end}"));
        }
        chunks.push("That is all.".to_owned());
        chunks
    }
}

impl AnswerSource for SampleAnswers {
    fn answer(&self, prompt: &str) -> BoxStream<'static, Result<String, String>> {
        let delay = self.delay;
        stream::iter(self.chunks(prompt))
            .then(move |chunk| async move {
                tokio::time::sleep(delay).await;
                Ok(chunk)
            })
            .boxed()
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Runs answer jobs, at most `max_per_channel` at a time for one channel.
pub struct AiPublisher {
    broker: Arc<dyn Broker>,
    source: Arc<dyn AnswerSource>,
    running: Arc<Mutex<HashMap<String, usize>>>,
    max_per_channel: usize,
}

impl AiPublisher {
    pub fn new(
        broker: Arc<dyn Broker>,
        source: Arc<dyn AnswerSource>,
        max_per_channel: usize,
    ) -> Self {
        Self {
            broker,
            source,
            running: Arc::default(),
            max_per_channel,
        }
    }

    /// Starts streaming an answer to `prompt` into `channel`; returns the run id.
    // Limitation: the answers running are counted per host, so with several hosts a user can
    // have that many streaming on each.
    pub fn start(&self, channel: String, prompt: String) -> Result<String, String> {
        {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            let n = running.entry(channel.clone()).or_default();
            if *n >= self.max_per_channel {
                return Err(format!(
                    "{} answers are already streaming; wait for one to finish",
                    self.max_per_channel
                ));
            }
            *n += 1;
        }
        let run_id = random_hex(8);
        let job = AnswerJob {
            broker: self.broker.clone(),
            channel,
            run_id: run_id.clone(),
            running: self.running.clone(),
        };
        let chunks = self.source.answer(&prompt);
        tokio::spawn(job.run(prompt, chunks));
        Ok(run_id)
    }
}

struct AnswerJob {
    broker: Arc<dyn Broker>,
    channel: String,
    run_id: String,
    running: Arc<Mutex<HashMap<String, usize>>>,
}

impl AnswerJob {
    async fn run(self, prompt: String, mut chunks: BoxStream<'static, Result<String, String>>) {
        tracing::info!(channel = %self.channel, run = %self.run_id, "answer started");
        let mut sent = 0u64;
        let mut failure = self
            .send(MessageKind::DatastreamStart, json!({ "prompt": prompt }))
            .await
            .err();
        while failure.is_none() {
            match chunks.next().await {
                Some(Ok(text)) => {
                    let data = json!({ "seq": sent, "text": text });
                    failure = self.send(MessageKind::Chunk, data).await.err();
                    if failure.is_none() {
                        sent += 1;
                    }
                }
                Some(Err(e)) => failure = Some(e),
                None => break,
            }
        }
        let mut end = json!({ "chunks": sent });
        if let Some(error) = &failure {
            tracing::warn!(channel = %self.channel, run = %self.run_id, %error, "answer failed");
            end["error"] = json!(error);
        }
        let _ = self.send(MessageKind::DatastreamEnd, end).await;
        tracing::info!(channel = %self.channel, run = %self.run_id, chunks = sent, "answer finished");
    }

    /// Publishes one message, trying again after a short broker outage. A retry after a
    /// timeout may store a message twice; the page keeps the first copy of each `seq`.
    async fn send(&self, kind: MessageKind, data: serde_json::Value) -> Result<(), String> {
        let draft = Draft {
            kind,
            topic: TOPIC_AI.to_owned(),
            data: serde_json::value::to_raw_value(&data).map_err(|e| e.to_string())?,
            run_id: Some(self.run_id.clone()),
            stream_id: Some(self.run_id.clone()),
        };
        let mut delay = Duration::from_millis(250);
        for _ in 1..SEND_ATTEMPTS {
            match self.broker.publish(&self.channel, draft.clone()).await {
                Ok(_) => return Ok(()),
                Err(PublishError::Unavailable(e)) => {
                    tracing::warn!(channel = %self.channel, run = %self.run_id, error = %e, "publish failed; trying again");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        self.broker
            .publish(&self.channel, draft)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

impl Drop for AnswerJob {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = running.get_mut(&self.channel) {
            *n -= 1;
            if *n == 0 {
                running.remove(&self.channel);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_prompt_same_answer() {
        let s = SampleAnswers {
            words: 20,
            delay: Duration::ZERO,
        };
        assert_eq!(s.chunks("why?"), s.chunks("why?"));
        assert_ne!(s.chunks("why?"), s.chunks("how?"));
        assert_eq!(s.chunks("why?").len(), 21);
    }
}
