//! Decoding the hot messages without serde's buffering.
//!
//! The message enums are internally tagged (`"type"` may appear anywhere in
//! the map, §5), so serde's derived decoder first copies the whole map into
//! an intermediate tree, then decodes that: every string is allocated
//! twice. Every encoder in this project writes `"type"` first (after
//! `request_id` in requests and replies), so for the messages sent once per
//! task (and for batches of enqueues and their answers, when every answer
//! is `enqueued`), [`FastDecode::fast`] reads the keys in that order and decodes the
//! rest of the map straight into the variant's fields. Any other order, any
//! other variant or any error gives `None`, and the derived decoder runs as
//! before, so every error message stays the same.
//!
//! Where both decode a body, they agree (fuzzed: `fuzz/`, the decoder
//! targets). The fast path takes a few bodies the derived decoder refuses,
//! all harmless (what it takes re-encodes to a proper message), found by
//! the fuzz targets and listed in `fuzz/README.md`: a map that repeats
//! `"type"` or `request_id` after its fields (taken by the first); an
//! integer where serde's derived visitors read a field's or variant's
//! index (`"outcome": 1`, a map key u16 `2`); a MessagePack `bin` where a
//! sequence is expected (an empty one reads as `[]`). The derived decoder
//! buffers an internally tagged enum in serde's `Content` first, which is
//! stricter.

use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, DeserializeOwned, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use crate::messages::{default_queue, one};
use crate::{
    AttemptResult, BrokerMessage, ClientCommand, ClientReply, ClientRequest, DeliveredTask,
    DeliveryResult, Dispatched, ReplyBody, TaskSpec, WorkerMessage,
};

/// A message with a fast decoding path for its hot variant.
pub trait FastDecode: DeserializeOwned {
    /// The message, if `body` is the hot variant with its keys in the
    /// order this project writes them; `None` means "use the derived
    /// decoder".
    fn fast(body: &[u8]) -> Option<Self>;
}

/// The hot variants of one message type, chosen by the `"type"` that was
/// read first: decodes the rest of the map into that variant.
trait Variants: Sized {
    fn fields<'de, A: MapAccess<'de>>(tag: &str, map: A) -> Result<Option<Self>, A::Error>;
}

/// Reads `[request_id,] type, fields…` in that order, for any tag that
/// `V` knows.
struct ByTag<V> {
    request_id: bool,
    variants: PhantomData<V>,
}

impl<'de, V: Variants> Visitor<'de> for ByTag<V> {
    type Value = (String, V);

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a message map")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut request_id = String::new();
        if self.request_id {
            if map.next_key::<&str>()? != Some("request_id") {
                return Err(de::Error::custom(OTHER));
            }
            request_id = map.next_value()?;
        }
        if map.next_key::<&str>()? != Some("type") {
            return Err(de::Error::custom(OTHER));
        }
        let tag: &str = map.next_value()?;
        match V::fields(tag, map)? {
            Some(v) => Ok((request_id, v)),
            None => Err(de::Error::custom(OTHER)),
        }
    }
}

fn by_tag<V: Variants>(body: &[u8], request_id: bool) -> Option<(String, V)> {
    let mut d = rmp_serde::Deserializer::from_read_ref(body);
    de::Deserializer::deserialize_map(
        &mut d,
        ByTag {
            request_id,
            variants: PhantomData,
        },
    )
    .ok()
}

const OTHER: &str = "not the fast path";

/// The fields of [`BrokerMessage::Task`].
#[derive(Deserialize)]
struct TaskFields {
    delivery: u64,
    task: DeliveredTask,
}

/// The fields of [`BrokerMessage::Tasks`].
#[derive(Deserialize)]
struct TasksFields {
    tasks: Vec<Dispatched>,
}

/// The fields of [`WorkerMessage::Results`].
#[derive(Deserialize)]
struct ResultsFields {
    results: Vec<DeliveryResult>,
}

