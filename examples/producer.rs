//! Enqueue tasks straight over ZeroMQ, without the HTTP gateway.
//!
//! ```text
//! miyamoto standalone &
//! cargo run --example producer -- tcp://127.0.0.1:7000 http://localhost:9099/worker
//! ```

use client::Producer;
use protocol::TaskSpec;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let broker = args.next().unwrap_or_else(|| "tcp://127.0.0.1:7000".into());
    let url = args.next().unwrap_or_else(|| "zmq://example".into());

    let mut producer = Producer::connect(&broker)?;
    println!("connected to node {}", producer.ping()?);

    // A webhook in 5 seconds, with one parameter.
    let (id, eta) = producer.enqueue(
        "default",
        TaskSpec {
            url: url.clone(),
            countdown: Some(5.0),
            params: vec![("foo".into(), "bar".into())],
            ..Default::default()
        },
    )?;
    println!("scheduled {id} for {eta:.3}");

    // Inspect it, then enqueue and cancel a second one.
    println!("state: {:?}", producer.get("default", &id)?.state);
    let (other, _) = producer.enqueue(
        "default",
        TaskSpec {
            url,
            countdown: Some(60.0),
            ..Default::default()
        },
    )?;
    producer.cancel("default", &other)?;
    println!("cancelled {other}");
    Ok(())
}
