//! A node facing bad peers: every malformed request gets an error or a timeout, and the node
//! keeps serving everyone else.

use std::io;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{noise, tcp, yamux, Multiaddr, StreamProtocol, SwarmBuilder};
use tokio::sync::mpsc;
use veil_model::SamplingParams;
use veil_model::{ModelStore, Shard, WeightFormat, SMOLLM2_135M};
use veil_net::protocol::{infer, prove, verify};
use veil_net::wire::{SessionId, StepInput, WireDType, WireTensor};
use veil_net::{peer_of, NetError, NodeConfig, SessionLimits, SwarmClient};
use veil_verify::{CommitmentMode, Keypair, SamplingSpec, Signed, Verdict};

fn model_path() -> std::path::PathBuf {
    ModelStore::from_env()
        .ensure(&SMOLLM2_135M, &mut |_| {})
        .expect("the default model can be fetched")
}

/// Starts a node serving blocks 10-20 of the default model on `listen`; returns its address.
async fn start_node(dir: &std::path::Path, listen: &str) -> Multiaddr {
    serve(dir, listen, middle_shard(dir)).await
}

/// Writes blocks 10-20 of the default model under `dir`; returns the shard file.
fn middle_shard(dir: &std::path::Path) -> std::path::PathBuf {
    let shards = dir.join("shards");
    let manifests = veil_model::write_shard_files(
        &model_path(),
        &[Shard::span(10..20, 30).unwrap()],
        &shards,
        &mut |_, _| {},
    )
    .unwrap();
    shards.join(&manifests[0].file)
}

/// Starts a node serving `shard` on `listen`; returns its address.
async fn serve(dir: &std::path::Path, listen: &str, shard: std::path::PathBuf) -> Multiaddr {
    let limits = SessionLimits {
        max_sessions: 2,
        ..SessionLimits::default()
    };
    serve_with(dir, listen, shard, limits).await
}

/// [`serve`] with other session limits.
async fn serve_with(
    dir: &std::path::Path,
    listen: &str,
    shard: std::path::PathBuf,
    limits: SessionLimits,
) -> Multiaddr {
    serve_limited(dir, listen, shard, limits, None).await
}

/// [`serve_with`], taking no connections past `max_memory_bytes` of its process's memory.
async fn serve_limited(
    dir: &std::path::Path,
    listen: &str,
    shard: std::path::PathBuf,
    limits: SessionLimits,
    max_memory_bytes: Option<usize>,
) -> Multiaddr {
    let pending = futures::future::pending();
    serve_config(
        dir,
        listen,
        shard,
        limits,
        max_memory_bytes,
        |_| {},
        pending,
    )
    .await
    .0
}

/// [`serve_limited`] with the rest of the configuration changed by `more` (no listen address
/// given: the node listens only where `more` says, through a relay say), running until
/// `shutdown`; returns its address and its task.
async fn serve_config(
    dir: &std::path::Path,
    listen: &str,
    shard: std::path::PathBuf,
    limits: SessionLimits,
    max_memory_bytes: Option<usize>,
    more: impl FnOnce(&mut NodeConfig),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> (Multiaddr, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut config = NodeConfig {
        shard,
        format: WeightFormat::AsStored,
        listen: (!listen.is_empty())
            .then(|| listen.parse().unwrap())
            .into_iter()
            .collect(),
        bootstrap: Vec::new(),
        state: dir.join("node.redb"),
        limits,
        request_timeout: Duration::from_secs(5),
        judge_tokens_per_minute: 8192,
        max_memory_bytes,
        on_listen: Some(tx),
        misbehave: None,
        history: None,
        tee: None,
        zk: None,
        relay_server: None,
        relays: Vec::new(),
        find_relays: 0,
        probes: Default::default(),
        handoff: Default::default(),
    };
    more(&mut config);
    let task = tokio::spawn(async move {
        veil_net::run_node(config, shutdown)
            .await
            .expect("node runs")
    });
    (rx.recv().await.expect("the node listens"), task)
}

fn hidden(shape: Vec<usize>) -> StepInput {
    let n: usize = shape.iter().product();
    StepInput::Hidden(WireTensor {
        dtype: WireDType::F32,
        shape,
        data: vec![0; n * 4],
    })
}

/// A codec that sends raw bytes under Veil's protocol name: garbage, or a request that starts
/// and then stalls forever.
#[derive(Clone, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let mut v = Vec::new();
        io.read_to_end(&mut v).await?;
        Ok(v)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let mut v = Vec::new();
        io.take(1 << 20).read_to_end(&mut v).await?;
        Ok(v)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        io.write_all(&req).await?;
        if req.starts_with(b"STALL") {
            io.flush().await?;
            futures::future::pending::<()>().await;
        }
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        io.write_all(&res).await?;
        io.close().await
    }
}

