//! End-to-end tests of `serve_stream` over an in-memory pipe.

use super::*;
use crate::protocol::ErrorClass;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream, ReadHalf};
use tokio::sync::Notify;

/// Commands: `echo` returns its arguments, `fail` fails, `emit` emits an
/// event then returns, `wait` returns once `release` is notified.
struct Toy {
    bus: EventBus,
    release: Arc<Notify>,
}

impl Dispatcher for Toy {
    fn dispatch(
        &self,
        name: &str,
        args: Map<String, Value>,
    ) -> BoxFuture<'static, Result<Value, QmpError>> {
        let bus = self.bus.clone();
        let release = Arc::clone(&self.release);
        let name = name.to_owned();
        Box::pin(async move {
            match name.as_str() {
                "echo" => Ok(Value::Object(args)),
                "fail" => Err(QmpError::new(ErrorClass::DeviceNotFound, "no such node")),
                "emit" => {
                    bus.emit("JOB_STATUS_CHANGE", json!({"id": "j", "status": "running"}));
                    Ok(json!({}))
                }
                "wait" => {
                    release.notified().await;
                    Ok(json!({}))
                }
                "panic" => panic!("toy command panicked"),
                _ => Err(QmpError::command_not_found(&name)),
            }
        })
    }

    fn command_info(&self, name: &str) -> Option<CommandInfo> {
        let known = ["echo", "fail", "emit", "wait", "panic"].contains(&name);
        known.then_some(CommandInfo {
            allow_oob: name == "echo",
        })
    }
}

struct Client {
    lines: BufReader<ReadHalf<DuplexStream>>,
    tx: WriteHalf<DuplexStream>,
}

impl Client {
    async fn line(&mut self) -> String {
        let mut s = String::new();
        let n = self.lines.read_line(&mut s).await.unwrap();
        assert!(n > 0, "unexpected EOF");
        assert!(s.ends_with("\r\n"), "{s:?}");
        s.truncate(s.len() - 2);
        s
    }

    async fn json(&mut self) -> Value {
        serde_json::from_str(&self.line().await).unwrap()
    }

    async fn send(&mut self, text: &str) {
        self.tx.write_all(text.as_bytes()).await.unwrap();
    }

