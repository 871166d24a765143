//! `GET /metrics`: the gateway's own figures and every broker's (each
//! answers `stats` for itself; its series are labelled `node`), in the
//! Prometheus text format.
//!
//! The families are built with the `prometheus` crate's data model and
//! written by its `TextEncoder` (the classic text format, which every
//! Prometheus and `promtool check metrics` read). The brokers' figures
//! arrive as numbers, histograms included, so they are written as given
//! rather than observed again; the official `prometheus-client` crate
//! writes only OpenMetrics text, whose counter `# TYPE` lines
//! `promtool check metrics` does not accept.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram as PromHistogram, LabelPair, Metric, MetricFamily, MetricType,
};
use protocol::{Histogram, NodeStats, LATENCY_BUCKETS};

/// What the gateway itself counts.
#[derive(Debug)]
pub struct GatewayMetrics {
    webhooks_in_flight: AtomicI64,
    /// Webhook durations by status class (`2xx` … `5xx`, or `error` when
    /// no answer came).
    durations: Mutex<BTreeMap<&'static str, Histogram>>,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        GatewayMetrics {
            webhooks_in_flight: AtomicI64::new(0),
            durations: Mutex::new(BTreeMap::new()),
        }
    }
}

/// A webhook's status class, a bounded label.
fn status_class(status: Option<u16>) -> &'static str {
    match status {
        Some(100..=199) => "1xx",
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        Some(_) => "other",
        None => "error",
    }
}

impl GatewayMetrics {
    pub fn webhook_started(&self) {
        self.webhooks_in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn webhook_finished(&self, status: Option<u16>, took: Duration) {
        self.webhooks_in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut d) = self.durations.lock() {
            d.entry(status_class(status))
                .or_insert_with(|| Histogram::new(LATENCY_BUCKETS))
                .observe(took.as_secs_f64());
        }
    }

    /// The exposition: the gateway's families, then every broker's.
    /// `brokers` holds each known broker's endpoint and its `stats`, or
    /// why it gave none.
    pub fn render(&self, brokers: &[(String, Result<NodeStats, String>)]) -> String {
        let mut f = Families::default();
        f.gauge(
            "miyamoto_gateway_webhooks_in_flight",
            "Webhook requests under way in this gateway.",
            &[],
            self.webhooks_in_flight.load(Ordering::Relaxed).max(0) as f64,
        );
        if let Ok(d) = self.durations.lock() {
            for (class, h) in d.iter() {
                f.histogram(
                    "miyamoto_webhook_duration_seconds",
                    "Time from sending a webhook to its answer (or failure), by status class.",
                    &[("status_class", class)],
                    h,
                );
            }
        }
        for (endpoint, stats) in brokers {
            f.gauge(
                "miyamoto_broker_up",
                "Whether the broker answered this scrape's stats request.",
                &[("broker", endpoint)],
                if stats.is_ok() { 1.0 } else { 0.0 },
            );
        }
        for s in brokers.iter().filter_map(|(_, s)| s.as_ref().ok()) {
            node_families(&mut f, s);
        }
        f.encode()
    }
}

/// One broker's families.
fn node_families(f: &mut Families, s: &NodeStats) {
    let node = s.node.as_str();
    for q in &s.queues {
        let l = [("node", node), ("queue", q.name.as_str())];
        f.counter(
            "miyamoto_tasks_enqueued_total",
            "Tasks accepted from clients, by the node that answered the enqueue.",
            &l,
            q.enqueued as f64,
        );
        for (outcome, v) in [
            ("succeeded", q.succeeded),
            ("failed_attempt", q.failed_attempts),
            ("dead_letter", q.dead_letters),
            ("cancelled", q.cancelled),
        ] {
            f.counter(
                "miyamoto_tasks_delivered_total",
                "Outcomes of tasks held by the node: succeeded, failed attempts, dead letters, cancelled.",
                &[l[0], l[1], ("outcome", outcome)],
                v as f64,
            );
        }
        f.counter(
            "miyamoto_tasks_retried_total",
            "Failed attempts followed by another attempt.",
            &l,
            q.retried as f64,
        );
        let st = &q.states;
        for (state, v) in [
            ("scheduled", st.scheduled),
            ("running", st.running),
            ("retrying", st.retrying),
            ("failed", st.failed),
            ("succeeded", st.succeeded),
            ("cancelled", st.cancelled),
        ] {
            f.gauge(
                "miyamoto_tasks",
                "Tasks the node holds, by queue and state.",
                &[l[0], l[1], ("state", state)],
                v as f64,
            );
        }
        f.gauge(
            "miyamoto_queue_oldest_due_age_seconds",
            "How long the oldest due task not yet dispatched has waited.",
            &l,
            st.lag,
        );
    }
    let n = [("node", node)];
    f.gauge(
        "miyamoto_stats_queues_left_out",
        "Queues the node's stats answer left out (past its bound).",
        &n,
        s.queues_left_out as f64,
    );
    f.histogram(
        "miyamoto_dispatch_lateness_seconds",
        "From a task's fire time to the start of its delivery.",
        &n,
        &s.dispatch_lateness,
    );
    for p in &s.pools {
        let l = [("node", node), ("pool", p.pool.as_str())];
        f.gauge(
            "miyamoto_workers",
            "Workers connected, by pool (the gateway's webhook workers are pool *http).",
            &l,
            p.workers as f64,
        );
        f.gauge(
            "miyamoto_worker_credit",
            "Deliveries the pool's workers can take now.",
            &l,
            p.credit as f64,
        );
    }
    f.gauge(
        "miyamoto_store_tasks",
        "Tasks the node holds, in every state.",
        &n,
        s.tasks as f64,
    );
    f.gauge(
        "miyamoto_store_task_bytes",
        "Memory counted for the node's tasks (--max-pending-bytes is its bound).",
        &n,
        s.task_bytes as f64,
    );
    if let Some(h) = &s.journal_sync {
        f.histogram(
            "miyamoto_journal_sync_seconds",
            "Time to write and fdatasync one batch of changes to the journal.",
            &n,
            h,
        );
    }
    if let Some(b) = s.journal_bytes {
        f.gauge(
            "miyamoto_journal_bytes",
            "Bytes in the node's journal segments.",
            &n,
            b as f64,
        );
    }
    let c = &s.cluster;
    f.gauge(
        "miyamoto_cluster_members",
        "Members in the node's roster.",
        &n,
        c.members as f64,
    );
    f.gauge(
        "miyamoto_cluster_is_leader",
        "Whether the node leads its cluster.",
        &n,
        f64::from(u8::from(c.is_leader)),
    );
    f.gauge(
        "miyamoto_cluster_has_leader",
        "Whether the node knows a leader.",
        &n,
        f64::from(u8::from(c.leader.is_some())),
    );
    f.gauge(
        "miyamoto_cluster_term",
        "The node's Raft term.",
        &n,
        c.term as f64,
    );
    f.gauge(
        "miyamoto_cluster_roster_epoch",
        "The roster's epoch as the node knows it.",
        &n,
        c.epoch as f64,
    );
    f.counter(
        "miyamoto_re_replicated_copies_total",
        "Task copies the node sent to restore the replication factor.",
        &n,
        c.re_replicated as f64,
    );
    for (peer, up) in &c.peers {
        f.gauge(
            "miyamoto_cluster_peer_up",
            "Whether the node heard from this member lately.",
            &[("node", node), ("peer", peer.as_str())],
            f64::from(u8::from(*up)),
        );
    }
}