/// The fields of [`ClientCommand::Enqueue`], with its defaults.
#[derive(Deserialize)]
struct EnqueueFields {
    #[serde(default = "default_queue")]
    queue: String,
    task: TaskSpec,
    #[serde(default)]
    wait: Option<f64>,
}

/// The fields of [`ClientCommand::EnqueueBatch`], with its defaults.
#[derive(Deserialize)]
struct EnqueueBatchFields {
    #[serde(default = "default_queue")]
    queue: String,
    tasks: Vec<TaskSpec>,
}

/// The fields of [`ReplyBody::Batch`] when every result is `enqueued`
/// with `"type"` first (any other result: the derived decoder).
#[derive(Deserialize)]
struct BatchFields {
    results: Vec<EnqueuedItem>,
}

/// One `enqueued` result inside a batch.
struct EnqueuedItem(ReplyBody);

impl<'de> Deserialize<'de> for EnqueuedItem {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (_, item) = d.deserialize_map(ByTag::<EnqueuedItem> {
            request_id: false,
            variants: PhantomData,
        })?;
        Ok(item)
    }
}

impl Variants for EnqueuedItem {
    fn fields<'de, A: MapAccess<'de>>(tag: &str, map: A) -> Result<Option<Self>, A::Error> {
        if tag != "enqueued" {
            return Ok(None);
        }
        let f = EnqueuedFields::deserialize(MapAccessDeserializer::new(map))?;
        Ok(Some(EnqueuedItem(f.into_reply())))
    }
}

/// The fields of [`ReplyBody::Enqueued`], with its defaults.
#[derive(Deserialize)]
struct EnqueuedFields {
    id: String,
    queue: String,
    eta: f64,
    #[serde(default)]
    result: Option<AttemptResult>,
    #[serde(default = "one")]
    replicas: u32,
}

impl Variants for BrokerMessage {
    fn fields<'de, A: MapAccess<'de>>(tag: &str, map: A) -> Result<Option<Self>, A::Error> {
        match tag {
            "task" => {
                let f = TaskFields::deserialize(MapAccessDeserializer::new(map))?;
                Ok(Some(BrokerMessage::Task {
                    delivery: f.delivery,
                    task: f.task,
                }))
            }
            "tasks" => {
                let f = TasksFields::deserialize(MapAccessDeserializer::new(map))?;
                Ok(Some(BrokerMessage::Tasks { tasks: f.tasks }))
            }
            _ => Ok(None),
        }
    }
}

impl Variants for WorkerMessage {
    fn fields<'de, A: MapAccess<'de>>(tag: &str, map: A) -> Result<Option<Self>, A::Error> {
        match tag {
            "result" => {
                let r = DeliveryResult::deserialize(MapAccessDeserializer::new(map))?;
                Ok(Some(WorkerMessage::Result(r)))
            }
            "results" => {
                let f = ResultsFields::deserialize(MapAccessDeserializer::new(map))?;
                Ok(Some(WorkerMessage::Results { results: f.results }))
            }
            _ => Ok(None),
        }
    }
}

impl FastDecode for BrokerMessage {
    fn fast(body: &[u8]) -> Option<Self> {
        by_tag(body, false).map(|(_, m)| m)
    }
}

impl FastDecode for WorkerMessage {
    fn fast(body: &[u8]) -> Option<Self> {
        by_tag(body, false).map(|(_, m)| m)
    }
}

impl EnqueuedFields {
    fn into_reply(self) -> ReplyBody {
        ReplyBody::Enqueued {
            id: self.id,
            queue: self.queue,
            eta: self.eta,
            result: self.result,
            replicas: self.replicas,
        }
    }
}

impl Variants for ClientCommand {
    fn fields<'de, A: MapAccess<'de>>(tag: &str, map: A) -> Result<Option<Self>, A::Error> {
        Ok(Some(match tag {
            "enqueue" => {
                let f = EnqueueFields::deserialize(MapAccessDeserializer::new(map))?;
                ClientCommand::Enqueue {
                    queue: f.queue,
                    task: f.task,
                    wait: f.wait,
                }
            }
            "enqueue_batch" => {
                let f = EnqueueBatchFields::deserialize(MapAccessDeserializer::new(map))?;
                ClientCommand::EnqueueBatch {
                    queue: f.queue,
                    tasks: f.tasks,
                }
            }
            _ => return Ok(None),
        }))
    }
}

