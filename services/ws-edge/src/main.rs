//! The ws-edge service on its own (distributed deployments).

use clap::Parser;
use rt_core::config::Settings;

/// Serves events over WebSockets: subscribe, unsubscribe, publish with acks.
#[derive(Parser)]
#[command(name = "ws-edge", version)]
struct Args {
    #[command(flatten)]
    settings: Settings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    rt_core::server::run_service("ws-edge", args.settings, rt_ws_edge::routes()).await
}
