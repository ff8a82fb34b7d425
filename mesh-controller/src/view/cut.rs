//! The API server's answers cut down for the view: a list's items, a watch's events (a JSON
//! event per line), each object through [`mesh_cluster::view_object`].

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt as _, Full, Limited, StreamBody};
use hyper::body::{Body, Frame};
use serde_json::Value;

/// The largest list answer cut down in one piece (the API server pages lists the waypoints ask).
const MAX_LIST_BYTES: usize = 256 << 20;
/// The longest line of a watch (one event).
const MAX_EVENT_BYTES: usize = 16 << 20;

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of the view's answers.
pub(super) type ViewBody = UnsyncBoxBody<Bytes, BoxError>;

/// A list answer with each item cut down.
pub(super) async fn list<B>(body: B, plural: &str) -> Result<ViewBody, String>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let bytes = Limited::new(body, MAX_LIST_BYTES)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let mut list: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if let Some(items) = list.get_mut("items").and_then(Value::as_array_mut) {
        for item in items {
            *item = mesh_cluster::view_object(plural, item.take()).map_err(|e| e.to_string())?;
        }
    }
    let out = serde_json::to_vec(&list).map_err(|e| e.to_string())?;
    Ok(full(Bytes::from(out)))
}

/// A watch answer (a JSON event per line) with each event's object cut down; bookmarks and
/// errors as they are. An event that does not read ends the answer (the reader's watch starts
/// again), never passes whole.
pub(super) fn watch_events<B>(body: B, plural: &'static str) -> ViewBody
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let events = stream::unfold(
        (body, Vec::<u8>::new(), false),
        move |(mut body, mut pending, mut ended)| async move {
            loop {
                if let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let cut = cut_event(plural, &line[..end]);
                    return Some((cut.map(Frame::data), (body, pending, ended)));
                }
                if ended {
                    if pending.is_empty() {
                        return None;
                    }
                    let line = std::mem::take(&mut pending);
                    return Some((
                        cut_event(plural, &line).map(Frame::data),
                        (body, pending, true),
                    ));
                }
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            pending.extend_from_slice(&data);
                        }
                        if pending.len() > MAX_EVENT_BYTES {
                            return Some((
                                Err(BoxError::from(format!(
                                    "a watch event of over {MAX_EVENT_BYTES} bytes"
                                ))),
                                (body, Vec::new(), true),
                            ));
                        }
                    }
                    Some(Err(e)) => return Some((Err(e.into()), (body, Vec::new(), true))),
                    None => ended = true,
                }
            }
        },
    );
    // An error ends the answer: the stream stops after it.
    let mut failed = false;
    let events = futures_util::StreamExt::take_while(events, move |item| {
        let go = !failed;
        failed |= item.is_err();
        std::future::ready(go)
    });
    StreamBody::new(events).boxed_unsync()
}

/// One watch event's line, cut down, with its newline.
fn cut_event(plural: &str, line: &[u8]) -> Result<Bytes, BoxError> {
    let mut event: Value = serde_json::from_slice(line)
        .map_err(|e| format!("a watch event of {plural} does not read: {e}"))?;
    if !matches!(event["type"].as_str(), Some("BOOKMARK" | "ERROR")) {
        let object = event["object"].take();
        event["object"] = mesh_cluster::view_object(plural, object)
            .map_err(|e| format!("an object of {plural} does not read: {e}"))?;
    }
    let mut out = serde_json::to_vec(&event)?;
    out.push(b'\n');
    Ok(Bytes::from(out))
}