impl Variants for ReplyBody {
    fn fields<'de, A: MapAccess<'de>>(tag: &str, map: A) -> Result<Option<Self>, A::Error> {
        Ok(Some(match tag {
            "enqueued" => {
                EnqueuedFields::deserialize(MapAccessDeserializer::new(map))?.into_reply()
            }
            "batch" => {
                let f = BatchFields::deserialize(MapAccessDeserializer::new(map))?;
                ReplyBody::Batch {
                    results: f.results.into_iter().map(|r| r.0).collect(),
                }
            }
            _ => return Ok(None),
        }))
    }
}

impl FastDecode for ClientRequest {
    fn fast(body: &[u8]) -> Option<Self> {
        let (request_id, command) = by_tag::<ClientCommand>(body, true)?;
        Some(ClientRequest {
            request_id,
            command,
        })
    }
}

impl FastDecode for ClientReply {
    fn fast(body: &[u8]) -> Option<Self> {
        let (request_id, body) = by_tag::<ReplyBody>(body, true)?;
        Some(ClientReply { request_id, body })
    }
}

// Encoding: `#[serde(flatten)]` makes serde write a map of unknown length,
// which MessagePack encoders buffer before they can write its header. The
// hot requests and replies are written as maps of known length instead,
// with the same keys in the same order as the derived encoder.

/// The derived encoding, for every other command and reply.
#[derive(Serialize)]
struct FlatRequest<'a> {
    request_id: &'a String,
    #[serde(flatten)]
    command: &'a ClientCommand,
}

#[derive(Serialize)]
struct FlatReply<'a> {
    request_id: &'a String,
    #[serde(flatten)]
    body: &'a ReplyBody,
}

impl Serialize for ClientRequest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.command {
            ClientCommand::Enqueue { queue, task, wait } => {
                let mut m = s.serialize_map(Some(5))?;
                m.serialize_entry("request_id", &self.request_id)?;
                m.serialize_entry("type", "enqueue")?;
                m.serialize_entry("queue", queue)?;
                m.serialize_entry("task", task)?;
                m.serialize_entry("wait", wait)?;
                m.end()
            }
            ClientCommand::EnqueueBatch { queue, tasks } => {
                let mut m = s.serialize_map(Some(4))?;
                m.serialize_entry("request_id", &self.request_id)?;
                m.serialize_entry("type", "enqueue_batch")?;
                m.serialize_entry("queue", queue)?;
                m.serialize_entry("tasks", tasks)?;
                m.end()
            }
            command => FlatRequest {
                request_id: &self.request_id,
                command,
            }
            .serialize(s),
        }
    }
}

impl Serialize for ClientReply {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.body {
            ReplyBody::Enqueued {
                id,
                queue,
                eta,
                result,
                replicas,
            } => {
                let mut m = s.serialize_map(Some(7))?;
                m.serialize_entry("request_id", &self.request_id)?;
                m.serialize_entry("type", "enqueued")?;
                m.serialize_entry("id", id)?;
                m.serialize_entry("queue", queue)?;
                m.serialize_entry("eta", eta)?;
                m.serialize_entry("result", result)?;
                m.serialize_entry("replicas", replicas)?;
                m.end()
            }
            ReplyBody::Batch { results } => {
                let mut m = s.serialize_map(Some(3))?;
                m.serialize_entry("request_id", &self.request_id)?;
                m.serialize_entry("type", "batch")?;
                m.serialize_entry("results", results)?;
                m.end()
            }
            body => FlatReply {
                request_id: &self.request_id,
                body,
            }
            .serialize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode, frames::decode_hot, Outcome};

