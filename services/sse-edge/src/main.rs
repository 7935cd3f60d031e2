//! The sse-edge service on its own (distributed deployments).

use clap::Parser;
use rt_core::config::Settings;

/// Streams events to browsers and other clients as Server-Sent Events.
#[derive(Parser)]
#[command(name = "sse-edge", version)]
struct Args {
    #[command(flatten)]
    settings: Settings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    rt_core::server::run_service("sse-edge", args.settings, rt_sse_edge::routes()).await
}