/// Sends `bytes` raw to the node under `protocol` and returns how the exchange ended.
async fn send_raw(
    node: &Multiaddr,
    protocol: &'static str,
    bytes: Vec<u8>,
    wait: Duration,
) -> String {
    let mut swarm = SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                RawCodec,
                [(StreamProtocol::new(protocol), ProtocolSupport::Outbound)],
                request_response::Config::default().with_request_timeout(wait),
            )
        })
        .unwrap()
        .build();
    let peer = peer_of(node).unwrap();
    swarm.dial(node.clone()).unwrap();
    swarm.behaviour_mut().send_request(&peer, bytes);
    loop {
        match swarm.select_next_some().await {
            SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Response { response, .. },
                ..
            }) => return format!("answered {} bytes", response.len()),
            SwarmEvent::Behaviour(request_response::Event::OutboundFailure { error, .. }) => {
                return format!("failed: {error}")
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_bad_requests_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), "/ip4/127.0.0.1/tcp/0").await;
    let peer = peer_of(&node).unwrap();
    let client = SwarmClient::connect(
        std::slice::from_ref(&node),
        Duration::from_secs(10),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let ask = |body| client.infer(peer, body);

    let infer::Response::Info(info) = ask(infer::Request::Info { model: None }).await.unwrap()
    else {
        panic!("no info")
    };
    assert_eq!((info.first_block, info.end_block), (10, 20));
    let infer::Response::Opened { session } =
        ask(infer::Request::Open { model: None }).await.unwrap()
    else {
        panic!("no session")
    };

    let step = |session, input| infer::Request::Step { session, input };
    refused_with(
        ask(step(SessionId([0xde; 16]), hidden(vec![1, 576]))).await,
        "unknown session",
    );
    refused_with(ask(step(session, hidden(vec![1, 100]))).await, "shape");
    refused_with(ask(step(session, hidden(vec![576]))).await, "shape");
    refused_with(
        ask(step(session, hidden(vec![0, 576]))).await,
        "at least one position",
    );
    refused_with(
        ask(step(session, StepInput::Tokens(vec![1, 2]))).await,
        "hidden states, not token ids",
    );
    let f16 = StepInput::Hidden(WireTensor {
        dtype: WireDType::F16,
        shape: vec![1, 576],
        data: vec![0; 2 * 576],
    });
    refused_with(ask(step(session, f16)).await, "f16");
    let short = StepInput::Hidden(WireTensor {
        dtype: WireDType::F32,
        shape: vec![2, 576],
        data: vec![0; 4 * 576],
    });
    refused_with(ask(step(session, short)).await, "needs");
    let mut nan = vec![0u8; 4 * 576];
    nan[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let nan = StepInput::Hidden(WireTensor {
        dtype: WireDType::F32,
        shape: vec![1, 576],
        data: nan,
    });
    refused_with(ask(step(session, nan)).await, "NaN");
    // Two sessions at most: the third is refused, not queued without bound.
    ask(infer::Request::Open { model: None }).await.unwrap();
    refused_with(
        ask(infer::Request::Open { model: None }).await,
        "session slots",
    );

    // Oversized: 40 MiB of hidden states is cut off at the node's 32 MiB limit.
    let big = ask(step(session, hidden(vec![18_000, 576]))).await;
    assert!(matches!(big, Err(NetError::PeerFailed { .. })), "{big:?}");

    // Each protocol bounds its own messages: a challenge is small, so 200 KB of leaf
    // indices is cut off at 64 KiB, where the same bytes would fit a step.
    let huge_challenge = prove::Request::OpenWeights {
        leaves: vec![0; 200_000],
        model: None,
    };
    let cut = client.prove(peer, huge_challenge).await;
    assert!(matches!(cut, Err(NetError::PeerFailed { .. })), "{cut:?}");
    let too_many = prove::Request::OpenWeights {
        leaves: vec![0; 129],
        model: None,
    };
    refused_with(client.prove(peer, too_many).await, "ask for 1 to 128");

    // Garbage bytes and a request that stalls half-way: errors, not answers, on every protocol.
    for protocol in [infer::PROTOCOL, verify::PROTOCOL, prove::PROTOCOL] {
        let garbage = send_raw(
            &node,
            protocol.name,
            vec![0xff, 0x00, 0x13, 0x37, 0x42],
            Duration::from_secs(5),
        )
        .await;
        // The node closes the stream without a word (the raw reader sees an empty answer).
        assert!(
            garbage.starts_with("failed") || garbage == "answered 0 bytes",
            "{}: {garbage}",
            protocol.name
        );
    }
    let stall = tokio::spawn({
        let node = node.clone();
        let stall = b"STALL\xa1\x67".to_vec();
        async move { send_raw(&node, infer::PROTOCOL.name, stall, Duration::from_secs(4)).await }
    });

    // Meanwhile, and after all of it, the node serves real work.
    let ok = ask(step(session, hidden(vec![3, 576]))).await.unwrap();
    let infer::Response::Output(out) = ok else {
        panic!("no output: {ok:?}")
    };
    assert_eq!(out.shape, vec![3, 576]);
    let stalled = stall.await.unwrap();
    assert!(
        stalled.starts_with("failed") || stalled == "answered 0 bytes",
        "{stalled}"
    );
    assert!(matches!(
        ask(infer::Request::Info { model: None }).await,
        Ok(infer::Response::Info(_))
    ));
    assert!(matches!(
        ask(infer::Request::Close { session }).await,
        Ok(infer::Response::Closed)
    ));
    refused_with(
        ask(infer::Request::Close { session }).await,
        "unknown session",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_over_quic() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), "/ip4/127.0.0.1/udp/0/quic-v1").await;
    assert!(node.to_string().contains("/quic-v1/"), "{node}");
    let peer = peer_of(&node).unwrap();
    let client = SwarmClient::connect(
        std::slice::from_ref(&node),
        Duration::from_secs(10),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let infer::Response::Opened { session } = client
        .infer(peer, infer::Request::Open { model: None })
        .await
        .unwrap()
    else {
        panic!("no session")
    };
    let input = hidden(vec![2, 576]);
    let answer = client
        .infer(peer, infer::Request::Step { session, input })
        .await
        .unwrap();
    assert!(matches!(answer, infer::Response::Output(t) if t.shape == vec![2, 576]));
}

/// A verified session with exact commitments on `node`: the prompt `[1, 9690, 28]`, one
/// greedy token, and the node's signed answer.
async fn exact_answer(
    client: &SwarmClient,
    node: libp2p::PeerId,
    request_id: String,
) -> Box<Signed<veil_verify::Job>> {
    let verify::Response::Opened { session } = client
        .verify(
            node,
            verify::Request::OpenVerified {
                request_id,
                sampling: SamplingSpec::from(&SamplingParams::greedy()),
                commitment: CommitmentMode::Exact,
                model: None,
            },
        )
        .await
        .unwrap()
    else {
        panic!("no exact session")
    };
    let step = |tokens: Vec<u32>| infer::Request::Step {
        session,
        input: StepInput::Tokens(tokens),
    };
    let infer::Response::Output(logits) =
        client.infer(node, step(vec![1, 9690, 28])).await.unwrap()
    else {
        panic!("no logits")
    };
    let first = veil_model::sampling::argmax(
        &logits
            .to_tensor()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap(),
    );
    client.infer(node, step(vec![first])).await.unwrap();
    let verify::Response::Finished(job) = client
        .verify(node, verify::Request::Finish { session })
        .await
        .unwrap()
    else {
        panic!("no signed exact answer")
    };
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_requests_are_checked_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let part = start_node(dir.path(), "/ip4/127.0.0.1/tcp/0").await;
    let whole_dir = dir.path().join("whole");
    let whole = serve(&whole_dir, "/ip4/127.0.0.1/tcp/0", model_path()).await;
    let client = SwarmClient::connect(
        &[part.clone(), whole.clone()],
        Duration::from_secs(30),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let (part, node) = (peer_of(&part).unwrap(), peer_of(&whole).unwrap());
    let id = "ab".repeat(32);
    let open = |request_id: String| verify::Request::OpenVerified {
        request_id,
        sampling: SamplingSpec::from(&SamplingParams::greedy()),
        commitment: CommitmentMode::Tolerant,
        model: None,
    };
    refused_with(client.verify(part, open(id.clone())).await, "whole model");
    refused_with(
        client.verify(node, open("xyz".into())).await,
        "64 hex digits",
    );

    // A verified session samples what the client will, and signs the answer.
    let verify::Response::Opened { session } = client.verify(node, open(id.clone())).await.unwrap()
    else {
        panic!("no session")
    };
    let step = |tokens: Vec<u32>| infer::Request::Step {
        session,
        input: StepInput::Tokens(tokens),
    };
    let infer::Response::Output(logits) =
        client.infer(node, step(vec![1, 9690, 28])).await.unwrap()
    else {
        panic!("no logits")
    };
    let sampled = veil_model::sampling::argmax(
        &logits
            .to_tensor()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap(),
    );
    refused_with(client.infer(node, step(vec![sampled + 1])).await, "sampled");
    client.infer(node, step(vec![sampled])).await.unwrap();
    let verify::Response::Finished(job) = client
        .verify(node, verify::Request::Finish { session })
        .await
        .unwrap()
    else {
        panic!("no signed answer")
    };
    assert_eq!(job.verify().unwrap(), node);
    assert_eq!(job.body.claim.prompt, vec![1, 9690, 28]);
    assert_eq!(job.body.claim.output[0], sampled);
    assert_eq!(job.body.claim.output.len(), 2);

    // Judged: a sealed verdict, then its opening.
    let verify::Response::Committed(commit) = client
        .verify(node, verify::Request::Judge { job: job.clone() })
        .await
        .unwrap()
    else {
        panic!("no commit")
    };
    let verify::Response::Revealed(reveal) = client
        .verify(
            node,
            verify::Request::Reveal {
                job: commit.body.job.clone(),
            },
        )
        .await
        .unwrap()
    else {
        panic!("no reveal")
    };
    assert_eq!(reveal.body.commit(&node).unwrap(), commit.body);
    assert_eq!(reveal.body.verdict, Verdict::Pass);

    // The node runs Q4_1 on Veil's kernels, so it offers exact commitments: a digest per chunk.
    let Ok(infer::Response::Info(info)) = client
        .infer(node, infer::Request::Info { model: None })
        .await
    else {
        panic!("no info")
    };
    assert!(info.exact);
    let exact_job = exact_answer(&client, node, "cd".repeat(32)).await;
    assert_eq!(
        exact_job.body.claim.commitment.mode(),
        CommitmentMode::Exact
    );
    let judged = |job: Box<Signed<veil_verify::Job>>| {
        let client = &client;
        async move {
            let verify::Response::Committed(commit) = client
                .verify(node, verify::Request::Judge { job })
                .await
                .unwrap()
            else {
                panic!("no commit")
            };
            let verify::Response::Revealed(reveal) = client
                .verify(
                    node,
                    verify::Request::Reveal {
                        job: commit.body.job,
                    },
                )
                .await
                .unwrap()
            else {
                panic!("no reveal")
            };
            reveal.body.verdict
        }
    };
    assert_eq!(judged(exact_job.clone()).await, Verdict::Pass);
    // A rogue generator signs the same answer with one digest bit flipped: failed, not refused.
    let rogue = Keypair::generate_ed25519();
    let mut lie = exact_job.body.clone();
    lie.generator = rogue.public().to_peer_id().to_string();
    lie.request_id = "ef".repeat(32);
    lie.claim.commitment.exact.as_mut().unwrap().digests[0][5] ^= 0x10;
    let verdict = judged(Box::new(Signed::sign(lie, &rogue).unwrap())).await;
    assert!(
        matches!(&verdict, Verdict::Fail { reason, .. } if reason.contains("exact mode")),
        "{verdict:?}"
    );

    // A changed answer breaks the generator's signature; a forged key, a malformed commitment
    // or another model's job is refused with a reason.
    let mut forged = job.clone();
    forged.body.claim.output[0] ^= 1;
    refused_with(
        client
            .verify(node, verify::Request::Judge { job: forged })
            .await,
        "signature",
    );
    let stranger = Keypair::generate_ed25519();
    let mut body = job.body.clone();
    body.generator = stranger.public().to_peer_id().to_string();
    body.claim.commitment.chunks[0].indices.reverse();
    let malformed = Signed::sign(body.clone(), &stranger).unwrap();
    refused_with(
        client
            .verify(
                node,
                verify::Request::Judge {
                    job: Box::new(malformed),
                },
            )
            .await,
        "malformed commitment",
    );
    body.model_digest = "0".repeat(64);
    let elsewhere = Signed::sign(body, &stranger).unwrap();
    refused_with(
        client
            .verify(
                node,
                verify::Request::Judge {
                    job: Box::new(elsewhere),
                },
            )
            .await,
        "this node runs model",
    );
    refused_with(
        client
            .verify(
                node,
                verify::Request::Reveal {
                    job: "f".repeat(64),
                },
            )
            .await,
        "no sealed verdict",
    );
    refused_with(
        client.verify(part, verify::Request::Judge { job }).await,
        "whole model",
    );
}

/// A peer with its own identity, connected to `node`.
async fn stranger(node: &Multiaddr) -> SwarmClient {
    SwarmClient::connect(
        std::slice::from_ref(node),
        Duration::from_secs(60),
        Duration::from_secs(10),
    )
    .await
    .unwrap()
}

/// Checks the node refused the request, saying `want`.
fn refused_with<T: std::fmt::Debug>(r: Result<T, NetError>, want: &str) {
    match r {
        Err(NetError::Refused { message, .. }) => {
            assert!(message.contains(want), "{message:?} lacks {want:?}")
        }
        other => panic!("expected a refusal mentioning {want:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_serves_only_the_peer_that_opened_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), "/ip4/127.0.0.1/tcp/0").await;
    let peer = peer_of(&node).unwrap();
    let (victim, thief) = (stranger(&node).await, stranger(&node).await);
    let infer::Response::Opened { session } = victim
        .infer(peer, infer::Request::Open { model: None })
        .await
        .unwrap()
    else {
        panic!("no session")
    };
    // The thief knows the id (say it was leaked) and tries every request that names it.
    let step = |input| infer::Request::Step { session, input };
    refused_with(
        thief.infer(peer, step(hidden(vec![1, 576]))).await,
        "unknown session",
    );
    refused_with(
        thief
            .verify(peer, verify::Request::Finish { session })
            .await,
        "unknown session",
    );
    refused_with(
        thief.infer(peer, infer::Request::Close { session }).await,
        "unknown session",
    );
    // The thief's own session is a fresh random id, not the next in a sequence.
    let infer::Response::Opened { session: other } = thief
        .infer(peer, infer::Request::Open { model: None })
        .await
        .unwrap()
    else {
        panic!("no session")
    };
    let as_number = |s: SessionId| u128::from_le_bytes(s.0);
    assert!(as_number(other).abs_diff(as_number(session)) > 1 << 64);
    // The victim's session is untouched.
    let infer::Response::Output(out) = victim
        .infer(peer, step(hidden(vec![2, 576])))
        .await
        .unwrap()
    else {
        panic!("no output")
    };
    assert_eq!(out.shape, vec![2, 576]);
    assert!(matches!(
        victim.infer(peer, infer::Request::Close { session }).await,
        Ok(infer::Response::Closed)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_cannot_take_every_session_slot_or_position() {
    let dir = tempfile::tempdir().unwrap();
    let shard = middle_shard(dir.path());
    let limits = SessionLimits {
        max_sessions: 4,
        max_sessions_per_peer: 2,
        max_tokens_per_peer: 6,
        ..SessionLimits::default()
    };
    let node = serve_with(dir.path(), "/ip4/127.0.0.1/tcp/0", shard.clone(), limits).await;
    let peer = peer_of(&node).unwrap();
    let (hog, other) = (stranger(&node).await, stranger(&node).await);
    let mut held = Vec::new();
    for _ in 0..2 {
        let infer::Response::Opened { session } = hog
            .infer(peer, infer::Request::Open { model: None })
            .await
            .unwrap()
        else {
            panic!("no session")
        };
        held.push(session);
    }
    refused_with(
        hog.infer(peer, infer::Request::Open { model: None }).await,
        "the most one peer may",
    );
    // Positions: 4 in one session and 3 in the other pass the per-peer 6.
    let step = |session, n| infer::Request::Step {
        session,
        input: hidden(vec![n, 576]),
    };
    hog.infer(peer, step(held[0], 4)).await.unwrap();
    refused_with(hog.infer(peer, step(held[1], 3)).await, "per peer");
    // Everyone else is still served.
    let infer::Response::Opened { session } = other
        .infer(peer, infer::Request::Open { model: None })
        .await
        .unwrap()
    else {
        panic!("the other peer found no free slot")
    };
    other.infer(peer, step(session, 3)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdicts_go_only_to_the_asker_and_oversized_jobs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = serve(dir.path(), "/ip4/127.0.0.1/tcp/0", model_path()).await;
    let peer = peer_of(&node).unwrap();
    let (client, lazy_judge) = (stranger(&node).await, stranger(&node).await);
    let job = exact_answer(&client, peer, "ef".repeat(32)).await;
    let first = job.body.claim.output[0];
    let verify::Response::Committed(commit) = client
        .verify(peer, verify::Request::Judge { job: job.clone() })
        .await
        .unwrap()
    else {
        panic!("no sealed verdict")
    };
    // A lazy judge asks for the verdict to copy it: it is not there for it.
    let reveal = |job: String| verify::Request::Reveal { job };
    refused_with(
        lazy_judge
            .verify(peer, reveal(commit.body.job.clone()))
            .await,
        "no sealed verdict",
    );
    let verify::Response::Revealed(opened) = client
        .verify(peer, reveal(commit.body.job.clone()))
        .await
        .unwrap()
    else {
        panic!("the asker gets no reveal")
    };
    assert_eq!(opened.body.verdict, Verdict::Pass);

    // A job longer than a session may be is refused before any work (it would hold
    // gigabytes of logits).
    let mut long = job.clone();
    long.body.claim.output = vec![first; 9000];
    refused_with(
        client
            .verify(peer, verify::Request::Judge { job: long })
            .await,
        "judges at most",
    );

    // The attack: a stranger signs junk of one prompt token and 8,191 answer tokens
    // and asks for it to be judged, again and again. The first is judged, stopping where it
    // goes wrong; the next is past the stranger's budget of positions judged a minute. The
    // honest client's budget is its own.
    let rogue_key = Keypair::generate_ed25519();
    let junk = |seed: u32| {
        let mut body = job.body.clone();
        body.generator = rogue_key.public().to_peer_id().to_string();
        body.claim.prompt = vec![1];
        body.claim.output = (0..8191).map(|i| (i * 7 + seed) % 49_152).collect();
        let mut builder = veil_verify::CommitmentBuilder::new(576, CommitmentMode::Exact).unwrap();
        for _ in 0..8191 {
            builder.push(&[0.0; 576]).unwrap();
        }
        body.claim.commitment = builder.finish();
        Box::new(Signed::sign(body, &rogue_key).unwrap())
    };
    let verify::Response::Committed(_) = lazy_judge
        .verify(peer, verify::Request::Judge { job: junk(1) })
        .await
        .unwrap()
    else {
        panic!("the first junk job is not judged")
    };
    refused_with(
        lazy_judge
            .verify(peer, verify::Request::Judge { job: junk(2) })
            .await,
        "judging budget",
    );
    assert!(matches!(
        client.verify(peer, verify::Request::Judge { job }).await,
        Ok(verify::Response::Committed(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_cannot_hold_more_than_its_share_of_connections() {
    use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), "/ip4/127.0.0.1/tcp/0").await;
    let peer = peer_of(&node).unwrap();
    // A rogue dials the node twelve times under one identity and keeps every connection.
    let mut rogue = SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| libp2p::swarm::dummy::Behaviour)
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    for _ in 0..12 {
        let opts = DialOpts::peer_id(peer)
            .addresses(vec![node.clone()])
            .condition(PeerCondition::Always)
            .build();
        rogue.dial(opts).unwrap();
    }
    let (mut opened, mut closed) = (0, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout_at(deadline, rogue.select_next_some()).await {
            Ok(SwarmEvent::ConnectionEstablished { .. }) => opened += 1,
            Ok(SwarmEvent::ConnectionClosed { .. }) => closed += 1,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let alive = rogue.network_info().connection_counters().num_established();
    assert!(opened >= 1, "the node took no connection at all");
    assert!(
        alive <= veil_net::behaviour::MAX_CONNECTIONS_PER_PEER,
        "{alive} connections alive ({opened} opened, {closed} closed)"
    );
    // Others are still served.
    let client = stranger(&node).await;
    assert!(matches!(
        client
            .infer(peer, infer::Request::Info { model: None })
            .await,
        Ok(infer::Response::Info(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_cannot_hold_a_relays_circuits() {
    use libp2p::multiaddr::Protocol;
    use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
    let dir = tempfile::tempdir().unwrap();
    let model = model_path();
    let shards = dir.path().join("shards");
    let manifests = veil_model::write_shard_files(
        &model,
        &[
            Shard::span(0..10, 30).unwrap(),
            Shard::span(10..20, 30).unwrap(),
            Shard::span(20..30, 30).unwrap(),
        ],
        &shards,
        &mut |_, _| {},
    )
    .unwrap();
    let shard = |i: usize| shards.join(&manifests[i].file);
    // A relay with room for 6 circuits, 2 per peer, and two nodes reachable only through it.
    let limits = veil_net::behaviour::RelayLimits {
        max_circuits: 6,
        max_circuits_per_peer: 2,
        ..Default::default()
    };
    let relay_dir = dir.path().join("relay");
    let relay = serve_config(
        &relay_dir,
        "/ip4/127.0.0.1/tcp/0",
        shard(0),
        SessionLimits::default(),
        None,
        |c| {
            c.relay_server = Some(limits);
        },
        futures::future::pending(),
    )
    .await
    .0;
    let mut hidden = Vec::new();
    for i in 1..3 {
        let node_dir = dir.path().join(format!("hidden{i}"));
        let addr = serve_config(
            &node_dir,
            "",
            shard(i),
            SessionLimits::default(),
            None,
            |c| {
                c.bootstrap = vec![relay.clone()];
                c.relays = vec![relay.clone()];
            },
            futures::future::pending(),
        )
        .await
        .0;
        assert!(addr.iter().any(|p| p == Protocol::P2pCircuit), "{addr}");
        hidden.push(addr);
    }

    // A rogue opens circuits to both hidden nodes, six times each, and keeps every connection.
    let mut rogue = veil_net::behaviour::build_swarm(
        libp2p::identity::Keypair::generate_ed25519(),
        Duration::from_secs(10),
        None,
    )
    .unwrap();
    rogue.dial(relay.clone()).unwrap();
    for addr in hidden.iter().cycle().take(12) {
        let opts = DialOpts::peer_id(peer_of(addr).unwrap())
            .addresses(vec![addr.clone()])
            .condition(PeerCondition::Always)
            .build();
        rogue.dial(opts).unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::timeout_at(deadline, rogue.select_next_some())
        .await
        .is_ok()
    {}
    let held = rogue.network_info().connection_counters().num_established() - 1;
    assert!(held >= 1, "the rogue got no circuit at all");
    // Twelve asked for: the relay's 2 circuits per peer (libp2p lets a third in before it
    // refuses) and each hidden node's 2 connections per peer bound what the rogue holds.
    assert!(held <= 3, "the rogue holds {held} relayed connections");

    // An honest client still reaches both hidden nodes through the relay.
    let digest = veil_model::store::file_digest(&model).unwrap().1;
    let client = stranger(&relay).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let found = client.discover(&digest).await.unwrap();
        let reached = hidden
            .iter()
            .filter(|h| found.iter().any(|c| Some(c.peer) == peer_of(h)))
            .count();
        if reached == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the honest client reached {reached} of 2 hidden nodes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_naming_addresses_nobody_can_reach_does_not_get_them_kept() {
    let dir = tempfile::tempdir().unwrap();
    let shard = middle_shard(dir.path());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (node, task) = serve_config(
        dir.path(),
        "/ip4/127.0.0.1/tcp/0",
        shard.clone(),
        SessionLimits::default(),
        None,
        |_| {},
        async move {
            let _ = stopped.await;
        },
    )
    .await;
    // Two rogues that speak the DHT: one names a home network's address as its own, the other
    // a public one (the database keeps one address a peer).
    let (private, public): (Multiaddr, Multiaddr) = (
        "/ip4/192.168.7.7/tcp/4001".parse().unwrap(),
        "/ip4/203.0.113.9/tcp/4001".parse().unwrap(),
    );
    for named in [&private, &public] {
        let mut rogue = veil_net::behaviour::build_swarm(
            libp2p::identity::Keypair::generate_ed25519(),
            Duration::from_secs(10),
            None,
        )
        .unwrap();
        rogue.add_external_address(named.clone());
        rogue.dial(node.clone()).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::timeout_at(deadline, rogue.select_next_some())
            .await
            .is_ok()
        {}
    }
    stop.send(()).unwrap();
    task.await.unwrap();
    // The node's database (the peers it dials at every start) holds the public one only.
    let kept: Vec<Multiaddr> = veil_net::NodeState::open(&dir.path().join("node.redb"))
        .unwrap()
        .peers()
        .unwrap()
        .into_iter()
        .map(|(_, addr)| addr)
        .collect();
    let holds = |a: &Multiaddr| {
        kept.iter()
            .any(|k| k.to_string().starts_with(&a.to_string()))
    };
    assert!(holds(&public), "{kept:?}");
    assert!(!holds(&private), "{kept:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_cannot_hold_more_than_its_share_of_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), "/ip4/127.0.0.1/tcp/0").await;
    let peer = peer_of(&node).unwrap();
    // A rogue opens more requests than the budget on one connection, each sending a few
    // bytes and then nothing (the node's request timeout is 5 s), then asks for the node's
    // info on the same connection.
    let mut rogue = SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                RawCodec,
                [(
                    StreamProtocol::new(infer::PROTOCOL.name),
                    ProtocolSupport::Outbound,
                )],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(30))
                    .with_max_concurrent_streams(1000),
            )
        })
        .unwrap()
        .build();
    rogue.dial(node.clone()).unwrap();
    for _ in 0..infer::PROTOCOL.max_streams + 8 {
        rogue
            .behaviour_mut()
            .send_request(&peer, b"STALL\xa2\x67".to_vec());
    }
    let info = cbor4ii::serde::to_vec(Vec::new(), &infer::Request::Info { model: None }).unwrap();
    let mut asked = None;
    let started = tokio::time::Instant::now();
    let answer = loop {
        let wait = tokio::time::sleep_until(started + Duration::from_millis(1500));
        tokio::select! {
            event = rogue.select_next_some() => match event {
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Response { request_id, response },
                    ..
                }) if Some(request_id) == asked => break format!("answered {} bytes", response.len()),
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure { request_id, error, .. })
                    if Some(request_id) == asked => break format!("failed: {error}"),
                _ => {}
            },
            // Once the stalled requests are in, the info request comes last.
            _ = wait, if asked.is_none() => {
                asked = Some(rogue.behaviour_mut().send_request(&peer, info.clone()));
            }
        }
    };
    // The node had no room left for it on that connection: the stream was dropped unread.
    assert!(
        answer.starts_with("failed") || answer == "answered 0 bytes",
        "the rogue's request past its budget was served: {answer}"
    );
    // Others are served meanwhile.
    let client = stranger(&node).await;
    assert!(matches!(
        client
            .infer(peer, infer::Request::Info { model: None })
            .await,
        Ok(infer::Response::Info(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_short_of_memory_takes_no_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let shard = middle_shard(dir.path());
    // A limit far below what the loaded shard already takes: every new connection is refused.
    let node = serve_limited(
        dir.path(),
        "/ip4/127.0.0.1/tcp/0",
        shard.clone(),
        SessionLimits::default(),
        Some(1 << 20),
    )
    .await;
    let peer = peer_of(&node).unwrap();
    let answered = match SwarmClient::connect(
        std::slice::from_ref(&node),
        Duration::from_secs(5),
        Duration::from_secs(5),
    )
    .await
    {
        Ok(client) => client
            .infer(peer, infer::Request::Info { model: None })
            .await
            .is_ok(),
        Err(_) => false,
    };
    assert!(
        !answered,
        "a node over its memory limit still took a connection"
    );
}

/// What a gossip peer heard: each record with its author.
type Heard = mpsc::UnboundedReceiver<(Option<libp2p::PeerId>, Vec<u8>)>;

/// A gossip peer on `node`'s run-record topic: publishes what it is handed (retrying until
/// the topic has a peer) and hands back every record it hears, with its author.
fn gossip_peer(node: &Multiaddr) -> (libp2p::PeerId, mpsc::UnboundedSender<Vec<u8>>, Heard) {
    use libp2p::gossipsub;
    use veil_net::behaviour::VeilBehaviourEvent;
    let mut swarm = veil_net::behaviour::build_swarm(
        libp2p::identity::Keypair::generate_ed25519(),
        Duration::from_secs(10),
        None,
    )
    .unwrap();
    let me = *swarm.local_peer_id();
    let topic = gossipsub::IdentTopic::new(veil_net::history::RUNS_TOPIC);
    swarm.behaviour_mut().gossipsub.subscribe(&topic).unwrap();
    swarm.dial(node.clone()).unwrap();
    let (publish, mut to_publish) = mpsc::unbounded_channel::<Vec<u8>>();
    let (heard_tx, heard) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut queue = std::collections::VecDeque::new();
        let mut retry = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                Some(data) = to_publish.recv() => queue.push_back(data),
                _ = retry.tick() => {
                    while let Some(data) = queue.front() {
                        match swarm.behaviour_mut().gossipsub.publish(topic.clone(), data.clone()) {
                            Ok(_) => { queue.pop_front(); }
                            Err(_) => break,
                        }
                    }
                }
                event = swarm.select_next_some() => {
                    if let SwarmEvent::Behaviour(VeilBehaviourEvent::Gossipsub(gossipsub::Event::Message { message, .. })) = event {
                        let _ = heard_tx.send((message.source, message.data));
                    }
                }
            }
        }
    });
    (me, publish, heard)
}

/// A run record that passes every check, measured by `node`.
fn run_record(node: libp2p::PeerId, at_unix: u64) -> Vec<u8> {
    serde_json::json!({
        "features": {
            "model": {"name": "smollm2", "parameters_m": 135.0, "layers": 30, "hidden": 576, "stored_bits": 5.0},
            "hardware": {"cores": 2, "memory_gib": 24.0, "avx2": true, "avx512_vnni": true, "price_per_hour": 1.0},
            "workload": {"prompt_tokens": 37, "output_tokens": 64, "batch": 1, "shared_prefix": 0.0, "rewrite": false}
        },
        "method": "plain", "seconds": 1.0, "tokens": 64, "latency_ms": 1000.0,
        "perplexity": 10.0, "node": node.to_string(), "at_unix": at_unix
    })
    .to_string()
    .into_bytes()
}

/// Waits until `want` is heard; returns the authors of what was heard before it.
async fn wait_for(heard: &mut Heard, want: Vec<u8>) -> Vec<Option<libp2p::PeerId>> {
    let mut seen = Vec::new();
    loop {
        let (source, data) = tokio::time::timeout(Duration::from_secs(30), heard.recv())
            .await
            .expect("the honest record came through the node")
            .unwrap();
        if data == want {
            return seen;
        }
        seen.push(source);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_gossiping_bad_records_is_neither_relayed_nor_heard() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), "/ip4/127.0.0.1/tcp/0").await;
    // Three peers meet only through the node: one listens, one is honest, one is a rogue.
    let (_, _, mut heard) = gossip_peer(&node);
    let (honest, honest_publishes, _) = gossip_peer(&node);
    let (rogue, rogue_publishes, _) = gossip_peer(&node);
    // An honest record reaches the listener through the node: the mesh is up.
    let first = run_record(honest, 1);
    honest_publishes.send(first.clone()).unwrap();
    wait_for(&mut heard, first).await;

    // The rogue sends records that fail the node's checks, then, once those are judged,
    // records that would pass.
    for n in 0..10 {
        rogue_publishes
            .send(format!("not a record {n}").into_bytes())
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for n in 0..3 {
        rogue_publishes.send(run_record(rogue, 100 + n)).unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Another honest record comes through; nothing of the rogue's did, valid or not.
    let second = run_record(honest, 2);
    honest_publishes.send(second.clone()).unwrap();
    let seen = wait_for(&mut heard, second).await;
    assert!(
        !seen.contains(&Some(rogue)),
        "the node relayed the rogue's records: {} of {}",
        seen.iter().filter(|s| **s == Some(rogue)).count(),
        seen.len()
    );
}

/// Four sessions decode on one node: greedy tokens after a prompt each, stepped one session at
/// a time or all at once (the node then runs the steps that arrive together in one pass);
/// returns each session's tokens.
async fn decode_four(client: &SwarmClient, peer: libp2p::PeerId, together: bool) -> Vec<Vec<u32>> {
    let prompts: [&[u32]; 4] = [&[1, 9690, 28], &[1, 4154], &[1, 12, 13, 14, 15], &[1, 77]];
    let mut sessions = Vec::new();
    let mut next = Vec::new();
    for prompt in prompts {
        let infer::Response::Opened { session } = client
            .infer(peer, infer::Request::Open { model: None })
            .await
            .unwrap()
        else {
            panic!("no session")
        };
        let step = infer::Request::Step {
            session,
            input: StepInput::Tokens(prompt.to_vec()),
        };
        let infer::Response::Output(logits) = client.infer(peer, step).await.unwrap() else {
            panic!("no logits")
        };
        sessions.push(session);
        next.push(greedy(&logits));
    }
    let mut tokens = vec![Vec::new(); 4];
    for _ in 0..6 {
        let steps = sessions.iter().zip(&next).map(|(&session, &token)| {
            client.infer(
                peer,
                infer::Request::Step {
                    session,
                    input: StepInput::Tokens(vec![token]),
                },
            )
        });
        let answers = if together {
            futures::future::join_all(steps).await
        } else {
            let mut answers = Vec::new();
            for step in steps {
                answers.push(step.await);
            }
            answers
        };
        for (i, answer) in answers.into_iter().enumerate() {
            let infer::Response::Output(logits) = answer.unwrap() else {
                panic!("no logits")
            };
            tokens[i].push(next[i]);
            next[i] = greedy(&logits);
        }
    }
    for session in sessions {
        client
            .infer(peer, infer::Request::Close { session })
            .await
            .unwrap();
    }
    tokens
}

/// The best token of a head's logits `(1, vocab)`.
fn greedy(logits: &WireTensor) -> u32 {
    let row = logits
        .to_tensor()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    veil_model::sampling::argmax(&row)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_steps_of_different_sessions_arriving_together_answer_as_alone() {
    let dir = tempfile::tempdir().unwrap();
    let node = serve_with(
        dir.path(),
        "/ip4/127.0.0.1/tcp/0",
        model_path(),
        SessionLimits::default(),
    )
    .await;
    let peer = peer_of(&node).unwrap();
    let client = stranger(&node).await;
    let alone = decode_four(&client, peer, false).await;
    let together = decode_four(&client, peer, true).await;
    assert_eq!(together, alone);
    assert!(alone.iter().all(|t| t.len() == 6));
}