    fn both<T: FastDecode + serde::Serialize + PartialEq + std::fmt::Debug>(m: T, hot: bool) {
        let frames = encode(&m);
        assert_eq!(T::fast(&frames[2]).is_some(), hot, "{m:?}");
        let fast: T = decode_hot(&frames).unwrap();
        let slow: T = crate::decode(&frames).unwrap();
        assert_eq!(fast, m);
        assert_eq!(slow, m);
    }

    fn task() -> DeliveredTask {
        DeliveredTask {
            id: "t".into(),
            queue: "q".into(),
            name: Some("n".into()),
            url: "http://a/".into(),
            method: "POST".into(),
            params: vec![("a".into(), "1".into())],
            body: None,
            content_type: None,
            headers: vec![("x".into(), "y".into())],
            eta: 1.5,
            timeout: 30.0,
            retry_count: 2,
            execution_count: 1,
            signing_secrets: vec![],
        }
    }

    #[test]
    fn hot_variants_decode_the_same_both_ways() {
        both(
            BrokerMessage::Task {
                delivery: 7,
                task: task(),
            },
            true,
        );
        both(
            BrokerMessage::Tasks {
                tasks: vec![
                    Dispatched {
                        delivery: 7,
                        task: task(),
                    },
                    Dispatched {
                        delivery: u64::MAX,
                        task: DeliveredTask {
                            id: "u".into(),
                            signing_secrets: vec!["whsec_AA==".into()],
                            ..task()
                        },
                    },
                ],
            },
            true,
        );
        both(BrokerMessage::Heartbeat, false);
        let result = DeliveryResult {
            delivery: 3,
            task_id: "t".into(),
            outcome: Outcome::Failure,
            status: Some(503),
            reason: Some("busy".into()),
            retry_after: Some(2.0),
            responded: true,
            body: Some(serde_bytes::ByteBuf::from(vec![1, 2])),
            no_retry: false,
        };
        both(WorkerMessage::Result(result.clone()), true);
        both(
            WorkerMessage::Results {
                results: vec![
                    result.clone(),
                    DeliveryResult {
                        delivery: 4,
                        outcome: Outcome::Success,
                        status: None,
                        body: None,
                        ..result
                    },
                ],
            },
            true,
        );
        both(WorkerMessage::Heartbeat, false);
        both(
            ClientRequest {
                request_id: "r1".into(),
                command: ClientCommand::Enqueue {
                    queue: "q".into(),
                    task: TaskSpec {
                        url: "http://a/".into(),
                        countdown: Some(1.0),
                        ..Default::default()
                    },
                    wait: None,
                },
            },
            true,
        );
        both(
            ClientRequest {
                request_id: "r2".into(),
                command: ClientCommand::Ping,
            },
            false,
        );
        both(
            ClientReply {
                request_id: "r1".into(),
                body: ReplyBody::Enqueued {
                    id: "i".into(),
                    queue: "q".into(),
                    eta: 2.0,
                    result: None,
                    replicas: 2,
                },
            },
            true,
        );
    }

    fn enqueued(id: &str) -> ReplyBody {
        ReplyBody::Enqueued {
            id: id.into(),
            queue: "q".into(),
            eta: 2.5,
            result: None,
            replicas: 1,
        }
    }

    #[test]
    fn batches_decode_the_same_both_ways() {
        let spec = TaskSpec {
            url: "http://a/".into(),
            params: vec![("a".into(), "1".into())],
            ..Default::default()
        };
        both(
            ClientRequest {
                request_id: "b1".into(),
                command: ClientCommand::EnqueueBatch {
                    queue: "q".into(),
                    tasks: vec![spec.clone(), spec],
                },
            },
            true,
        );
        both(
            ClientReply {
                request_id: "b1".into(),
                body: ReplyBody::Batch {
                    results: vec![enqueued("a"), enqueued("b")],
                },
            },
            true,
        );
        both(
            ClientReply {
                request_id: "b0".into(),
                body: ReplyBody::Batch { results: vec![] },
            },
            true,
        );
        // Any other result in the batch: the derived decoder, same answer.
        both(
            ClientReply {
                request_id: "b2".into(),
                body: ReplyBody::Batch {
                    results: vec![
                        enqueued("a"),
                        ReplyBody::Duplicate {
                            id: "b".into(),
                            tombstoned: false,
                        },
                        ReplyBody::Error {
                            code: crate::ErrorCode::BadRequest,
                            reason: "task.url is required".into(),
                        },
                    ],
                },
            },
            false,
        );
    }

