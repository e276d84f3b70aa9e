//! `veil serve` as a real process on loopback, in front of the model in its own process and in
//! front of a swarm of `veil node` processes: OpenAI-shaped answers, streamed and not, every
//! error case in OpenAI's shape, limits, a client that leaves mid-stream, the dashboard.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::{model_path, shards, NodeProcess};

const MODEL: &str = "SmolLM2-135M-Instruct";

/// The passphrase of the keys the tests make.
const PASSPHRASE: &str = "gateway test";

/// A running gateway, killed when dropped.
struct Gateway {
    child: Child,
    base: String,
}

impl Gateway {
    /// A gateway running the model (F32) in its own process.
    fn start(extra: &[&str]) -> Self {
        let mut args = vec!["--local", "--dtype", "f32"];
        args.extend_from_slice(extra);
        Self::start_with(&args)
    }

    fn start_with(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_veil"))
            .args(["serve", "--threads", "2", "--listen", "127.0.0.1:0"])
            .env("VEIL_KEY_PASSPHRASE", PASSPHRASE)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("veil serve starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("a first line");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        Self {
            child,
            base: format!("http://{addr}"),
        }
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = client()
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .expect("request sent");
        let status = response.status().as_u16();
        (status, response.json().expect("a JSON body"))
    }

    fn get_json(&self, path: &str) -> Value {
        client()
            .get(format!("{}{path}", self.base))
            .send()
            .expect("request sent")
            .json()
            .expect("a JSON body")
    }

    /// Metric `name` once it reads `want` (polled for up to 30 s), or its last reading.
    fn metric_reaching(&self, name: &str, want: f64) -> f64 {
        let mut value = self.metric(name);
        for _ in 0..600 {
            if value == want {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            value = self.metric(name);
        }
        value
    }

    /// Waits (up to three minutes) until metric `name` reaches at least `value`.
    fn wait_for_metric(&self, name: &str, value: f64) {
        let deadline = Instant::now() + Duration::from_secs(180);
        while self.metric(name) < value {
            assert!(Instant::now() < deadline, "{name} never reached {value}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn metric(&self, name: &str) -> f64 {
        let text = client()
            .get(format!("{}/metrics", self.base))
            .send()
            .and_then(|r| r.text())
            .expect("metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .expect("client")
}

fn ask(question: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 24,
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        body[k] = v.clone();
    }
    body
}

/// The data payloads of a server-sent event stream.
fn sse_data(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

fn assert_openai_error(status: u16, body: &Value, want_status: u16, want_code: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].as_str().is_some(), "{body}");
    if let Some(code) = want_code {
        assert_eq!(error["code"], code, "{body}");
    }
}

#[test]
fn a_forced_method_answers_like_plain_and_auto_names_its_choice() {
    let gateway = Gateway::start_with(&["--local", "--dtype", "stored"]);
    let question = "Repeat exactly: one two three, one two three, one two three.";
    let answer = |accel: &str| {
        let (status, body) = gateway.post(
            "/v1/chat/completions",
            &ask(
                question,
                json!({"temperature": 0, "veil": {"accel": accel}}),
            ),
        );
        assert_eq!(status, 200, "{body}");
        (
            body["choices"][0]["message"]["content"]
                .as_str()
                .expect("content")
                .to_string(),
            body["veil"]["accel"]
                .as_str()
                .expect("veil.accel")
                .to_string(),
        )
    };
    let (plain, how) = answer("plain");
    assert_eq!(how, "plain (forced)");
    for method in ["lookup", "prefix+lookup", "prefix", "chunked"] {
        let (text, how) = answer(method);
        assert_eq!(text, plain, "{method}");
        assert_eq!(how, format!("{method} (forced)"));
    }
    let (text, how) = answer("auto");
    assert_eq!(text, plain);
    assert!(how.contains("(auto"), "{how}");
    for bad in ["batch", "q8_0", "warp-drive"] {
        let (s, b) = gateway.post(
            "/v1/chat/completions",
            &ask("hi", json!({"veil": {"accel": bad}})),
        );
        assert_openai_error(s, &b, 400, None);
        assert_eq!(b["error"]["param"], "veil.accel", "{bad}");
    }
}

#[test]
fn answers_chat_streamed_and_not_with_the_same_text() {
    let gateway = Gateway::start(&[]);
    let (status, body) = gateway.post(
        "/v1/chat/completions",
        &ask("What is the capital of France?", json!({})),
    );
    assert_eq!(status, 200, "{body}");
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string();
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], MODEL);
    assert_eq!(
        body["usage"]["completion_tokens"].as_u64().map(|n| n > 0),
        Some(true)
    );
    assert_eq!(body["veil"]["mode"], "local");

    let response = client()
        .post(format!("{}/v1/chat/completions", gateway.base))
        .json(&ask(
            "What is the capital of France?",
            json!({"stream": true}),
        ))
        .send()
        .expect("stream");
    assert_eq!(response.status().as_u16(), 200);
    let events = sse_data(&response.text().expect("body"));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("a JSON chunk"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let last = chunks.last().expect("a last chunk");
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));

    let (status, body) = gateway.post(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "The capital of France is", "temperature": 0, "max_tokens": 5}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert!(
        body["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("Paris")),
        "{body}"
    );

    let models: Value = gateway.get_json("/v1/models");
    assert_eq!(models["data"][0]["id"], MODEL);
    let health: Value = gateway.get_json("/health");
    assert_eq!(health["status"], "ok");
    assert_eq!(gateway.metric("veil_active_generations"), 0.0);

    // The dashboard page ships in the binary and its data lists what just happened.
    let page = client().get(&gateway.base).send().unwrap().text().unwrap();
    assert!(page.contains("<title>Veil gateway</title>") && page.contains("/api/dashboard"));
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page fetches nothing outside"
    );
    let board: Value = gateway.get_json("/api/dashboard");
    assert_eq!(board["model"], MODEL);
    assert_eq!(board["nodes"].as_array().map(Vec::len), Some(1));
    let requests = board["requests"].as_array().expect("requests");
    assert_eq!(requests.len(), 3, "{board}");
    assert!(
        requests
            .iter()
            .all(|r| r["tokens_per_second"].as_f64().is_some_and(|v| v > 0.0)),
        "{board}"
    );
    assert_eq!(requests[2]["endpoint"], "completions");
}

