//! The rogue of `veil bench --soak`: a peer and a client that run, in a loop, the attacks of
//! `docs/SECURITY.md` against real nodes and a real gateway, and count what each attack got.
//! An attack that gets anything it should not (another peer's session, a verdict it did not
//! ask for, more sessions than its share, a request served without a key) is a breach.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::request_response::{self, Message};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::SwarmEvent;
use libp2p::{gossipsub, identify, Multiaddr, PeerId, SwarmBuilder};
use veil_net::behaviour::{build_swarm, model_key, VeilBehaviourEvent};
use veil_net::protocol::{infer, prove, verify, ErrorKind, Refusal};
use veil_net::wire::{SessionId, ShardInfo, StepInput};
use veil_net::{peer_of, NetError, SwarmClient};
use veil_verify::{CommitmentBuilder, CommitmentMode, Job, Keypair, SamplingSpec, Signed};

/// What the rogue did and got.
#[derive(Debug, Default, Clone)]
pub struct RogueTally {
    /// Rounds of every attack.
    pub rounds: usize,
    /// Requests and connections it tried.
    pub attempts: usize,
    /// Of those, refused, cut off or answered as a stranger deserves.
    pub refused: usize,
    /// Of those, served within the peer's share (sessions up to its quota).
    pub within_share: usize,
    /// Attacks that got something they should not, each said in words.
    pub breaches: Vec<String>,
}

impl RogueTally {
    fn expect_refused<T: std::fmt::Debug>(&mut self, what: &str, answer: Result<T, NetError>) {
        self.attempts += 1;
        match answer {
            Err(_) => self.refused += 1,
            Ok(got) => self.breach(format!("{what} was served: {got:?}")),
        }
    }

    fn breach(&mut self, what: String) {
        if self.breaches.len() < 20 {
            self.breaches.push(what);
        }
    }
}

/// Where the rogue attacks.
pub struct Targets {
    /// Every node's address, ending in `/p2p/<peer id>`.
    pub nodes: Vec<Multiaddr>,
    /// The gateway's base URL and the host:port it listens on.
    pub gateway: String,
    /// The gateway's address, for raw connections.
    pub gateway_addr: std::net::SocketAddr,
}

/// Runs every attack in a loop until `stop`, pausing `pause` between rounds.
pub async fn run(targets: Targets, stop: Arc<AtomicBool>, pause: Duration) -> RogueTally {
    let mut tally = RogueTally::default();
    let Ok(rogue) = SwarmClient::connect(
        &targets.nodes[..1],
        Duration::from_secs(20),
        Duration::from_secs(10),
    )
    .await
    else {
        tally.breach("the rogue could not even join the swarm".into());
        return tally;
    };
    let Ok(lazy) = SwarmClient::connect(
        &targets.nodes[..1],
        Duration::from_secs(20),
        Duration::from_secs(10),
    )
    .await
    else {
        tally.breach("the rogue's second identity could not join".into());
        return tally;
    };
    let peers: Vec<PeerId> = targets.nodes.iter().filter_map(peer_of).collect();
    let honest = match rogue
        .infer(peers[0], infer::Request::Info { model: None })
        .await
    {
        Ok(infer::Response::Info(info)) => info,
        other => {
            tally.breach(format!(
                "the first node did not say what it serves: {other:?}"
            ));
            return tally;
        }
    };
    let squatter = tokio::spawn(squat_and_gossip(
        targets.nodes[0].clone(),
        honest.clone(),
        Arc::clone(&stop),
    ));
    let key = Keypair::generate_ed25519();
    let (Some(junk), Some(long)) = (junk_job(&key, &honest, 8191), junk_job(&key, &honest, 9000))
    else {
        tally.breach("cannot make a junk job".into());
        return tally;
    };
    let http = reqwest::Client::new();
    let mut stalls = Vec::new();
    let mut seed = 0u32;
    while !stop.load(Ordering::Relaxed) {
        for &peer in &peers {
            seed += 1;
            take_over_sessions(&mut tally, &rogue, peer).await;
            hog_sessions(&mut tally, &rogue, peer).await;
            let fresh = |job: &Job| {
                let mut job = job.clone();
                job.request_id = format!("{seed:064x}");
                Signed::sign(job, &key).ok()
            };
            let (Some(junk), Some(long)) = (fresh(&junk), fresh(&long)) else {
                tally.breach("cannot sign a junk job".into());
                break;
            };
            judge_junk(&mut tally, &rogue, &lazy, peer, junk, long).await;
            challenge_badly(&mut tally, &rogue, peer).await;
        }
        flood_connections(&mut tally, &targets.nodes[0]).await;
        stalls.extend(attack_gateway(&mut tally, &http, &targets).await);
        tally.rounds += 1;
        tokio::time::sleep(pause).await;
    }
    let _ = squatter.await;
    for stall in stalls {
        tally.attempts += 1;
        match stall.await {
            // Cut off (closed or answered with an error) before the rogue gave up waiting.
            Ok(Ok(_)) => tally.refused += 1,
            Ok(Err(e))
                if e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut =>
            {
                tally.refused += 1
            }
            _ => tally.breach("a connection that stalled in its headers was held 30 s".into()),
        }
    }
    tally
}