    /// The hand-written encodings write the same bytes as the derived ones.
    #[test]
    fn hot_encodings_match_the_derived_ones() {
        let req = ClientRequest {
            request_id: "r".into(),
            command: ClientCommand::Enqueue {
                queue: "q".into(),
                task: TaskSpec {
                    url: "http://a/".into(),
                    params: vec![("a".into(), "b".into())],
                    ..Default::default()
                },
                wait: Some(1.5),
            },
        };
        let derived = rmp_serde::to_vec_named(&FlatRequest {
            request_id: &req.request_id,
            command: &req.command,
        })
        .unwrap();
        let mine = rmp_serde::to_vec_named(&req).unwrap();
        assert_eq!(mine, derived);
        let reply = ClientReply {
            request_id: "r".into(),
            body: ReplyBody::Enqueued {
                id: "i".into(),
                queue: "q".into(),
                eta: 3.0,
                result: None,
                replicas: 1,
            },
        };
        let derived = rmp_serde::to_vec_named(&FlatReply {
            request_id: &reply.request_id,
            body: &reply.body,
        })
        .unwrap();
        let mine = rmp_serde::to_vec_named(&reply).unwrap();
        assert_eq!(mine, derived);
        let req = ClientRequest {
            request_id: "r".into(),
            command: ClientCommand::EnqueueBatch {
                queue: "q".into(),
                tasks: vec![TaskSpec {
                    url: "http://a/".into(),
                    ..Default::default()
                }],
            },
        };
        let derived = rmp_serde::to_vec_named(&FlatRequest {
            request_id: &req.request_id,
            command: &req.command,
        })
        .unwrap();
        assert_eq!(rmp_serde::to_vec_named(&req).unwrap(), derived);
        let reply = ClientReply {
            request_id: "r".into(),
            body: ReplyBody::Batch {
                results: vec![enqueued("a"), ReplyBody::Cancelled { id: "c".into() }],
            },
        };
        let derived = rmp_serde::to_vec_named(&FlatReply {
            request_id: &reply.request_id,
            body: &reply.body,
        })
        .unwrap();
        assert_eq!(rmp_serde::to_vec_named(&reply).unwrap(), derived);
    }

    /// Another language's client may put `type` last and leave out
    /// defaulted keys: the derived decoder takes over and applies them.
    #[test]
    fn other_key_orders_fall_back() {
        #[derive(serde::Serialize)]
        struct TypeLast<'a> {
            request_id: &'a str,
            task: TaskSpec,
            r#type: &'a str,
        }
        let body = rmp_serde::to_vec_named(&TypeLast {
            request_id: "r",
            task: TaskSpec {
                url: "http://a/".into(),
                ..Default::default()
            },
            r#type: "enqueue",
        })
        .unwrap();
        assert!(ClientRequest::fast(&body).is_none());
        let frames = vec![Vec::new(), crate::frames::header().to_vec(), body];
        let r: ClientRequest = decode_hot(&frames).unwrap();
        assert!(
            matches!(r.command, ClientCommand::Enqueue { ref queue, wait: None, .. } if queue == "default")
        );
        // A wrong type in a field is the same error both ways.
        #[derive(serde::Serialize)]
        struct Bad<'a> {
            r#type: &'a str,
            delivery: &'a str,
        }
        let body = rmp_serde::to_vec_named(&Bad {
            r#type: "task",
            delivery: "x",
        })
        .unwrap();
        let frames = vec![Vec::new(), crate::frames::header().to_vec(), body];
        let fast = decode_hot::<BrokerMessage, _>(&frames).unwrap_err();
        let slow = crate::decode::<BrokerMessage, _>(&frames).unwrap_err();
        assert_eq!(fast.to_string(), slow.to_string());
    }
}
