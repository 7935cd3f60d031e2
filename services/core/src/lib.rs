//! The library every realtime service shares.
//!
//! Layout:
//! - [`event`]: topic names, events and the `topic:seq` position format;
//! - [`error`]: the one API error type (HTTP status + JSON body);
//! - [`config`]: settings, read from CLI flags with environment fallbacks;
//! - [`store`]: the durable event log (Postgres, SQLite);
//! - [`bus`]: the fast path between services (NATS, in-process);
//! - [`publish`]: group commit into the store, then the bus;
//! - [`hub`]: live delivery per process: one bus subscription per topic, gap
//!   filling, a recent-events cache, and resume from a client's position;
//! - [`auth`]: JWT bearer tokens and topic patterns;
//! - [`telemetry`], [`metrics`], [`ops`]: logs and traces, Prometheus, health routes;
//! - [`context`], [`server`], [`shutdown`]: what a service holds, and how it
//!   starts and stops.

pub mod auth;
pub mod bus;
pub mod config;
pub mod context;
pub mod error;
pub mod event;
pub mod front;
pub mod gate;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod ops;
pub mod proto;
pub mod publish;
pub mod query;
mod ring;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod telemetry;

pub use context::Context;
pub use error::ApiError;
pub use event::{Event, Position, Topic};