    async fn negotiate(&mut self) {
        self.send(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#)
            .await;
        assert_eq!(self.line().await, r#"{"return": {}}"#);
    }
}

struct Fixture {
    client: Client,
    bus: EventBus,
    release: Arc<Notify>,
    server: JoinHandle<Result<(), Error>>,
}

fn greeting() -> Greeting {
    Greeting {
        major: 10,
        minor: 0,
        micro: 2,
        package: "qsd-test".into(),
    }
}

fn start(pretty: bool) -> Fixture {
    let bus = EventBus::with_capacity(16);
    let release = Arc::new(Notify::new());
    let toy = Arc::new(Toy {
        bus: bus.clone(),
        release: Arc::clone(&release),
    });
    let (ours, theirs) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(serve_stream(ours, toy, bus.clone(), greeting(), pretty));
    let (rx, tx) = tokio::io::split(theirs);
    Fixture {
        client: Client {
            lines: BufReader::new(rx),
            tx,
        },
        bus,
        release,
        server,
    }
}

#[tokio::test]
async fn test_serve_stream_greeting_and_negotiation() {
    let mut f = start(false);
    assert_eq!(
        f.client.line().await,
        r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "qsd-test"}, "capabilities": ["oob"]}}"#
    );
    f.client.send(r#"{"execute": "echo", "id": 1}"#).await;
    assert_eq!(
        f.client.line().await,
        r#"{"id": 1, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#
    );
    f.client.negotiate().await;
    f.client.send(r#"{"execute": "qmp_capabilities"}"#).await;
    let reply = f.client.json().await;
    assert_eq!(reply["error"]["class"], "CommandNotFound");
}

#[tokio::test]
async fn test_serve_stream_command_error_and_id_echo() {
    let mut f = start(false);
    f.client.line().await;
    f.client.negotiate().await;
    f.client
        .send(r#"{"execute": "echo", "arguments": {"a": [1, "x"]}, "id": {"k": [null]}}"#)
        .await;
    assert_eq!(
        f.client.line().await,
        r#"{"return": {"a": [1, "x"]}, "id": {"k": [null]}}"#
    );
    f.client.send(r#"{"execute": "fail", "id": "f"}"#).await;
    assert_eq!(
        f.client.line().await,
        r#"{"id": "f", "error": {"class": "DeviceNotFound", "desc": "no such node"}}"#
    );
    f.client.send(r#"{"exec-oob": "fail", "id": 2}"#).await;
    let reply = f.client.json().await;
    assert_eq!(
        reply["error"]["desc"],
        "The command fail does not support OOB"
    );
    f.client.send(r#"{"exec-oob": "echo", "id": 3}"#).await;
    assert_eq!(f.client.line().await, r#"{"return": {}, "id": 3}"#);
}

#[tokio::test]
async fn test_serve_stream_garbage_then_recovers_in_order() {
    let mut f = start(false);
    f.client.line().await;
    f.client.negotiate().await;
    // Chunked across sends, errors and replies stay in input order.
    f.client.send("}{\"execute\": \"ec").await;
    f.client.send("ho\", \"id\": 7} [1]\n\u{ff}").await;
    f.client.send("{\"execute\": \"echo\"}").await;
    let want = [
        r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
        r#"{"return": {}, "id": 7}"#,
        r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
    ];
    for w in want {
        assert_eq!(f.client.line().await, w);
    }
    // U+00FF is sent as C3 BF: C3 is a stray byte outside a string.
    let stray = f.client.json().await;
    assert!(stray["error"]["desc"].as_str().unwrap().contains("stray"));
    assert_eq!(f.client.line().await, r#"{"return": {}}"#);
}

#[tokio::test]
async fn test_serve_stream_events_flow_while_command_runs() {
    let mut f = start(false);
    f.client.line().await;
    // Not negotiated: no events.
    f.bus.emit("BLOCK_EXPORT_DELETED", json!({"id": "early"}));
    f.client.negotiate().await;
    f.client.send(r#"{"execute": "wait", "id": "w"}"#).await;
    tokio::task::yield_now().await;
    f.bus.emit("BLOCK_EXPORT_DELETED", json!({"id": "e0"}));
    let ev = f.client.json().await;
    assert_eq!(ev["event"], "BLOCK_EXPORT_DELETED");
    assert_eq!(ev["data"], json!({"id": "e0"}));
    assert!(ev["timestamp"]["seconds"].as_u64().unwrap() > 0);
    f.release.notify_one();
    assert_eq!(f.client.line().await, r#"{"return": {}, "id": "w"}"#);
}

#[tokio::test]
async fn test_serve_stream_event_from_command_precedes_reply() {
    let mut f = start(false);
    f.client.line().await;
    f.client.negotiate().await;
    f.client.send(r#"{"execute": "emit", "id": 1}"#).await;
    let ev = f.client.json().await;
    assert_eq!(ev["event"], "JOB_STATUS_CHANGE");
    assert_eq!(f.client.line().await, r#"{"return": {}, "id": 1}"#);
}

#[tokio::test]
async fn test_serve_stream_panicking_command_gets_error_reply() {
    let mut f = start(false);
    f.client.line().await;
    f.client.negotiate().await;
    f.client.send(r#"{"execute": "panic", "id": 1}"#).await;
    let reply = f.client.json().await;
    assert_eq!(reply["error"]["desc"], "Command panic failed unexpectedly");
    f.client.send(r#"{"execute": "echo", "id": 2}"#).await;
    assert_eq!(f.client.line().await, r#"{"return": {}, "id": 2}"#);
}

#[tokio::test]
async fn test_serve_stream_half_close_still_answers_then_ends() {
    let mut f = start(false);
    f.client.line().await;
    f.client
        .send("{\"execute\": \"qmp_capabilities\"}{\"execute\": \"echo\", \"id\": 1}")
        .await;
    f.client.tx.shutdown().await.unwrap();
    assert_eq!(f.client.line().await, r#"{"return": {}}"#);
    assert_eq!(f.client.line().await, r#"{"return": {}, "id": 1}"#);
    f.server.await.unwrap().unwrap();
}

#[tokio::test]
async fn test_serve_stream_disconnect_mid_command_does_not_crash() {
    let mut f = start(false);
    f.client.line().await;
    f.client.negotiate().await;
    f.client.send(r#"{"execute": "wait"}"#).await;
    tokio::task::yield_now().await;
    drop(f.client);
    f.release.notify_one();
    // Either a clean end or a write error; never a panic.
    let joined = f.server.await;
    assert!(joined.is_ok());
}

#[tokio::test]
async fn test_serve_stream_pretty_replies() {
    let mut f = start(true);
    let mut greeting = Vec::new();
    loop {
        let line = f.client.line().await;
        let end = line == "}";
        greeting.push(line);
        if end {
            break;
        }
    }
    assert_eq!(greeting[0], "{");
    assert_eq!(greeting[1], "    \"QMP\": {");
    f.client.send(r#"{"execute": "qmp_capabilities"}"#).await;
    for want in ["{", "    \"return\": {", "    }", "}"] {
        assert_eq!(f.client.line().await, want);
    }
}

#[tokio::test]
async fn test_serve_stream_lagging_client_is_disconnected() {
    let mut f = start(false);
    f.client.line().await;
    f.client.negotiate().await;
    f.client.send(r#"{"execute": "wait"}"#).await;
    tokio::task::yield_now().await;
    // Fill the pipe and the event backlog without reading.
    let big = "x".repeat(8192);
    for _ in 0..64 {
        f.bus.emit("BLOCK_EXPORT_DELETED", json!({"id": big}));
    }
    let result = tokio::time::timeout(Duration::from_secs(5), async {
        // Read until the server ends the connection.
        let mut sink = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut f.client.lines, &mut sink).await;
        f.server.await.unwrap()
    })
    .await
    .unwrap();
    assert!(
        matches!(result, Err(Error::EventBacklog { .. })),
        "{result:?}"
    );
    f.release.notify_one();
}

#[tokio::test]
async fn test_serve_stream_refused_oob_answers_ahead_of_running_command() {
    let mut f = start(false);
    f.client.line().await;
    f.client.negotiate().await;
    f.client.send(r#"{"execute": "wait", "id": 1}"#).await;
    f.client.send(r#"{"exec-oob": "fail", "id": 2}"#).await;
    let reply = f.client.json().await;
    assert_eq!(reply["id"], 2);
    assert_eq!(
        reply["error"]["desc"],
        "The command fail does not support OOB"
    );
    f.release.notify_one();
    assert_eq!(f.client.line().await, r#"{"return": {}, "id": 1}"#);
}
