//! `use_realtime`: the hook a component calls to receive its user's live messages, and the
//! options and handle that go with it.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use leptos::prelude::*;

use super::status::{ConnectionState, RealtimeError};
use super::timing::Backoff;
use crate::api::{self, ApiError};
use crate::protocol::{Envelope, Recovery, TokenGrant};

/// What a token fetcher returns.
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<TokenGrant, ApiError>>>>;

/// Gets a subscription token for a list of topics. [`TokenFetcher::default`] calls the
/// `subscription_token` server function.
#[derive(Clone)]
pub struct TokenFetcher(Rc<dyn Fn(Vec<String>) -> TokenFuture>);

impl TokenFetcher {
    pub fn new<F, Fut>(fetch: F) -> Self
    where
        F: Fn(Vec<String>) -> Fut + 'static,
        Fut: Future<Output = Result<TokenGrant, ApiError>> + 'static,
    {
        Self(Rc::new(move |topics| Box::pin(fetch(topics))))
    }

    pub fn fetch(&self, topics: Vec<String>) -> TokenFuture {
        (self.0)(topics)
    }
}

impl Default for TokenFetcher {
    fn default() -> Self {
        Self::new(api::subscription_token)
    }
}

/// How [`use_realtime`] subscribes. Build with [`RealtimeOptions::new`] and the setters.
#[derive(Clone)]
pub struct RealtimeOptions {
    /// Topics to ask a token for, and to subscribe to first.
    pub topics: Vec<String>,
    /// Connects while true; closes the socket while false.
    pub enabled: Signal<bool>,
    /// Deliver messages in batches gathered over this long, instead of one per frame.
    pub buffer_interval: Option<Duration>,
    pub token_fetcher: TokenFetcher,
    pub backoff: Backoff,
    /// After a reload in the same tab, ask for the channel's history again, so the page shows
    /// what it showed before (as far as the history reaches back).
    pub resume_after_reload: bool,
}

impl RealtimeOptions {
    pub fn new<I, T>(topics: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        Self {
            topics: topics.into_iter().map(Into::into).collect(),
            enabled: Signal::stored(true),
            buffer_interval: None,
            token_fetcher: TokenFetcher::default(),
            backoff: Backoff::default(),
            resume_after_reload: true,
        }
    }

    pub fn enabled(mut self, enabled: impl Into<Signal<bool>>) -> Self {
        self.enabled = enabled.into();
        self
    }

    pub fn buffer_interval(mut self, interval: Duration) -> Self {
        self.buffer_interval = Some(interval);
        self
    }

    pub fn token_fetcher(mut self, fetcher: TokenFetcher) -> Self {
        self.token_fetcher = fetcher;
        self
    }

    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    pub fn resume_after_reload(mut self, resume: bool) -> Self {
        self.resume_after_reload = resume;
        self
    }
}

/// The writable side of the signals a subscription exposes; only the connection writes them.
#[derive(Clone, Copy)]
pub(super) struct Sinks {
    pub data: RwSignal<Vec<Envelope>>,
    pub latest_data: RwSignal<Option<Envelope>>,
    pub fresh_data: RwSignal<Vec<Envelope>>,
    pub error: RwSignal<Option<RealtimeError>>,
    pub state: RwSignal<ConnectionState>,
    pub recovery: RwSignal<Option<Recovery>>,
    pub topics: RwSignal<Vec<String>>,
}

impl Sinks {
    fn new(options: &RealtimeOptions) -> Self {
        // Server and browser start from the same values, so hydration sees the same markup.
        let state = if options.enabled.get_untracked() {
            ConnectionState::Connecting
        } else {
            ConnectionState::Closed
        };
        Self {
            data: RwSignal::new(Vec::new()),
            latest_data: RwSignal::new(None),
            fresh_data: RwSignal::new(Vec::new()),
            error: RwSignal::new(None),
            state: RwSignal::new(state),
            recovery: RwSignal::new(None),
            topics: RwSignal::new(options.topics.clone()),
        }
    }
}