#[test]
fn every_bad_request_answers_in_the_openai_error_shape() {
    let gateway = Gateway::start(&["--max-body-bytes", "200000", "--max-tokens", "64"]);
    let url = format!("{}/v1/chat/completions", gateway.base);
    let raw = |body: &str| {
        let r = client()
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .expect("sent");
        (
            r.status().as_u16(),
            r.json::<Value>().expect("JSON error body"),
        )
    };
    let (s, b) = raw("{not json");
    assert_openai_error(s, &b, 400, None);
    let (s, b) = raw(r#"{"model": "SmolLM2-135M-Instruct"}"#);
    assert_openai_error(s, &b, 400, None);
    let (s, b) = gateway.post(
        "/v1/chat/completions",
        &ask("hi", json!({"model": "gpt-4o"})),
    );
    assert_openai_error(s, &b, 404, Some("model_not_found"));
    let long = "word ".repeat(9000);
    let (s, b) = gateway.post("/v1/chat/completions", &ask(&long, json!({})));
    assert_openai_error(s, &b, 400, Some("context_length_exceeded"));
    let (s, b) = gateway.post(
        "/v1/chat/completions",
        &ask("hi", json!({"max_tokens": 65})),
    );
    assert_openai_error(s, &b, 400, None);
    let (s, b) = gateway.post(
        "/v1/chat/completions",
        &ask("hi", json!({"temperature": -1})),
    );
    assert_openai_error(s, &b, 400, None);
    let (s, b) = gateway.post(
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}),
    );
    assert_openai_error(s, &b, 400, None);
    let (s, b) = gateway.post(
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": []}),
    );
    assert_openai_error(s, &b, 400, None);
    let (s, b) = gateway.post(
        "/v1/chat/completions",
        &ask("hi", json!({"veil": {"verify": 3}})),
    );
    assert_openai_error(s, &b, 400, None);
    assert_eq!(b["error"]["param"], "veil.verify");
    let (s, b) = gateway.post(
        "/v1/chat/completions",
        &ask("hi", json!({"veil": {"verfy": 3}})),
    );
    assert_openai_error(s, &b, 400, None);
    let (s, b) = gateway.post(
        "/v1/chat/completions",
        &ask("hi", json!({"veil": {"accel": "candle"}})),
    );
    assert_openai_error(s, &b, 400, None);
    assert_eq!(b["error"]["param"], "veil.accel");
    let (s, b) = gateway.post(
        "/v1/chat/completions",
        &ask("hi", json!({"veil": {"accel": "warp"}})),
    );
    assert_openai_error(s, &b, 400, None);
    let (s, b) = gateway.post(
        "/v1/chat/completions",
        &ask("hi", json!({"max_tokens": 2, "veil": {"accel": "auto"}})),
    );
    assert_eq!(s, 200, "{b}");
    let (s, b) = gateway.post(
        "/v1/chat/completions",
        &ask("hi", json!({"max_tokens": 2, "veil": {"accel": "veil"}})),
    );
    assert_eq!(s, 200, "{b}");
    let huge = "x".repeat(300_000);
    let (s, b) = gateway.post("/v1/chat/completions", &ask(&huge, json!({})));
    assert_openai_error(s, &b, 413, None);
    // The gateway still answers after all that.
    let (s, _) = gateway.post("/v1/chat/completions", &ask("hi", json!({"max_tokens": 2})));
    assert_eq!(s, 200);
}

#[test]
fn a_client_that_leaves_mid_stream_stops_its_generation() {
    let gateway = Gateway::start(&["--max-concurrent", "1", "--max-queued", "0"]);
    let mut response = client()
        .post(format!("{}/v1/chat/completions", gateway.base))
        .json(&ask(
            "Write a long story about the sea.",
            json!({"stream": true, "max_tokens": 2000, "temperature": 0.8, "seed": 7}),
        ))
        .send()
        .expect("stream");
    let mut first = [0u8; 64];
    response.read_exact(&mut first).expect("the stream starts");
    // The role chunk may come before the generation has counted itself: wait for it.
    let active = gateway.metric_reaching("veil_active_generations", 1.0);
    assert_eq!(active, 1.0, "the generation never started");

    // The one slot is taken and nothing may wait: a second request is turned away.
    let (s, b) = gateway.post("/v1/chat/completions", &ask("hi", json!({"max_tokens": 2})));
    assert_openai_error(s, &b, 429, Some("queue_full"));

    drop(response);
    assert_stops_once_left(&gateway);
    assert!(gateway.metric("veil_generated_tokens_total") < 2000.0);
    let (s, _) = gateway.post("/v1/chat/completions", &ask("hi", json!({"max_tokens": 2})));
    assert_eq!(s, 200, "the slot is free again");
}

