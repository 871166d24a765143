//! Cross-process tests: real `miyamoto` processes on real sockets, a real
//! HTTP server receiving the webhooks. Every test runs under a timeout
//! (see `util::run`), which kills its processes when it fires.

mod util;

mod api;
mod bench;
mod chaos;
mod cluster;
mod curve;
mod durability;
mod hardening;
mod link;
mod metrics;
mod openapi;
mod python;
mod queues;
mod restarts;
mod security;
mod ui;
mod views;
mod webhooks;
mod zmq_clients;
