//! The all-in-one binary: every service's routes in one process.
//!
//! With no flags it runs the embedded default: an SQLite file in `./data`, an
//! in-process bus, on 127.0.0.1:8080. With `--database-url` and `--nats-url`
//! it uses Postgres and NATS like the distributed services.

use clap::Parser;
use rt_core::config::Settings;

/// Real-time event delivery: publish over HTTP, poll (short and long) with
/// positions or named cursors, stream Server-Sent Events, WebSockets, and
/// Web Push subscriptions; every service in one process.
#[derive(Parser)]
#[command(name = "realtime", version)]
struct Args {
    #[command(flatten)]
    settings: Settings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    rt_push_dispatcher::check_settings(&args.settings)?;
    rt_core::server::run_service_with(
        "realtime",
        args.settings,
        realtime::routes(),
        vec![rt_push_dispatcher::worker()],
    )
    .await
}