/// The text of a streamed chat answer.
fn streamed_text(gateway: &Gateway, body: &Value) -> String {
    let text = client()
        .post(format!("{}/v1/chat/completions", gateway.base))
        .json(body)
        .send()
        .expect("stream")
        .text()
        .expect("a whole stream");
    sse_data(&text)
        .iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn a_batching_gateway_answers_each_request_as_alone_and_frees_the_slot_of_a_client_that_leaves() {
    // The model as stored (Veil's kernels, whose rows do not depend on the batch).
    let gateway = Gateway::start_with(&["--local", "--batch", "3", "--max-queued", "8"]);
    let requests = [
        ask("Say hello.", json!({"max_tokens": 16})),
        ask(
            "Name a colour.",
            json!({"max_tokens": 20, "temperature": 0.8, "seed": 7}),
        ),
        ask(
            "Tell me about the sea.",
            json!({"max_tokens": 24, "stop": ["."]}),
        ),
    ];
    // Each alone, then all three at once: the batch gives each request its own answer.
    let alone: Vec<String> = requests
        .iter()
        .map(|r| {
            let (status, body) = gateway.post("/v1/chat/completions", r);
            assert_eq!(status, 200, "{body}");
            let accel = body["veil"]["accel"].as_str().unwrap_or_default();
            assert!(accel.starts_with("continuous batching"), "{body}");
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let together: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = requests
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r["stream"] = json!(true);
                let gateway = &gateway;
                scope.spawn(move || streamed_text(gateway, &r))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
    assert!(alone.iter().all(|t| !t.is_empty()), "{alone:?}");

    // A client that leaves frees its place in the batch.
    let mut response = client()
        .post(format!("{}/v1/chat/completions", gateway.base))
        .json(&ask(
            "Write a long story about the sea.",
            json!({"stream": true, "max_tokens": 2000, "temperature": 0.8, "seed": 7}),
        ))
        .send()
        .expect("stream");
    let mut first = [0u8; 64];
    response.read_exact(&mut first).expect("the stream starts");
    drop(response);
    assert_stops_once_left(&gateway);
}

#[test]
fn with_batch_auto_metainf_opens_the_batch_for_concurrent_requests_and_admits_a_lone_one_alone() {
    let gateway = Gateway::start_with(&["--local", "--batch", "auto", "--max-queued", "16"]);
    let questions = [
        "Name a fruit.",
        "Name a city.",
        "Name a river.",
        "Name a planet.",
        "Name a tree.",
        "Name a bird.",
    ];
    let accel_and_text = |body: &Value| {
        (
            body["veil"]["accel"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    };
    // One at a time: MetaInf sees a single request in flight and has the engine admit one.
    let alone: Vec<String> = questions
        .iter()
        .map(|q| {
            let (status, body) =
                gateway.post("/v1/chat/completions", &ask(q, json!({"max_tokens": 16})));
            assert_eq!(status, 200, "{body}");
            let (accel, text) = accel_and_text(&body);
            assert!(
                accel.starts_with("one at a time in the batching engine: ")
                    && accel.contains("1 in flight"),
                "a lone request goes alone: {accel}"
            );
            text
        })
        .collect();
    // All at once: those that arrive while others run see them, and the selector opens the
    // batch; each answer is the one it got alone.
    let together: Vec<(String, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = questions
            .iter()
            .map(|q| {
                let gateway = &gateway;
                scope.spawn(move || {
                    let (status, body) =
                        gateway.post("/v1/chat/completions", &ask(q, json!({"max_tokens": 16})));
                    assert_eq!(status, 200, "{body}");
                    accel_and_text(&body)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let texts: Vec<String> = together.iter().map(|(_, t)| t.clone()).collect();
    assert_eq!(texts, alone);
    assert!(
        together
            .iter()
            .any(|(accel, _)| accel.starts_with("continuous batching (16 slots): batch")),
        "no concurrent request was batched: {together:?}"
    );
    // A forced batching method goes to the batch even alone.
    let (status, body) = gateway.post(
        "/v1/chat/completions",
        &ask(
            questions[0],
            json!({"max_tokens": 16, "veil": {"accel": "batch"}}),
        ),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        accel_and_text(&body),
        (
            "continuous batching (16 slots): batch (forced)".to_string(),
            alone[0].clone()
        )
    );
}

/// A full batch: requests past its slots wait in arrival order, and past `--max-queued` they
/// are answered 429; once the batch's clients leave, the waiting request is served.
#[test]
fn a_full_batch_queues_then_turns_requests_away() {
    let gateway = Gateway::start_with(&["--local", "--batch", "2", "--max-queued", "1"]);
    let long = ask(
        "Write a long story about the sea.",
        json!({"stream": true, "max_tokens": 2000, "temperature": 0.8, "seed": 7}),
    );
    // Two streams fill the batch's two slots.
    let mut streams: Vec<_> = (0..2)
        .map(|_| {
            let mut response = client()
                .post(format!("{}/v1/chat/completions", gateway.base))
                .json(&long)
                .send()
                .expect("stream");
            let mut first = [0u8; 64];
            response.read_exact(&mut first).expect("the stream starts");
            response
        })
        .collect();
    std::thread::scope(|scope| {
        // A third waits for a slot...
        let waiting = scope.spawn(|| gateway.post("/v1/chat/completions", &ask("hi", json!({}))));
        let queued = gateway.metric_reaching("veil_queued_requests", 1.0);
        assert_eq!(queued, 1.0, "the third request never queued");
        // ...and a fourth finds the queue full.
        let (s, b) = gateway.post("/v1/chat/completions", &ask("hi", json!({"max_tokens": 2})));
        assert_openai_error(s, &b, 429, Some("queue_full"));
        // The streams' clients leave: their slots free, and the waiting request is served.
        streams.clear();
        let (status, body) = waiting.join().expect("the waiting request");
        assert_eq!(status, 200, "{body}");
    });
}

/// The speed the gateway reports (`veil.tokens_per_second`, and the dashboard's record of the
/// request) agrees with the pace its streamed text reaches the client: a consistency check
/// between two clocks of one request (within 3×, so a busy machine passes), which catches a
/// speed computed over the wrong interval, one at a time and in the batching engine.
#[test]
fn the_reported_speed_matches_the_pace_of_the_streamed_text() {
    for batch in ["1", "4"] {
        let gateway = Gateway::start_with(&["--local", "--batch", batch]);
        let body = ask(
            "Write a long story about the sea.",
            json!({"max_tokens": 64, "stream": true}),
        );
        let mut response = client()
            .post(format!("{}/v1/chat/completions", gateway.base))
            .json(&body)
            .send()
            .expect("stream");
        // Each event's data with the time it arrived.
        let mut events: Vec<(Instant, Value)> = Vec::new();
        let mut pending = String::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = response.read(&mut buf) {
            let now = Instant::now();
            pending.push_str(&String::from_utf8_lossy(&buf[..n]));
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                if let Some(data) = event.trim().strip_prefix("data: ") {
                    if let Ok(value) = serde_json::from_str::<Value>(data) {
                        events.push((now, value));
                    }
                }
            }
        }
        let texts: Vec<Instant> = events
            .iter()
            .filter(|(_, e)| {
                e["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
            })
            .map(|(at, _)| *at)
            .collect();
        let last = &events.last().expect("events").1;
        let tokens = last["usage"]["completion_tokens"].as_f64().expect("usage");
        let reported = last["veil"]["tokens_per_second"].as_f64().expect("speed");
        assert!(
            tokens > 16.0 && texts.len() > 4,
            "too short to time: {last}"
        );
        let elapsed = (texts[texts.len() - 1] - texts[0]).as_secs_f64().max(1e-3);
        let paced = (tokens - 1.0) / elapsed;
        let ratio = reported / paced;
        assert!(
            (1.0 / 3.0..=3.0).contains(&ratio),
            "--batch {batch}: reported {reported:.1} tok/s, the text came at {paced:.1}: {last}"
        );
        let board = gateway.get_json("/api/dashboard");
        let recorded = board["requests"][0]["tokens_per_second"]
            .as_f64()
            .expect("a record");
        assert!(
            (recorded - reported).abs() <= 1e-6 * reported,
            "the dashboard charts {recorded}, the answer said {reported}: {board}"
        );
    }
}

/// Checks the one generation whose client left stops (within 30 s) and counts as cancelled.
fn assert_stops_once_left(gateway: &Gateway) {
    let active = gateway.metric_reaching("veil_active_generations", 0.0);
    assert_eq!(
        active, 0.0,
        "the generation kept running after its client left"
    );
    assert_eq!(gateway.metric("veil_cancelled_generations_total"), 1.0);
}

/// A venv with the official `openai` package, made once under `$VEIL_HOME`.
fn openai_python() -> std::path::PathBuf {
    let home = std::env::var_os("VEIL_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/veil")
        });
    let venv = home.join("test-openai-venv");
    let python = venv.join("bin/python");
    let imports = || {
        Command::new(&python)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !imports() {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 runs");
        assert!(made.success(), "python3 -m venv failed");
        let installed = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "openai>=1,<3"])
            .status()
            .expect("pip runs");
        assert!(installed.success(), "pip install openai failed");
    }
    python
}

/// Runs the `openai` package's client against `gateway`: its plain and streamed answers and
/// what it raised for an unknown model, as one JSON object.
fn run_openai_client(gateway: &Gateway) -> Value {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/openai_client.py"
    );
    let out = Command::new(openai_python())
        .arg(script)
        .arg(&gateway.base)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

#[test]
fn the_official_openai_client_gets_answers_streamed_and_not() {
    let gateway = Gateway::start(&[]);
    let result = run_openai_client(&gateway);
    let plain = result["plain"].as_str().expect("plain answer");
    assert!(plain.contains("Paris"), "{result}");
    assert_eq!(result["streamed"], plain, "{result}");
    assert!(result["finish"].is_string(), "{result}");
    assert_eq!(result["unknown_model"], "NotFoundError", "{result}");
}

/// Headless Chromium (Debian's `chromium`, which `.ci/run` installs) with the flags this
/// offline machine needs.
fn chromium(profile: &std::path::Path, extra: &[&str], url: &str) -> std::process::Output {
    let binary = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("headless Chromium is needed: apt-get install chromium (.ci/run does)");
    Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium runs")
}

/// Saves a screenshot of the dashboard under `target/tmp/NAME` (a test artifact) and checks it
/// is a real picture.
fn screenshot(profile: &std::path::Path, gateway: &Gateway, name: &str) {
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_file(&shot);
    let size = format!("--screenshot={}", shot.display());
    chromium(profile, &[&size, "--window-size=1200,900"], &gateway.base);
    let png = std::fs::read(&shot).expect("a screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    eprintln!("dashboard screenshot: {}", shot.display());
}

#[test]
fn the_dashboard_in_headless_chromium_lists_the_swarm_and_the_requests() {
    let gateway = Gateway::start(&[]);
    let (status, _) = gateway.post(
        "/v1/chat/completions",
        &ask("Hello!", json!({"max_tokens": 8})),
    );
    assert_eq!(status, 200);
    let profile = tempfile::tempdir().unwrap();
    let dom = chromium(profile.path(), &["--dump-dom"], &gateway.base);
    let dom = String::from_utf8_lossy(&dom.stdout);
    // Filled in by the page's script from /api/dashboard.
    assert!(
        dom.contains(&format!("local ({MODEL})")),
        "the node is not listed: {dom}"
    );
    assert!(dom.contains("this process, blocks 0-30"), "{dom}");
    assert!(
        dom.contains("<td>chat</td>"),
        "the request is not listed: {dom}"
    );
    assert!(dom.contains("<circle"), "the chart has no points: {dom}");

    screenshot(profile.path(), &gateway, "dashboard.png");
}

/// What the default model (as stored) answers greedily in one process, for comparison.
fn answer_in_one_process(question: &str, max_tokens: usize) -> String {
    let model =
        veil_model::LocalModel::load(&model_path(), veil_model::WeightFormat::AsStored, &[])
            .expect("model loads");
    let prompt = model
        .chat_prompt(&[veil_model::ChatMessage::user(question)])
        .expect("prompt");
    let params = veil_model::GenerationParams {
        max_tokens,
        ..Default::default()
    };
    veil_model::generate(
        &mut model.session(),
        &model.tokenizer,
        &prompt,
        model.config.context_length,
        &params,
        &mut |_| {},
    )
    .expect("generates")
    .text
}

#[test]
fn through_a_swarm_of_nodes_it_answers_like_one_process_and_frees_node_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let files = shards(dir.path());
    let first = NodeProcess::start(&files[0], &dir.path().join("a.redb"), None);
    let _second = NodeProcess::start(&files[1], &dir.path().join("b.redb"), Some(&first.addr));
    let _third = NodeProcess::start(&files[2], &dir.path().join("c.redb"), Some(&first.addr));
    let client_state = dir.path().join("client.redb");
    let gateway = Gateway::start_with(&[
        "--bootstrap",
        &first.addr,
        "--state",
        client_state.to_str().expect("a UTF-8 path"),
    ]);

    // Until every range is announced, requests get the no-route error in OpenAI's shape.
    let question = "What is the capital of France?";
    let body = ask(question, json!({"max_tokens": 16}));
    let mut answered = None;
    for _ in 0..400 {
        let (status, reply) = gateway.post("/v1/chat/completions", &body);
        if status == 200 {
            answered = Some(reply);
            break;
        }
        assert_openai_error(status, &reply, 503, Some("no_route"));
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let reply = answered.expect("the swarm answered within 2 minutes");
    assert_eq!(reply["veil"]["mode"], "swarm");
    let text = reply["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert_eq!(text, answer_in_one_process(question, 16));

    let streamed = client()
        .post(format!("{}/v1/chat/completions", gateway.base))
        .json(&ask(question, json!({"max_tokens": 16, "stream": true})))
        .send()
        .and_then(|r| r.text())
        .expect("stream");
    let streamed: String = sse_data(&streamed)
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(streamed, text);

    // A client that leaves mid-stream: the chain's three node sessions close.
    let mut response = client()
        .post(format!("{}/v1/chat/completions", gateway.base))
        .json(&ask(
            "Write a long story about the sea.",
            json!({"stream": true, "max_tokens": 2000, "temperature": 0.8}),
        ))
        .send()
        .expect("stream");
    // Past the first chunk (the role, sent at once) into the text: the chain is open.
    let mut first_bytes = [0u8; 1024];
    response
        .read_exact(&mut first_bytes)
        .expect("the stream starts");
    assert_eq!(gateway.metric("veil_open_node_sessions"), 3.0);
    drop(response);
    let open = gateway.metric_reaching("veil_open_node_sessions", 0.0);
    assert_eq!(open, 0.0, "node sessions stayed open after the client left");
    assert_eq!(gateway.metric("veil_cancelled_generations_total"), 1.0);

    // The official openai package gets the same answer through the swarm.
    let result = run_openai_client(&gateway);
    assert_eq!(
        result["plain"],
        answer_in_one_process(question, 24),
        "{result}"
    );
    assert_eq!(result["streamed"], result["plain"], "{result}");

    // The dashboard lists the three nodes with their ranges.
    let board: Value = gateway.get_json("/api/dashboard");
    let mut ranges: Vec<String> = board["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["ranges"].as_str().map(str::to_string))
        .collect();
    ranges.sort();
    assert_eq!(
        ranges,
        ["blocks 0-10", "blocks 10-20", "blocks 20-30"],
        "{board}"
    );

    // The same in headless Chromium, with a screenshot of the swarm's dashboard.
    let profile = tempfile::tempdir().unwrap();
    let dom = chromium(profile.path(), &["--dump-dom"], &gateway.base);
    let dom = String::from_utf8_lossy(&dom.stdout);
    for range in ["blocks 0-10", "blocks 10-20", "blocks 20-30"] {
        assert!(
            dom.contains(&format!("<td>{range}</td>")),
            "{range} is not listed: {dom}"
        );
    }
    assert!(
        dom.contains("cancelled"),
        "the cancelled request is not listed: {dom}"
    );
    screenshot(profile.path(), &gateway, "dashboard-swarm.png");
}

#[test]
fn veil_chain_verifies_a_split_chain_through_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let files = shards(dir.path());
    let state = |name: &str| dir.path().join(format!("{name}.redb"));
    let first = NodeProcess::start(&files[0], &state("a0"), None);
    let _others: Vec<NodeProcess> = [(0, "b0"), (1, "a1"), (1, "b1"), (2, "a2"), (2, "b2")]
        .iter()
        .map(|&(i, name)| NodeProcess::start(&files[i], &state(name), Some(&first.addr)))
        .collect();
    let client_state = state("gateway");
    let gateway = Gateway::start_with(&[
        "--bootstrap",
        &first.addr,
        "--state",
        client_state.to_str().expect("a UTF-8 path"),
    ]);
    let (s, b) = gateway.post(
        "/v1/chat/completions",
        &ask("hi", json!({"veil": {"chain": true}})),
    );
    assert_openai_error(s, &b, 400, None);
    assert_eq!(b["error"]["param"], "veil.chain");

    let question = "What is the capital of France?";
    let body = ask(
        question,
        json!({"max_tokens": 12, "veil": {"verify": 2, "chain": true}}),
    );
    let mut answered = None;
    for _ in 0..400 {
        let (status, reply) = gateway.post("/v1/chat/completions", &body);
        if status == 200 {
            answered = Some(reply);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let reply = answered.expect("the verified chain answered within 2 minutes");
    let verdict = reply["veil"]["verification"].as_str().expect("a verdict");
    assert!(
        verdict.starts_with("every hop accepted (0 caught lying)"),
        "{verdict}"
    );
    for blocks in ["blocks 0-10", "blocks 10-20", "blocks 20-30"] {
        assert!(verdict.contains(blocks), "{verdict}");
    }
    assert_eq!(verdict.matches("passed by 1 of 1").count(), 3, "{verdict}");
    let text = reply["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert_eq!(text, answer_in_one_process(question, 12));
}

/// Whether the server closes `stream` (or answers `408`) within 30 s, reading what it sends.
fn cut_off(stream: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 408") {
                    return true;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn clients_that_dribble_headers_or_bodies_are_cut_off_and_the_rest_are_served() {
    use std::io::Write;
    // Two connections at most: the slow clients below hold both until they are cut off.
    let gateway = Gateway::start(&[
        "--header-timeout",
        "1",
        "--body-timeout",
        "1",
        "--max-connections",
        "2",
    ]);
    let addr = gateway.base.trim_start_matches("http://").to_string();
    let mut slow_headers = std::net::TcpStream::connect(&addr).unwrap();
    slow_headers
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    let mut slow_body = std::net::TcpStream::connect(&addr).unwrap();
    slow_body
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n\
              Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mess",
        )
        .unwrap();
    // Meanwhile an honest client waits for a place, and is served once they are gone.
    let honest = std::thread::spawn({
        let base = gateway.base.clone();
        move || {
            client()
                .get(format!("{base}/v1/models"))
                .send()
                .map(|r| r.status().as_u16())
        }
    });
    assert!(
        cut_off(&mut slow_headers),
        "a client that never ends its headers keeps its connection"
    );
    assert!(
        cut_off(&mut slow_body),
        "a client that never ends its body keeps its connection"
    );
    assert_eq!(honest.join().unwrap().unwrap(), 200);
}

#[test]
fn the_gateway_benchmark_prints_its_ratio_and_concurrency_rows() {
    let out = Command::new(env!("CARGO_BIN_EXE_veil"))
        .args([
            "bench",
            "--gateway",
            "--threads",
            "2",
            "--runs",
            "1",
            "--tokens",
            "8",
        ])
        .output()
        .expect("veil bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ratio: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ratio")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ratio in {stdout}"));
    assert!(ratio.is_finite() && ratio > 0.0, "{stdout}");
    for n in ["  1 ", "  4 ", " 16 "] {
        assert!(
            stdout.lines().any(|l| l.starts_with(n)),
            "no row for {n}: {stdout}"
        );
    }
}

/// Waits until the gateway answers `body` (503 `no_route` until the swarm is announced).
fn first_answer(gateway: &Gateway, body: &Value) -> (u16, Value) {
    // Generous: under a loaded CI machine the nodes take a while to load and announce.
    let mut last = Value::Null;
    for _ in 0..400 {
        let (status, reply) = gateway.post("/v1/chat/completions", body);
        if status != 503 || reply["error"]["code"] != "no_route" {
            return (status, reply);
        }
        last = reply;
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    panic!("no route through the swarm within 2 minutes; last answer: {last}");
}

#[test]
fn verified_answers_come_from_a_committee_and_a_committee_of_liars_is_a_502() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_path();
    let model_arg = model.to_str().expect("a UTF-8 path");
    let state = |name: &str| dir.path().join(format!("{name}.redb"));
    let f32 = ["--dtype", "f32"];
    let state_paths: Vec<(String, String)> = ["gateway", "liars-gateway"]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                state(n).to_str().expect("a UTF-8 path").to_string(),
            )
        })
        .collect();
    let state_arg = |name: &str| -> &str {
        &state_paths
            .iter()
            .find(|(n, _)| n == name)
            .expect("a known state")
            .1
    };
    let a = NodeProcess::start_with(&model, &state("a"), None, &f32);
    let _b = NodeProcess::start_with(&model, &state("b"), Some(&a.addr), &f32);
    let _c = NodeProcess::start_with(&model, &state("c"), Some(&a.addr), &f32);
    let evidence = dir.path().join("evidence");
    let evidence_arg = evidence.to_str().expect("a UTF-8 path");
    let gateway = Gateway::start_with(&[
        "--bootstrap",
        &a.addr,
        "--model",
        model_arg,
        "--evidence-dir",
        evidence_arg,
        "--state",
        state_arg("gateway"),
    ]);

    let question = "What is the capital of France?";
    let (status, reply) = first_answer(
        &gateway,
        &ask(question, json!({"max_tokens": 12, "veil": {"verify": 3}})),
    );
    assert_eq!(status, 200, "{reply}");
    let verdict = reply["veil"]["verification"].as_str().expect("a verdict");
    assert!(
        verdict.starts_with("accepted by 2 of 2 judges"),
        "{verdict}"
    );
    let text = reply["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert!(text.contains("Paris"), "{text}");
    let (s, b) = gateway.post(
        "/v1/chat/completions",
        &ask("hi", json!({"veil": {"verify": 17}})),
    );
    assert_openai_error(s, &b, 400, None);

    // Two liars of different kinds (two nodes serving the same wrong model would agree with each
    // other): each fails the other's answer.
    let x = NodeProcess::start_with(
        &model,
        &state("x"),
        None,
        &["--dtype", "f32", "--misbehave", "other-model"],
    );
    let _y = NodeProcess::start_with(
        &model,
        &state("y"),
        Some(&x.addr),
        &["--dtype", "f32", "--misbehave", "random-output"],
    );
    // With --recheck, the gateway recomputes each rejected answer itself before punishing:
    // the first lie fails here too, so its rejection stands (and no judge is left for the
    // second).
    let liars = Gateway::start_with(&[
        "--bootstrap",
        &x.addr,
        "--model",
        model_arg,
        "--evidence-dir",
        evidence_arg,
        "--state",
        state_arg("liars-gateway"),
        "--recheck",
    ]);
    let (status, reply) = first_answer(
        &liars,
        &ask(question, json!({"max_tokens": 12, "veil": {"verify": 2}})),
    );
    assert_openai_error(status, &reply, 502, Some("verification_failed"));
    let said = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(
        said.contains("1 caught lying; 1 of them rechecked here and failing here too"),
        "{reply}"
    );
    let written = std::fs::read_dir(&evidence).map(|d| d.count()).unwrap_or(0);
    assert!(written >= 1, "the lie a judge proved left no evidence");
    // The proven liar's reputation shows on the dashboard.
    let board: Value = liars.get_json("/api/dashboard");
    let scores: Vec<i64> = board["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["reputation"].as_i64())
        .collect();
    assert!(scores.contains(&-100), "{board}");
}

/// A key for `model` and the model encrypted under it, in `dir`.
fn encrypt(dir: &std::path::Path, model: &std::path::Path) -> (PathBuf, PathBuf) {
    let (key, enc) = (dir.join("key.veil"), dir.join("enc.gguf"));
    for args in [
        vec!["ee", "keygen", "--out", key.to_str().unwrap()],
        vec![
            "ee",
            "encrypt",
            "--key",
            key.to_str().unwrap(),
            "--out",
            enc.to_str().unwrap(),
        ],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_veil"))
            .args(&args)
            .arg("--model")
            .arg(model)
            .env("VEIL_KEY_PASSPHRASE", PASSPHRASE)
            .output()
            .expect("veil ee runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (key, enc)
}

/// The plaintext model a rotating gateway re-encrypts, copied into `dir` (its name gives the
/// served model's; a test may take it away), and a key and the model encrypted under it.
fn plain_and_encrypted(dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
    let plain = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    std::fs::copy(model_path(), &plain).unwrap();
    let (key, enc) = encrypt(dir, &plain);
    (plain, key, enc)
}

#[test]
fn an_encrypted_model_behind_the_gateway_answers_like_the_plaintext_one() {
    let dir = tempfile::tempdir().unwrap();
    let (key, enc) = encrypt(dir.path(), &model_path());
    let question = "What is the capital of France?";
    let plain = Gateway::start(&[]);
    let (status, want) = plain.post("/v1/chat/completions", &ask(question, json!({})));
    assert_eq!(status, 200, "{want}");
    assert_eq!(want["veil"]["privacy"], "plain");
    drop(plain);

    let encrypted = Gateway::start(&[
        "--encrypted",
        enc.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    let (status, got) = encrypted.post("/v1/chat/completions", &ask(question, json!({})));
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["veil"]["privacy"], "encrypted");
    assert_eq!(
        got["choices"][0]["message"]["content"], want["choices"][0]["message"]["content"],
        "the encrypted model answers differently"
    );
    let (s, b) = encrypted.post(
        "/v1/chat/completions",
        &ask(question, json!({"veil": {"privacy": "plain"}})),
    );
    assert_openai_error(s, &b, 400, None);
    assert_eq!(b["error"]["param"], "veil.privacy");
    let (s, _) = encrypted.post(
        "/v1/chat/completions",
        &ask(
            question,
            json!({"veil": {"privacy": "encrypted"}, "max_tokens": 2}),
        ),
    );
    assert_eq!(s, 200);
}

#[test]
fn the_key_rotates_without_changing_answers_and_a_failed_rotation_keeps_the_old_key() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, key, enc) = plain_and_encrypted(dir.path());
    // Every request (a prompt of about 30 tokens and 8 answer tokens) spends the budget.
    let gateway = Gateway::start(&[
        "--model",
        plain.to_str().unwrap(),
        "--encrypted",
        enc.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--rotate-after-tokens",
        "20",
    ]);
    let question = ask("What is the capital of France?", json!({"max_tokens": 8}));
    let answer = |gateway: &Gateway| {
        let (status, got) = gateway.post("/v1/chat/completions", &question);
        assert_eq!(status, 200, "{got}");
        got["choices"][0]["message"]["content"].clone()
    };
    let wait_for = |name: &str, value: f64| gateway.wait_for_metric(name, value);
    let first = answer(&gateway);
    wait_for("veil_key_rotations_total", 1.0);
    // Under the new key the answer is the same (EE is exact), and it rotates again.
    assert_eq!(answer(&gateway), first);
    wait_for("veil_key_rotations_total", 2.0);
    assert_eq!(gateway.metric("veil_key_rotation_failures_total"), 0.0);

    // Without the plaintext model the next rotation fails half-way; the old key serves on.
    std::fs::remove_file(&plain).unwrap();
    assert_eq!(answer(&gateway), first);
    wait_for("veil_key_rotation_failures_total", 1.0);
    assert_eq!(answer(&gateway), first);
    assert_eq!(gateway.metric("veil_key_rotations_total"), 2.0);
}

#[test]
fn with_require_tee_only_attested_nodes_serve_and_refusals_say_why() {
    // Node a "runs in a TDX guest": its configfs-tsm look-alike returns Intel's published sample
    // quote, which verifies as hardware evidence (with its collateral, as of its dates) but names
    // no Veil node; node b runs in no TEE. No real enclave runs on the test machines, so the
    // gateway must refuse both, each for its reason.
    let dir = tempfile::tempdir().unwrap();
    let model = model_path();
    let tsm = common::FakeTsm::start(
        "tdx_guest",
        std::fs::read(common::tee_fixture("tdx_quote")).unwrap(),
    );
    let collateral = common::tee_fixture("tdx_quote_collateral.json");
    let a = NodeProcess::start_with(
        &model,
        &dir.path().join("a.redb"),
        None,
        &[
            "--tee-report-dir",
            tsm.dir.path().to_str().unwrap(),
            "--tee-collateral",
            collateral.to_str().unwrap(),
        ],
    );
    let b = NodeProcess::start_with(
        &model,
        &dir.path().join("b.redb"),
        Some(&a.addr),
        &["--no-tee"],
    );
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "intel_tcb_statuses = [\"UpToDate\"]\n[[measurement]]\nkind = \"tdx\"\nvalue = \"91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7\"\n",
    )
    .unwrap();
    let gateway = Gateway::start_with(&[
        "--bootstrap",
        &a.addr,
        "--model",
        model.to_str().unwrap(),
        "--state",
        dir.path().join("gateway.redb").to_str().unwrap(),
        "--require-tee",
        policy.to_str().unwrap(),
    ]);
    let peer = |node: &NodeProcess| node.addr.rsplit('/').next().unwrap().to_string();
    let (a_id, b_id) = (peer(&a), peer(&b));
    let body = ask("What is the capital of France?", json!({}));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let (status, reply) = gateway.post("/v1/chat/completions", &body);
        assert_eq!(status, 503, "an unattested swarm answered: {reply}");
        assert_openai_error(status, &reply, 503, Some("no_route"));
        let message = reply["error"]["message"].as_str().unwrap_or("").to_string();
        if message.contains(&a_id) && message.contains(&b_id) {
            assert!(message.contains("wrong key binding"), "{message}");
            assert!(message.contains("announces no TEE"), "{message}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "both nodes never judged; last: {reply}"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    // Node a asked its TEE to sign its own key each time: at start (bound to the time) and for
    // the gateway's challenge (bound to the nonce).
    let key = veil_net::public_key_of(&a_id.parse().unwrap()).unwrap();
    let key_half = veil_tee::report_data(&key, &veil_tee::Freshness::Time(0))[..32].to_vec();
    let inblobs = tsm.inblobs.lock().unwrap().clone();
    assert!(inblobs.len() >= 2, "{} inblobs", inblobs.len());
    assert!(inblobs.iter().all(|blob| blob[..32] == key_half[..]));

    // Committees sit only on attested nodes too.
    let verified = ask(
        "What is the capital of France?",
        json!({"veil": {"verify": 2}}),
    );
    let (status, reply) = gateway.post("/v1/chat/completions", &verified);
    assert_openai_error(status, &reply, 503, Some("no_route"));
}

#[test]
fn critical_requests_return_only_answers_whose_proof_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_path();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let zk = dir.path().join("zk");
    let setup = Command::new(env!("CARGO_BIN_EXE_veil"))
        .args(["zk", "setup", "--model"])
        .arg(repo.join("models/zk/mlp.json"))
        .arg("--out")
        .arg(&zk)
        .output()
        .unwrap();
    assert!(
        setup.status.success(),
        "{}",
        String::from_utf8_lossy(&setup.stderr)
    );
    // A node whose weights are not the committed ones: same public files, one weight changed.
    let forged = dir.path().join("forged");
    std::fs::create_dir(&forged).unwrap();
    for f in ["public.json", "params.bin"] {
        std::fs::copy(zk.join(f), forged.join(f)).unwrap();
    }
    let mut secret: Value =
        serde_json::from_slice(&std::fs::read(zk.join("secret.json")).unwrap()).unwrap();
    let w = secret["weights"][3].as_i64().unwrap();
    secret["weights"][3] = json!(if w < 100 { w + 1 } else { w - 1 });
    std::fs::write(forged.join("secret.json"), secret.to_string()).unwrap();

    let digits = veil_zk::digits::read_digits(&repo.join("datasets/digits/digits.csv.gz")).unwrap();
    let (_, test) = veil_zk::digits::split(&digits);
    let digit = &test[4];
    let float: veil_zk::model::FloatModel =
        serde_json::from_slice(&std::fs::read(repo.join("models/zk/mlp.json")).unwrap()).unwrap();
    let expected = float
        .quantize()
        .unwrap()
        .trace(&digit.pixels)
        .unwrap()
        .output;

    let classify = |gateway: &Gateway| -> (u16, Value) {
        let body = json!({"input": digit.pixels});
        for _ in 0..400 {
            let (status, reply) = gateway.post("/v1/veil/classify", &body);
            if status != 503 {
                return (status, reply);
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        panic!("no prover found");
    };
    let start_gateway = |node: &NodeProcess, name: &str| {
        Gateway::start_with(&[
            "--bootstrap",
            &node.addr,
            "--model",
            model.to_str().unwrap(),
            "--state",
            dir.path().join(format!("{name}.redb")).to_str().unwrap(),
            "--zk-public",
            zk.to_str().unwrap(),
        ])
    };

    let honest = NodeProcess::start_with(
        &model,
        &dir.path().join("honest.redb"),
        None,
        &["--zk-setup", zk.to_str().unwrap()],
    );
    let gateway = start_gateway(&honest, "gateway");
    let (status, reply) = classify(&gateway);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["verified"], true);
    assert_eq!(reply["logits"], json!(expected));
    assert_eq!(reply["digit"], veil_zk::model::argmax(&expected));
    for (body, param) in [
        (json!({"input": [1, 2, 3]}), "input"),
        (json!({"input": vec![17; 64]}), "input"),
    ] {
        let (status, reply) = gateway.post("/v1/veil/classify", &body);
        assert_openai_error(status, &reply, 400, None);
        assert_eq!(reply["error"]["param"], param);
    }
    let (status, reply) = gateway.post(
        "/v1/veil/classify",
        &json!({"input": digit.pixels, "extra": 1}),
    );
    assert_openai_error(status, &reply, 400, None);

    // A swarm whose only prover holds other weights: its proof is refused, the client gets 502.
    let forger = NodeProcess::start_with(
        &model,
        &dir.path().join("forger.redb"),
        None,
        &["--zk-setup", forged.to_str().unwrap()],
    );
    let gateway = start_gateway(&forger, "forger-gateway");
    let (status, reply) = classify(&gateway);
    assert_openai_error(status, &reply, 502, Some("verification_failed"));
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("another commitment"),
        "{reply}"
    );
}

/// Gemma 3 270M behind the gateway: listed under its name, text completions continue the
/// prompt as llama.cpp does, and chat (a base model has no template) is a clear 400.
#[test]
fn a_gemma_gateway_lists_the_model_completes_text_and_refuses_chat_clearly() {
    let gateway = Gateway::start_with(&["--local", "--model", "gemma3-270m"]);
    let models = gateway.get_json("/v1/models");
    assert_eq!(models["data"][0]["id"], "gemma-3-270m-q4_k_m", "{models}");
    let (status, body) = gateway.post(
        "/v1/completions",
        &json!({"model": "gemma-3-270m-q4_k_m", "prompt": "The capital of France is",
                "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(status, 200, "{body}");
    let text = body["choices"][0]["text"].as_str().unwrap_or_default();
    // llama.cpp's greedy text up to its first near-tie (its fifth token, " country", leads
    // " United" by 0.015).
    assert!(text.starts_with(" the capital of the"), "{body}");
    let (status, body) = gateway.post(
        "/v1/chat/completions",
        &json!({"model": "gemma-3-270m-q4_k_m",
                "messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_openai_error(status, &body, 400, None);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("chat template"),
        "{body}"
    );
}

#[test]
fn api_keys_are_required_and_foreign_hosts_refused_in_openai_shape() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "# the team\nsk-veil-test\n").unwrap();
    let gateway = Gateway::start(&["--api-key-file", keys.to_str().unwrap()]);
    let body = ask("hi", json!({"max_tokens": 2}));
    let send = |key: Option<&str>, host: Option<&str>| {
        let mut request = client()
            .post(format!("{}/v1/chat/completions", gateway.base))
            .json(&body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(host) = host {
            request = request.header("Host", host);
        }
        let response = request.send().expect("request sent");
        let status = response.status().as_u16();
        (status, response.json::<Value>().expect("a JSON body"))
    };
    let (s, b) = send(None, None);
    assert_openai_error(s, &b, 401, Some("invalid_api_key"));
    let (s, b) = send(Some("sk-guessed"), None);
    assert_openai_error(s, &b, 401, Some("invalid_api_key"));
    let (s, b) = send(Some("sk-veil-test"), None);
    assert_eq!(s, 200, "{b}");
    // A page on another site that rebinds its name to 127.0.0.1: refused even with a key.
    let (s, b) = send(Some("sk-veil-test"), Some("evil.example"));
    assert_openai_error(s, &b, 403, Some("foreign_host"));
    let (s, b) = send(Some("sk-veil-test"), Some("localhost:8080"));
    assert_eq!(s, 200, "{b}");
    // Load balancers probe /health without a key.
    let health = client()
        .get(format!("{}/health", gateway.base))
        .send()
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    // And without --api-key-file no key is asked for, but the Host check stays.
    drop(gateway);
    let open = Gateway::start(&[]);
    let response = client()
        .get(format!("{}/v1/models", open.base))
        .header("Host", "evil.example")
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
    assert!(open.get_json("/v1/models")["data"].is_array());
}

/// Streams a long verified answer (`veil` options as given), reads its first bytes and leaves;
/// checks that `what` (the committee, the chain) started, stopped once the client left, and
/// was counted as cancelled.
fn leave_a_long_verified_stream(gateway: &Gateway, veil: Value, what: &str) {
    let mut response = client()
        .post(format!("{}/v1/chat/completions", gateway.base))
        .json(&ask(
            "Write a long story about the sea.",
            json!({"stream": true, "max_tokens": 2000, "temperature": 0.8, "seed": 7,
                   "veil": veil}),
        ))
        .send()
        .expect("stream");
    let mut first = [0u8; 64];
    response.read_exact(&mut first).expect("the stream starts");
    let wait_for_active = |want: f64| gateway.metric_reaching("veil_active_generations", want);
    assert_eq!(wait_for_active(1.0), 1.0, "{what} never started");
    drop(response);
    assert_eq!(
        wait_for_active(0.0),
        0.0,
        "{what} kept generating after its client left"
    );
    assert_eq!(gateway.metric("veil_cancelled_generations_total"), 1.0);
}

#[test]
fn a_client_that_leaves_a_verified_stream_stops_the_committee() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_path();
    let state = |name: &str| dir.path().join(format!("{name}.redb"));
    let f32 = ["--dtype", "f32"];
    let a = NodeProcess::start_with(&model, &state("a"), None, &f32);
    let _b = NodeProcess::start_with(&model, &state("b"), Some(&a.addr), &f32);
    let gateway_state = state("gateway");
    let gateway = Gateway::start_with(&[
        "--bootstrap",
        &a.addr,
        "--model",
        model.to_str().unwrap(),
        "--state",
        gateway_state.to_str().unwrap(),
    ]);
    // A long verified answer (F32 nodes: minutes of work).
    leave_a_long_verified_stream(&gateway, json!({"verify": 2}), "the committee");
    // The gateway answers the next client.
    let (s, b) = gateway.post("/v1/chat/completions", &ask("hi", json!({"max_tokens": 2})));
    assert_eq!(s, 200, "{b}");
}

#[test]
fn a_client_that_leaves_a_verified_chain_stream_stops_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let files = shards(dir.path());
    let state = |name: &str| dir.path().join(format!("{name}.redb"));
    let first = NodeProcess::start(&files[0], &state("a0"), None);
    let _others: Vec<NodeProcess> = [(0, "b0"), (1, "a1"), (1, "b1"), (2, "a2"), (2, "b2")]
        .iter()
        .map(|&(i, name)| NodeProcess::start(&files[i], &state(name), Some(&first.addr)))
        .collect();
    let gateway_state = state("gateway");
    let gateway = Gateway::start_with(&[
        "--bootstrap",
        &first.addr,
        "--state",
        gateway_state.to_str().unwrap(),
    ]);
    let ready = ask(
        "hi",
        json!({"max_tokens": 2, "veil": {"verify": 2, "chain": true}}),
    );
    let mut routed = false;
    for _ in 0..400 {
        if gateway.post("/v1/chat/completions", &ready).0 == 200 {
            routed = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    assert!(routed, "the verified chain never answered");
    leave_a_long_verified_stream(&gateway, json!({"verify": 2, "chain": true}), "the chain");
}

#[test]
fn each_api_key_has_its_own_prefix_cache() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "sk-alice\nsk-bob\n").unwrap();
    let gateway = Gateway::start_with(&["--local", "--api-key-file", keys.to_str().unwrap()]);
    let question = "Name three rivers in Europe.";
    let ask_as = |key: &str, accel: &str| {
        let response = client()
            .post(format!("{}/v1/chat/completions", gateway.base))
            .bearer_auth(key)
            .json(&ask(
                question,
                json!({"max_tokens": 4, "veil": {"accel": accel}}),
            ))
            .send()
            .expect("request sent");
        assert_eq!(response.status().as_u16(), 200);
        let body: Value = response.json().expect("a JSON body");
        body["veil"]["accel"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    // Alice's prompt is kept in her cache; her next request finds it.
    ask_as("sk-alice", "prefix");
    let alice = ask_as("sk-alice", "auto");
    let cached = |accel: &str| -> usize {
        // "... (auto, predicted 0.41× plain's cost; 35 of 36 prompt tokens cached)"
        accel
            .split("; ")
            .find(|part| part.contains(" prompt tokens cached"))
            .and_then(|p| p.split(" of ").next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no cache figure in {accel:?}"))
    };
    assert!(cached(&alice) > 0, "{alice}");
    // Bob sends the same prompt and learns nothing of Alice's: his cache is empty.
    let bob = ask_as("sk-bob", "auto");
    assert_eq!(cached(&bob), 0, "{bob}");
}

/// The text of a chat completion `body` through a gateway on the swarm, asked again for up to
/// a minute: the first requests may find no route while the DHT fills.
fn answered(gateway: &Gateway, body: &Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, got) = gateway.post("/v1/chat/completions", body);
        if status == 200 {
            return got["choices"][0]["message"]["content"].clone();
        }
        assert!(Instant::now() < deadline, "{status}: {got}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn the_key_rotates_on_the_swarm_and_a_node_that_refuses_its_shard_keeps_the_old_key() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, key, enc) = plain_and_encrypted(dir.path());
    // The gateway's lasting identity, which node a takes shards from and node c does not.
    let state = dir.path().join("gateway.redb");
    let holder = veil_net::NodeState::open(&state)
        .unwrap()
        .identity()
        .unwrap()
        .public()
        .to_peer_id()
        .to_string();
    let a = NodeProcess::start_with(
        &enc,
        &dir.path().join("a.redb"),
        None,
        &["--accept-shards-from", &holder],
    );
    let b = NodeProcess::start_with(
        &enc,
        &dir.path().join("b.redb"),
        Some(&a.addr),
        &["--accept-shards-from", &holder],
    );
    let c = NodeProcess::start_with(&enc, &dir.path().join("c.redb"), Some(&a.addr), &[]);
    let gateway_args = [
        "--bootstrap",
        &a.addr,
        "--model",
        plain.to_str().unwrap(),
        "--encrypted",
        enc.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        "--rotate-after-tokens",
        "20",
    ];
    let gateway = Gateway::start_with(&gateway_args);
    let question = |max_tokens: u32| {
        ask(
            "What is the capital of France?",
            json!({ "max_tokens": max_tokens }),
        )
    };
    let answer = |max_tokens: u32| answered(&gateway, &question(max_tokens));
    let wait_for = |name: &str, value: f64| gateway.wait_for_metric(name, value);

    // Node c refuses its shard: the rotation fails half-way, a drops what it staged (if it got
    // that far), and the old key answers on.
    let first = answer(8);
    wait_for("veil_key_rotation_failures_total", 1.0);
    assert_eq!(gateway.metric("veil_key_rotations_total"), 0.0);
    assert_eq!(answer(8), first);
    c.wait_for_log("refused");
    drop(c);
    // The next rotation is tried once the wait after a failure is over.
    std::thread::sleep(veil_serve::key_rotation::RETRY_AFTER_FAILURE);

    // With only willing nodes left, the next rotation goes through. A long request started
    // before it (and likely still running as the key is swapped) finishes under the old key.
    let long = std::thread::scope(|scope| {
        let running = scope.spawn(|| answer(96));
        std::thread::sleep(Duration::from_millis(200));
        let short = answer(8);
        assert_eq!(short, first);
        wait_for("veil_key_rotations_total", 1.0);
        running.join().unwrap()
    });
    a.wait_for_log("now serving model");
    b.wait_for_log("now serving model");
    // Under the new key, on the handed shards, the answers are the same (EE is exact).
    assert_eq!(answer(8), first);
    assert_eq!(answer(96), long);
    wait_for("veil_key_rotations_total", 2.0);
    assert_eq!(answer(8), first);
    // A committee of the two nodes generates and judges under the current key.
    let mut verified = question(8);
    verified["veil"] = json!({ "verify": 2 });
    let (status, got) = gateway.post("/v1/chat/completions", &verified);
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["choices"][0]["message"]["content"], first);

    // The gateway stops (killed, after the rotation the committee's tokens set off) and starts
    // again on the same database. The nodes no longer hold the shards of the key it was
    // started with, only those of the last two; it resumes the key it kept, answers the same,
    // and goes on rotating.
    wait_for("veil_key_rotations_total", 3.0);
    assert!(dir.path().join("gateway.redb.rotated-key.veil").exists());
    drop(gateway);
    let gateway = Gateway::start_with(&gateway_args);
    let answer = |max_tokens: u32| answered(&gateway, &question(max_tokens));
    assert_eq!(answer(8), first);
    gateway.wait_for_metric("veil_key_rotations_total", 1.0);
    assert_eq!(answer(8), first);

    // Node b restarts: it clears the shards handed to its last run, serves the file it was
    // started with again (the first key's model), and the next rotation hands it the new key's
    // shard with node a's.
    drop(b);
    let b = NodeProcess::start_with(
        &enc,
        &dir.path().join("b.redb"),
        Some(&a.addr),
        &["--accept-shards-from", &holder],
    );
    b.wait_for_log("left in");
    assert_eq!(answer(8), first);
    b.wait_for_log("now serving model");
    gateway.wait_for_metric("veil_key_rotations_total", 2.0);
    assert_eq!(answer(8), first);
}
