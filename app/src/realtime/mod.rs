//! Live messages in the browser: [`use_realtime`] subscribes a component to the signed-in
//! user's channel over the broker's WebSocket, the Leptos counterpart of Inngest's
//! `useInngestSubscription`.

#[cfg(feature = "hydrate")]
mod connection;
mod cursor;
mod hook;
#[cfg(feature = "hydrate")]
mod socket;
mod status;
mod timing;

pub use cursor::Cursor;
pub use hook::{use_realtime, RealtimeOptions, RealtimeSubscription, TokenFetcher, TokenFuture};
pub use status::{ConnectionState, RealtimeError};
pub use timing::{refresh_delay, Backoff, TokenClock};
