//! End-to-end tests against real PostgreSQL and NATS, and the embedded
//! default (SQLite + in-process bus).

mod auth;
mod bad_input;
mod cursors;
mod front;
mod outage;
mod poll;
mod poll_errors;
mod publish;
mod push;
mod push_delivery;
mod retention;
mod sse;
mod ws;
