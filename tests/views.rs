//! The whole cluster through any gateway (issue 17): a queue's figures,
//! the queues and a queue's task listing, gathered from every node of a
//! 3-node cluster, each task counted and listed once however many nodes
//! hold it, and paged through to the end.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;

use crate::cluster::Cluster;
use crate::util::*;

/// Every task of `queue` through `gateway`, `limit` a page; the pages seen.
fn list_all(gateway: &Node, queue: &str, query: &str, limit: u32) -> (Vec<Value>, usize) {
    let mut all = Vec::new();
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let url = gateway.url(&format!(
            "/queue/{queue}/tasks?limit={limit}{query}&cursor={cursor}"
        ));
        let (status, v) = http("GET", &url, &[], "");
        assert_eq!(status, 200, "{v}");
        assert!(v.get("unreachable").is_none(), "{v}");
        let tasks = v["tasks"].as_array().unwrap();
        assert!(tasks.len() <= limit as usize);
        all.extend(tasks.iter().cloned());
        pages += 1;
        assert!(pages < 1000, "the cursor never ends");
        match v["next_cursor"].as_str() {
            // URL-safe as it comes (`c` and base64url).
            Some(c) => cursor = c.to_string(),
            None => return (all, pages),
        }
    }
}

#[test]
fn any_gateway_shows_the_whole_cluster_each_task_once() {
    let _one = heavy();
    run(Duration::from_secs(240), |h| {
        let c = Cluster::start(h, 3, &["--in-memory"]);
        // A second gateway, on another node.
        let http_port = free_port();
        h.spawn(&[
            "gateway",
            "--listen",
            &format!("127.0.0.1:{http_port}"),
            "--broker",
            &format!("tcp://127.0.0.1:{}", c.bases[2]),
        ]);
        let other = Node {
            base: c.bases[2],
            http: http_port,
            pid: 0,
        };
        other.wait_ready();
        let n = 250;
        let mut ids = HashSet::new();
        for i in 0..n {
            let (status, v) = post_form(
                &c.gateway.url("/queue/viewed"),
                &format!("task.url=http://127.0.0.1:9/x&task.countdown=3600&i={i}"),
            );
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["replicas"], 2, "{v}");
            ids.insert(v["id"].as_str().unwrap().to_string());
        }
        for _ in 0..10 {
            let (status, _) = post_form(
                &other.url("/queue/other"),
                "task.url=http://127.0.0.1:9/x&task.countdown=3600",
            );
            assert_eq!(status, 200);
        }
        let cancelled: Vec<String> = ids.iter().take(5).cloned().collect();
        for id in &cancelled {
            let (status, v) = http(
                "DELETE",
                &c.gateway.url(&format!("/queue/viewed/tasks/{id}")),
                &[],
                "",
            );
            assert_eq!(status, 200, "{v}");
        }
        // The gateways may learn the roster a moment after it settles: wait
        // until both see all three brokers, each holding tasks.
        for g in [&c.gateway, &other] {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let (_, v) = http("GET", &g.url("/queue/viewed"), &[], "");
                if v["stats"]["scheduled"] == n - 5 && v["stats"]["cancelled"] == 5 {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "figures never whole: {v}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        for g in [&c.gateway, &other] {
            // Figures: every task once, though two nodes hold each.
            let (status, v) = http("GET", &g.url("/queue/viewed"), &[], "");
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["stats"]["scheduled"], n - 5, "{v}");
            assert_eq!(v["stats"]["cancelled"], 5, "{v}");

            // The queues, a page of one at a time.
            let (status, v) = http("GET", &g.url("/queues?limit=1"), &[], "");
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["queues"][0]["name"], "other", "{v}");
            assert_eq!(v["queues"][0]["stats"]["scheduled"], 10, "{v}");
            let next = v["next_cursor"]
                .as_str()
                .expect("a second page")
                .to_string();
            let (_, v) = http(
                "GET",
                &g.url(&format!("/queues?limit=1&cursor={next}")),
                &[],
                "",
            );
            assert_eq!(v["queues"][0]["name"], "viewed", "{v}");
            assert_eq!(v["queues"][0]["stats"]["scheduled"], n - 5, "{v}");
            assert!(v["next_cursor"].is_null(), "{v}");

            // The tasks, 40 a page: each exactly once, with its holders.
            let (all, pages) = list_all(g, "viewed", "", 40);
            let listed: Vec<String> = all
                .iter()
                .map(|t| t["id"].as_str().unwrap().to_string())
                .collect();
            let unique: HashSet<String> = listed.iter().cloned().collect();
            assert_eq!(listed.len(), n as usize, "listed twice or missed");
            assert_eq!(unique, ids);
            assert!(pages >= (n as usize).div_ceil(40), "{pages} pages");
            assert!(all
                .iter()
                .all(|t| t["holders"].as_array().is_some_and(|h| h.len() == 2)));
            let created: Vec<f64> = all.iter().map(|t| t["created"].as_f64().unwrap()).collect();
            assert!(
                created.windows(2).all(|w| w[0] <= w[1]),
                "not in creation order"
            );

            // Filtered by state.
            let (all, _) = list_all(g, "viewed", "&state=cancelled", 2);
            let got: HashSet<String> = all
                .iter()
                .map(|t| t["id"].as_str().unwrap().to_string())
                .collect();
            assert_eq!(got, cancelled.iter().cloned().collect::<HashSet<_>>());

            // A cursor that is not one is refused.
            let (status, _) = http(
                "GET",
                &g.url("/queue/viewed/tasks?cursor=nonsense"),
                &[],
                "",
            );
            assert_eq!(status, 400);
        }
    });
}