/// Steps, closes and finishes sessions it never opened (random 128-bit ids).
async fn take_over_sessions(tally: &mut RogueTally, rogue: &SwarmClient, peer: PeerId) {
    let session = SessionId::random();
    let step = infer::Request::Step {
        session,
        input: StepInput::Tokens(vec![1]),
    };
    tally.expect_refused("a step on a guessed session", rogue.infer(peer, step).await);
    let close = infer::Request::Close { session };
    tally.expect_refused("closing a guessed session", rogue.infer(peer, close).await);
    let finish = verify::Request::Finish { session };
    tally.expect_refused(
        "finishing a guessed session",
        rogue.verify(peer, finish).await,
    );
    let finish = verify::Request::FinishHop { session };
    tally.expect_refused("finishing a guessed hop", rogue.verify(peer, finish).await);
}

/// Opens sessions until refused, steps past the limits, and leaves what it holds to expire.
async fn hog_sessions(tally: &mut RogueTally, rogue: &SwarmClient, peer: PeerId) {
    let mut opened = Vec::new();
    for _ in 0..8 {
        tally.attempts += 1;
        match rogue
            .infer(peer, infer::Request::Open { model: None })
            .await
        {
            Ok(infer::Response::Opened { session }) => {
                tally.within_share += 1;
                opened.push(session);
            }
            _ => {
                tally.refused += 1;
                break;
            }
        }
    }
    // The default per-peer share is 4 (sessions held from earlier rounds count too).
    if opened.len() > 4 {
        tally.breach(format!(
            "one peer opened {} sessions on {peer}",
            opened.len()
        ));
    }
    for session in opened {
        let long = infer::Request::Step {
            session,
            input: StepInput::Tokens(vec![1; 8193]),
        };
        tally.expect_refused(
            "a step past the positions a step may carry",
            rogue.infer(peer, long).await,
        );
        let outside = infer::Request::Step {
            session,
            input: StepInput::Tokens(vec![u32::MAX]),
        };
        tally.expect_refused(
            "a token outside the vocabulary",
            rogue.infer(peer, outside).await,
        );
        let _ = rogue
            .infer(
                peer,
                infer::Request::Step {
                    session,
                    input: StepInput::Tokens(vec![1, 2]),
                },
            )
            .await;
    }
}