/// Families by name, in the order first seen.
#[derive(Default)]
struct Families {
    order: Vec<String>,
    by_name: BTreeMap<String, MetricFamily>,
}

impl Families {
    fn family(&mut self, name: &str, help: &str, kind: MetricType) -> &mut MetricFamily {
        if !self.by_name.contains_key(name) {
            let mut f = MetricFamily::default();
            f.set_name(name.to_string());
            f.set_help(help.to_string());
            f.set_field_type(kind);
            self.order.push(name.to_string());
            self.by_name.insert(name.to_string(), f);
        }
        self.by_name
            .get_mut(name)
            .expect("inserted above when missing")
    }

    fn push(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        labels: &[(&str, &str)],
        m: Metric,
    ) {
        let mut m = m;
        m.set_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut l = LabelPair::default();
                    l.set_name(k.to_string());
                    l.set_value(v.to_string());
                    l
                })
                .collect(),
        );
        self.family(name, help, kind).mut_metric().push(m);
    }

    fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], v: f64) {
        let mut c = Counter::default();
        c.set_value(v);
        let mut m = Metric::default();
        m.set_counter(c);
        self.push(name, help, MetricType::COUNTER, labels, m);
    }

    fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], v: f64) {
        let mut g = Gauge::default();
        g.set_value(v);
        self.push(name, help, MetricType::GAUGE, labels, Metric::from_gauge(g));
    }

    fn histogram(&mut self, name: &str, help: &str, labels: &[(&str, &str)], h: &Histogram) {
        let mut p = PromHistogram::default();
        p.set_sample_count(h.count);
        p.set_sample_sum(h.sum);
        // The encoder adds the +Inf bucket from the count.
        p.set_bucket(
            h.cumulative()
                .into_iter()
                .filter(|(b, _)| b.is_finite())
                .map(|(bound, count)| {
                    let mut b = Bucket::default();
                    b.set_upper_bound(bound);
                    b.set_cumulative_count(count);
                    b
                })
                .collect(),
        );
        let mut m = Metric::default();
        m.set_histogram(p);
        self.push(name, help, MetricType::HISTOGRAM, labels, m);
    }

    fn encode(self) -> String {
        let mut by_name = self.by_name;
        let families: Vec<MetricFamily> = self
            .order
            .iter()
            .filter_map(|n| by_name.remove(n))
            .collect();
        let mut out = String::new();
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_and_the_gateway_render_in_the_text_format() {
        let m = GatewayMetrics::default();
        m.webhook_started();
        m.webhook_finished(Some(204), Duration::from_millis(3));
        m.webhook_started();
        let mut s = NodeStats {
            node: "n1".into(),
            dispatch_lateness: Histogram::new(LATENCY_BUCKETS),
            ..Default::default()
        };
        s.queues.push(protocol::QueueCounters {
            name: "q".into(),
            enqueued: 5,
            succeeded: 4,
            ..Default::default()
        });
        let text = m.render(&[
            ("tcp://a:1".into(), Ok(s)),
            ("tcp://b:1".into(), Err("timeout".into())),
        ]);
        assert!(
            text.contains("miyamoto_gateway_webhooks_in_flight 1\n"),
            "{text}"
        );
        assert!(text.contains("miyamoto_webhook_duration_seconds_count{status_class=\"2xx\"} 1"));
        assert!(text.contains("miyamoto_tasks_enqueued_total{node=\"n1\",queue=\"q\"} 5"));
        assert!(text.contains(
            "miyamoto_tasks_delivered_total{node=\"n1\",queue=\"q\",outcome=\"succeeded\"} 4"
        ));
        assert!(text.contains("miyamoto_broker_up{broker=\"tcp://b:1\"} 0"));
        assert!(text.contains("# TYPE miyamoto_tasks_enqueued_total counter"));
    }
}