pub(super) fn full(bytes: Bytes) -> ViewBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A body arriving in `chunks`.
    fn chunked(
        chunks: &[&[u8]],
    ) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>>> {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        StreamBody::new(stream::iter(frames))
    }

    fn pod(name: &str, version: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "shop", "resourceVersion": version},
               "spec": {"serviceAccountName": "web", "containers": [{"name": "app",
                        "env": [{"name": "DB_PASSWORD", "value": "hunter2"}]}]}})
    }

    #[tokio::test]
    async fn watch_events_split_across_chunks_are_each_cut() {
        let events = [
            json!({"type": "ADDED", "object": pod("a", "1")}).to_string(),
            json!({"type": "MODIFIED", "object": pod("b", "2")}).to_string(),
        ];
        let text = format!("{}\n{}\n", events[0], events[1]);
        let bytes = text.as_bytes();
        // Split inside the first event and right after its newline.
        let (one, rest) = bytes.split_at(20);
        let (two, three) = rest.split_at(events[0].len() + 1 - 20);
        let body = watch_events(chunked(&[one, two, three]), "pods");
        let out = body.collect().await.unwrap().to_bytes();
        let lines: Vec<Value> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0]["object"]["metadata"]["name"], "a");
        assert_eq!(lines[1]["object"]["metadata"]["resourceVersion"], "2");
        assert!(!String::from_utf8_lossy(&out).contains("hunter2"));
    }

    #[tokio::test]
    async fn a_watch_event_that_does_not_read_ends_the_answer() {
        let good = json!({"type": "ADDED", "object": pod("a", "1")}).to_string();
        let text = format!("{good}\n{{not json\n{good}\n");
        let mut body = watch_events(chunked(&[text.as_bytes()]), "pods");
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        assert!(body.frame().await.unwrap().is_err());
        assert!(body.frame().await.is_none(), "nothing after the error");
    }

    #[tokio::test]
    async fn a_list_has_each_item_cut() {
        let pods = json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "9"},
                          "items": [pod("a", "1"), pod("b", "2")]});
        let body = Full::new(Bytes::from(pods.to_string()));
        let out = list(body, "pods")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let cut: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(cut["metadata"]["resourceVersion"], "9");
        assert_eq!(cut["items"][1]["metadata"]["name"], "b");
        assert_eq!(cut["items"][1]["spec"]["serviceAccountName"], "web");
        assert!(!String::from_utf8_lossy(&out).contains("hunter2"));
        let broken = Full::new(Bytes::from_static(b"{\"items\": [1]}"));
        assert!(list(broken, "pods").await.is_err());
    }

    #[test]
    fn a_pod_event_is_cut_and_keeps_its_version() {
        let line = json!({"type": "MODIFIED", "object": {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "shop", "resourceVersion": "42",
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": {"serviceAccountName": "web", "nodeName": "n0",
                     "containers": [{"name": "app", "image": "web:1",
                                     "env": [{"name": "DB_PASSWORD", "value": "hunter2"}]}]},
            "status": {"podIP": "10.0.0.1"},
        }})
        .to_string();
        let cut: Value =
            serde_json::from_slice(&cut_event("pods", line.as_bytes()).unwrap()).unwrap();
        assert_eq!(cut["type"], "MODIFIED");
        let pod = &cut["object"];
        assert_eq!(pod["metadata"]["resourceVersion"], "42");
        assert_eq!(pod["spec"]["serviceAccountName"], "web");
        assert_eq!(pod["status"]["podIP"], "10.0.0.1");
        let text = pod.to_string();
        for gone in ["hunter2", "DB_PASSWORD", "web:1", "last-applied"] {
            assert!(!text.contains(gone), "{gone} in {text}");
        }
        let bookmark = json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
            "metadata": {"resourceVersion": "43"}}})
        .to_string();
        let kept: Value =
            serde_json::from_slice(&cut_event("pods", bookmark.as_bytes()).unwrap()).unwrap();
        assert_eq!(kept["object"]["metadata"]["resourceVersion"], "43");
        assert!(cut_event("pods", b"{not json").is_err());
    }

    #[test]
    fn a_node_keeps_its_form_name_and_locality_only() {
        let node = json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {"name": "n0", "resourceVersion": "7",
                         "labels": {"topology.kubernetes.io/zone": "z1", "secret-team": "x"},
                         "annotations": {"node.alpha.kubernetes.io/ttl": "0"}}});
        let cut = mesh_cluster::view_object("nodes", node).unwrap();
        assert_eq!(
            cut,
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                   "metadata": {"name": "n0", "resourceVersion": "7",
                                "labels": {"topology.kubernetes.io/zone": "z1"}}})
        );
    }
}