/// Has junk (one prompt token, 8,191 answer tokens, signed by the rogue) judged; a second
/// identity asks for the verdict; a job longer than a session is sent too.
async fn judge_junk(
    tally: &mut RogueTally,
    rogue: &SwarmClient,
    lazy: &SwarmClient,
    peer: PeerId,
    junk: Signed<Job>,
    long: Signed<Job>,
) {
    let digest = junk.body.digest().unwrap_or_default();
    tally.attempts += 1;
    match rogue
        .verify(
            peer,
            verify::Request::Judge {
                job: Box::new(junk),
            },
        )
        .await
    {
        // Judged (it fails, stopping early) or refused past the rogue's budget: both fine.
        Ok(verify::Response::Committed(_)) | Err(_) => tally.refused += 1,
        Ok(other) => tally.breach(format!("a junk judgement answered {other:?}")),
    }
    let reveal = verify::Request::Reveal { job: digest };
    tally.expect_refused(
        "another identity's verdict",
        lazy.verify(peer, reveal).await,
    );
    let judge = verify::Request::Judge {
        job: Box::new(long),
    };
    tally.expect_refused(
        "a job longer than a session",
        rogue.verify(peer, judge).await,
    );
    let snoop = verify::Request::Reveal {
        job: "ab".repeat(32),
    };
    tally.expect_refused(
        "a verdict on a job it never sent",
        rogue.verify(peer, snoop).await,
    );
}

/// A junk answer of `answer` tokens to a one-token prompt, with made-up activations.
fn junk_job(key: &Keypair, honest: &ShardInfo, answer: u32) -> Option<Job> {
    let mut builder = CommitmentBuilder::new(honest.hidden_size, CommitmentMode::Exact).ok()?;
    let row = vec![0.0; honest.hidden_size];
    for _ in 0..answer {
        builder.push(&row).ok()?;
    }
    Some(Job {
        request_id: "0".repeat(64),
        model_digest: honest.model_digest.clone(),
        format: honest.format.clone(),
        generator: key.public().to_peer_id().to_string(),
        claim: veil_verify::Claim {
            prompt: vec![1],
            output: (0..answer).map(|i| (i * 7) % 1000).collect(),
            sampling: SamplingSpec::from(&veil_model::SamplingParams::greedy()),
            commitment: builder.finish(),
        },
    })
}

/// Challenges with too many leaves, oversized messages, and requests the node cannot serve.
async fn challenge_badly(tally: &mut RogueTally, rogue: &SwarmClient, peer: PeerId) {
    let many = prove::Request::OpenWeights {
        leaves: vec![0; 129],
        model: None,
    };
    tally.expect_refused("129 leaves", rogue.prove(peer, many).await);
    let huge = prove::Request::OpenWeights {
        leaves: vec![0; 200_000],
        model: None,
    };
    tally.expect_refused("a challenge past 64 KiB", rogue.prove(peer, huge).await);
    let attest = prove::Request::Attest { nonce: [7; 32] };
    tally.expect_refused(
        "TEE evidence from a node in no TEE",
        rogue.prove(peer, attest).await,
    );
    let prove_it = prove::Request::ProveInference { input: vec![1; 64] };
    tally.expect_refused(
        "a proof from a node proving nothing",
        rogue.prove(peer, prove_it).await,
    );
}

