//! The push-dispatcher service on its own (distributed deployments).

use clap::Parser;
use rt_core::config::Settings;

/// Web Push: hands out the VAPID public key, keeps browsers' push
/// subscriptions and delivers every event of their topics to them, at least once.
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
    rt_core::server::run_service_with(
        "push-dispatcher",
        args.settings,
        rt_push_dispatcher::routes(),
        vec![rt_push_dispatcher::worker()],
    )
    .await
}
