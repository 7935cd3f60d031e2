//! The push-dispatcher service on its own (distributed deployments).

use clap::Parser;
use rt_core::config::Settings;

/// Web Push: hands out the VAPID public key and keeps browsers' push
/// subscriptions (delivery of events to them comes next).
#[derive(Parser)]
#[command(name = "push-dispatcher", version)]
struct Args {
    #[command(flatten)]
    settings: Settings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    rt_push_dispatcher::check_settings(&args.settings)?;
    rt_core::server::run_service(
        "push-dispatcher",
        args.settings,
        rt_push_dispatcher::configure,
    )
    .await
}
