//! Starts the host with configuration from the environment: `LEPTOS_*` for the site,
//! `REALTIME_*` for the broker (see README.md).

use std::io::IsTerminal;

use leptos::config::get_configuration;
use tracing_subscriber::EnvFilter;

use server::config::Config;
use server::host::{serve, Realtime};

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        // Colours only on a terminal, not in log files.
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    if let Err(e) = run().await {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let conf = get_configuration(None)?;
    let config = Config::from_env()?;
    let realtime = Realtime::new(config).await?;
    serve(conf.leptos_options.site_addr, conf.leptos_options, realtime).await?;
    Ok(())
}
