//! The leptos-realtime host: an axum server that renders the Leptos app, runs the broker's
//! WebSocket endpoint, and hosts the sample ai publisher.

pub mod broker;
pub mod config;
pub mod connection;
pub mod connections;
pub mod host;
pub mod publish_api;
pub mod publisher;
pub mod session_store;