/// What [`use_realtime`] returns: reactive views of the subscription, plus commands.
#[derive(Clone, Copy)]
pub struct RealtimeSubscription {
    /// Every message delivered so far, in channel order, without duplicates.
    pub data: ReadSignal<Vec<Envelope>>,
    /// The last message delivered.
    pub latest_data: ReadSignal<Option<Envelope>>,
    /// The messages of the last delivered batch.
    pub fresh_data: ReadSignal<Vec<Envelope>>,
    /// The last failure; cleared when a subscription succeeds again.
    pub error: ReadSignal<Option<RealtimeError>>,
    pub state: ReadSignal<ConnectionState>,
    /// How the last resumed subscription went; `None` until a reconnect resumes.
    pub recovery: ReadSignal<Option<Recovery>>,
    /// The topics the connection is subscribed to (or will be, on its next connect).
    pub topics: ReadSignal<Vec<String>>,
    sinks: Sinks,
    #[cfg(feature = "hydrate")]
    connection: StoredValue<super::connection::SharedConnection, LocalStorage>,
}

impl RealtimeSubscription {
    /// Adds `topics` to the subscription. The token must cover them, or the server refuses
    /// and `error` says so.
    pub fn subscribe(&self, topics: Vec<String>) {
        self.change_topics(TopicChange::Add(topics));
    }

    /// Stops delivery of `topics`.
    pub fn unsubscribe(&self, topics: Vec<String>) {
        self.change_topics(TopicChange::Remove(topics));
    }

    fn change_topics(&self, change: TopicChange) {
        #[cfg(feature = "hydrate")]
        {
            let sent = self.connection.try_with_value(|connection| {
                connection
                    .try_borrow_mut()
                    .map(|mut c| c.change_topics(change.clone()))
                    .is_ok()
            });
            if sent == Some(true) {
                return;
            }
        }
        self.sinks.topics.try_update(|topics| change.apply(topics));
    }
}

/// A change to the subscribed topics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum TopicChange {
    Add(Vec<String>),
    Remove(Vec<String>),
}

impl TopicChange {
    pub fn apply(&self, topics: &mut Vec<String>) {
        match self {
            TopicChange::Add(added) => {
                for topic in added {
                    if !topics.contains(topic) {
                        topics.push(topic.clone());
                    }
                }
            }
            TopicChange::Remove(removed) => topics.retain(|topic| !removed.contains(topic)),
        }
    }
}

/// Subscribes to the signed-in user's channel on `options.topics` and keeps the connection
/// alive until the calling component is cleaned up. Does nothing during server rendering.
pub fn use_realtime(options: RealtimeOptions) -> RealtimeSubscription {
    let sinks = Sinks::new(&options);

    #[cfg(feature = "hydrate")]
    let connection = {
        let enabled = options.enabled;
        let connection =
            StoredValue::new_local(super::connection::Connection::shared(options, sinks));
        Effect::new(move |_| {
            let wanted = enabled.get();
            connection.with_value(|shared| {
                if let Ok(mut c) = shared.try_borrow_mut() {
                    if wanted {
                        c.start();
                    } else {
                        c.stop();
                    }
                }
            });
        });
        on_cleanup(move || {
            connection.try_with_value(|shared| {
                if let Ok(mut c) = shared.try_borrow_mut() {
                    c.shut_down();
                }
            });
        });
        connection
    };
    #[cfg(not(feature = "hydrate"))]
    drop(options);

    RealtimeSubscription {
        data: sinks.data.read_only(),
        latest_data: sinks.latest_data.read_only(),
        fresh_data: sinks.fresh_data.read_only(),
        error: sinks.error.read_only(),
        state: sinks.state.read_only(),
        recovery: sinks.recovery.read_only(),
        topics: sinks.topics.read_only(),
        sinks,
        #[cfg(feature = "hydrate")]
        connection,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_changes_keep_each_topic_once() {
        let mut topics = vec!["ai".to_string()];
        TopicChange::Add(vec!["ai".into(), "news".into()]).apply(&mut topics);
        assert_eq!(topics, ["ai", "news"]);
        TopicChange::Remove(vec!["ai".into()]).apply(&mut topics);
        assert_eq!(topics, ["news"]);
    }
}