/// Dials one node twelve times under one identity, and joins with a fresh identity.
async fn flood_connections(tally: &mut RogueTally, node: &Multiaddr) {
    let Some(peer) = peer_of(node) else { return };
    let Ok(builder) = SwarmBuilder::with_new_identity().with_tokio().with_tcp(
        libp2p::tcp::Config::default(),
        libp2p::noise::Config::new,
        libp2p::yamux::Config::default,
    ) else {
        return;
    };
    let Ok(builder) = builder.with_behaviour(|_| libp2p::swarm::dummy::Behaviour);
    let mut flood = builder
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
        .build();
    for _ in 0..12 {
        let opts = DialOpts::peer_id(peer)
            .addresses(vec![node.clone()])
            .condition(PeerCondition::Always)
            .build();
        let _ = flood.dial(opts);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::timeout_at(deadline, flood.select_next_some())
        .await
        .is_ok()
    {}
    let connections = flood.network_info().connection_counters().num_established();
    tally.attempts += 1;
    if connections > veil_net::behaviour::MAX_CONNECTIONS_PER_PEER {
        tally.breach(format!(
            "one identity holds {connections} connections to {peer}"
        ));
    } else {
        tally.refused += 1;
    }
}

/// A squatter announcing the model without its weights, gossiping junk run records, until
/// `stop`.
async fn squat_and_gossip(bootstrap: Multiaddr, claims: ShardInfo, stop: Arc<AtomicBool>) {
    let Ok(mut swarm) = build_swarm(Keypair::generate_ed25519(), Duration::from_secs(10), None)
    else {
        return;
    };
    let Some(boot) = peer_of(&bootstrap) else {
        return;
    };
    let topic = gossipsub::IdentTopic::new(veil_net::history::RUNS_TOPIC);
    let _ = swarm.behaviour_mut().gossipsub.subscribe(&topic);
    let _ = swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("a loopback address"));
    swarm
        .behaviour_mut()
        .kad
        .add_address(&boot, bootstrap.clone());
    let _ = swarm.dial(bootstrap);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut junk = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            _ = tick.tick() => {
                let _ = swarm.behaviour_mut().kad.start_providing(model_key(&claims.model_digest));
                junk += 1;
                let _ = swarm.behaviour_mut().gossipsub.publish(topic.clone(), format!("{{\"junk\":{junk}}}").into_bytes());
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::Behaviour(VeilBehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                    for addr in info.listen_addrs {
                        swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
                SwarmEvent::Behaviour(VeilBehaviourEvent::Infer(request_response::Event::Message {
                    message: Message::Request { request, channel, .. }, ..
                })) => {
                    let answer = match request {
                        infer::Request::Info { .. } => infer::Response::Info(claims.clone()),
                        _ => infer::Response::Refused(Refusal::new(ErrorKind::Internal, "squatting")),
                    };
                    let _ = swarm.behaviour_mut().infer.send_response(channel, answer);
                }
                SwarmEvent::Behaviour(VeilBehaviourEvent::Prove(request_response::Event::Message {
                    message: Message::Request { channel, .. }, ..
                })) => {
                    let made_up = veil_zk::Openings { openings: Vec::new(), proof: vec![0; 32] };
                    let _ = swarm.behaviour_mut().prove.send_response(channel, prove::Response::WeightOpenings(Box::new(made_up)));
                }
                _ => {}
            }
        }
    }
}

/// Requests without a key, from a foreign Host, too large, malformed or asking too much, and
/// connections that send half their headers and stall (returned, to be counted once the gateway
/// cut them off or the rogue gave up).
async fn attack_gateway(
    tally: &mut RogueTally,
    http: &reqwest::Client,
    targets: &Targets,
) -> Vec<tokio::task::JoinHandle<std::io::Result<usize>>> {
    let url = format!("{}/v1/chat/completions", targets.gateway);
    let key = super::bench_soak::API_KEY;
    let chat = |max_tokens: u64| {
        serde_json::json!({
            "model": "veil",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens,
        })
    };
    let attempts = [
        ("a request without a key", http.post(&url).json(&chat(4))),
        (
            "a request from a foreign Host",
            http.post(&url)
                .bearer_auth(key)
                .header("Host", "evil.example")
                .json(&chat(4)),
        ),
        (
            "a 2 MiB body",
            http.post(&url)
                .bearer_auth(key)
                .header("Content-Type", "application/json")
                .body(vec![b' '; 2 << 20]),
        ),
        (
            "a malformed body",
            http.post(&url)
                .bearer_auth(key)
                .header("Content-Type", "application/json")
                .body("{\"model\":"),
        ),
        (
            "a request for a million tokens",
            http.post(&url).bearer_auth(key).json(&chat(1_000_000)),
        ),
    ];
    for (what, request) in attempts {
        tally.attempts += 1;
        match request.send().await {
            Ok(r) if r.status().is_client_error() => tally.refused += 1,
            Ok(r) => tally.breach(format!("{what} was answered {}", r.status())),
            // Refused before the body was read: the connection closed under it.
            Err(_) => tally.refused += 1,
        }
    }
    let addr = targets.gateway_addr;
    (0..2)
        .map(|_| {
            tokio::task::spawn_blocking(move || {
                let mut stream = std::net::TcpStream::connect(addr)?;
                stream.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")?;
                stream.set_read_timeout(Some(Duration::from_secs(30)))?;
                let mut buf = [0u8; 256];
                std::io::Read::read(&mut stream, &mut buf)
            })
        })
        .collect()
}
