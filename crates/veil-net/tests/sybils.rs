//! Squatters and Sybils on real libp2p over loopback.
//!
//! A squatter announces a model it does not hold: the weights check (random Merkle openings
//! against the client's own copy of the model) keeps it off routes and committees. Sybils that
//! do hold the public weights pass that check, so what they can do on a committee is measured
//! here, seat pattern by seat pattern, against a model of the client's rules; the same model
//! gives the table in `docs/SECURITY.md`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::request_response::{self, Message};
use libp2p::swarm::SwarmEvent;
use libp2p::{identify, Multiaddr, PeerId};
use tokio::sync::mpsc;
use veil_model::{
    generate, ChatMessage, GenerationParams, LocalModel, ModelStore, PlainOrder, WeightFormat,
    SMOLLM2_135M,
};
use veil_net::behaviour::{build_swarm, model_key, VeilBehaviourEvent};
use veil_net::protocol::{infer, prove, ErrorKind, Refusal};
use veil_net::wire::ShardInfo;
use veil_net::{
    generate_verified, peer_of, Admission, Candidate, NetError, NodeConfig, RemoteChain,
    SessionLimits, SwarmClient, VerifiedRequest, WeightsGate,
};
use veil_verify::{committee, Misbehaviour};
use veil_zk::{Opening, Openings};

fn model_path() -> std::path::PathBuf {
    ModelStore::from_env()
        .ensure(&SMOLLM2_135M, &mut |_| {})
        .expect("the default model can be fetched")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Starts a node serving the whole default model (cheating as `misbehave`), joined through
/// `bootstrap`.
fn serve(
    runtime: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    name: &str,
    bootstrap: Option<&Multiaddr>,
    misbehave: Option<Misbehaviour>,
) -> Multiaddr {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let config = NodeConfig {
        shard: model_path(),
        format: WeightFormat::AsStored,
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap: bootstrap.into_iter().cloned().collect(),
        state: dir.join(format!("{name}.redb")),
        limits: SessionLimits::default(),
        request_timeout: Duration::from_secs(60),
        judge_tokens_per_minute: 8192,
        max_memory_bytes: None,
        on_listen: Some(tx),
        misbehave,
        history: None,
        tee: None,
        zk: None,
        relay_server: None,
        relays: Vec::new(),
        find_relays: 0,
        probes: Default::default(),
        handoff: Default::default(),
    };
    runtime.spawn(async move {
        veil_net::run_node(config, futures::future::pending())
            .await
            .expect("node runs")
    });
    runtime.block_on(rx.recv()).expect("the node listens")
}

/// A squatter: a peer that provides the model in the DHT and answers `Info` with an honest
/// node's announcement (root included), but holds no weights. It answers a weights challenge
/// with made-up chunks and every other request with an error.
fn squat(runtime: &tokio::runtime::Runtime, bootstrap: &Multiaddr, claims: ShardInfo) -> PeerId {
    let mut swarm =
        build_swarm(Keypair::generate_ed25519(), Duration::from_secs(10), None).expect("a swarm");
    let me = *swarm.local_peer_id();
    let boot = peer_of(bootstrap).unwrap();
    let bootstrap = bootstrap.clone();
    runtime.spawn(async move {
        swarm
            .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
            .unwrap();
        swarm.behaviour_mut().kad.add_address(&boot, bootstrap.clone());
        swarm.dial(bootstrap.clone()).unwrap();
        let mut announce = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = announce.tick() => {
                    let _ = swarm.behaviour_mut().kad.start_providing(model_key(&claims.model_digest));
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
                        message: Message::Request { request, channel, .. }, ..
                    })) => {
                        let answer = match request {
                            prove::Request::OpenWeights { leaves, .. } => prove::Response::WeightOpenings(Box::new(Openings {
                                openings: leaves
                                    .into_iter()
                                    .map(|index| Opening {
                                        index,
                                        tensor: "token_embd.weight".into(),
                                        chunk: 0,
                                        bytes: vec![0; 64],
                                    })
                                    .collect(),
                                proof: vec![0; 32],
                            })),
                            _ => prove::Response::Refused(Refusal::new(ErrorKind::Internal, "squatting")),
                        };
                        let _ = swarm.behaviour_mut().prove.send_response(channel, answer);
                    }
                    _ => {}
                }
            }
        }
    });
    me
}

/// Connects a client and waits until `count` nodes announce the model.
fn discover(
    runtime: &tokio::runtime::Runtime,
    boot: &Multiaddr,
    digest: &str,
    count: usize,
) -> (SwarmClient, Vec<Candidate>) {
    let client = runtime
        .block_on(SwarmClient::connect(
            std::slice::from_ref(boot),
            Duration::from_secs(60),
            Duration::from_secs(10),
        ))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = runtime.block_on(client.discover(digest)).unwrap();
        if found.len() == count {
            return (client, found);
        }
        assert!(
            Instant::now() < deadline,
            "{} of {count} nodes found",
            found.len()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn greedy(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_tokens,
        ..GenerationParams::default()
    }
}

#[test]
fn squatters_that_do_not_hold_the_weights_are_neither_routed_nor_seated() {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    let model = model_path();
    let boot = serve(&runtime, dir.path(), "a", None, None);
    let b = serve(&runtime, dir.path(), "b", Some(&boot), None);
    let honest: HashSet<PeerId> = [&boot, &b].map(|a| peer_of(a).unwrap()).into();
    let digest = veil_model::store::file_digest(&model).unwrap().1;
    let (client, found) = discover(&runtime, &boot, &digest, 2);
    let claims = found[0].info.clone();
    let squatters: HashSet<PeerId> = (0..3)
        .map(|_| squat(&runtime, &boot, claims.clone()))
        .collect();
    let (client_seeing_all, found) = discover(&runtime, &boot, &digest, 5);
    drop(client);

    // What a node announces is believed: without checks, every squatter is a whole-model
    // candidate as good as an honest node, and committees seat them.
    let open = Admission::default();
    let (admitted, _) = runtime.block_on(open.admit(&client_seeing_all, &found));
    assert_eq!(admitted.len(), 5);
    let names: Vec<String> = found.iter().map(|c| c.peer.to_string()).collect();
    let seated = (0..20)
        .map(|n| committee(&format!("{n:064x}"), "veil", &names, 3))
        .filter(|m| m.iter().any(|p| squatters.contains(&p.parse().unwrap())))
        .count();
    assert!(seated > 0, "no committee seats a squatter");

    // With the weights check, every squatter is refused, saying why, and every honest node
    // is admitted.
    let checked =
        std::sync::Arc::new(Admission::default().with_weights(WeightsGate::new(model.clone(), 8)));
    let (admitted, refused) = runtime.block_on(checked.admit(&client_seeing_all, &found));
    assert_eq!(admitted, honest);
    assert_eq!(
        refused.iter().map(|(p, _)| *p).collect::<HashSet<_>>(),
        squatters
    );
    for (peer, why) in &refused {
        assert!(
            why.contains("do not hash to the committed root") || why.contains("unreadable proof"),
            "{peer}: {why}"
        );
    }

    // Routes and committees take only the honest nodes, and answer as one process does.
    let local = LocalModel::load(&model, WeightFormat::AsStored, &[]).unwrap();
    let prompt = local
        .chat_prompt(&[ChatMessage::user("Name the capital city of France.")])
        .unwrap();
    let alone = generate(
        &mut local.session(),
        &local.tokenizer,
        &prompt,
        local.config.context_length,
        &greedy(8),
        &mut |_| {},
    )
    .unwrap();
    for _ in 0..3 {
        let mut chain = RemoteChain::open_gated(
            client_seeing_all.clone(),
            runtime.handle().clone(),
            &digest,
            local.config.block_count,
            None,
            &HashSet::new(),
            Some(checked.clone()),
        )
        .unwrap();
        assert!(chain.route().iter().all(|(n, _)| honest.contains(&n.peer)));
        let answer = generate(
            &mut chain,
            &local.tokenizer,
            &prompt,
            local.config.context_length,
            &greedy(8),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(answer.tokens, alone.tokens);
        chain.close();
    }
    let params = greedy(8);
    let request = VerifiedRequest {
        model_digest: &digest,
        prompt: &prompt,
        order: &PlainOrder,
        params: &params,
        context_length: local.config.context_length,
        size: 3,
        seed: "veil",
        request_id: veil_verify::random_request_id(),
        gate: Some(&checked),
        cancelled: &|| false,
        recheck: None,
    };
    let answer = generate_verified(
        &client_seeing_all,
        runtime.handle(),
        &local.tokenizer,
        &request,
        None,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(answer.completion.tokens, alone.tokens);
    assert!(answer
        .committee
        .iter()
        .all(|m| honest.contains(&m.parse().unwrap())));
}

/// What the client's rules make of one request, by node (in rank order, `true` for a Sybil;
/// the first `size` are the committee, the rest break ties): Sybils pass each other's answers
/// and fail honest ones; honest judges do the opposite. Mirrors `generate_verified`:
/// generators in rank order, judged by the members not yet rejected; a strict majority of the
/// judges accepts or rejects, and a tie asks the next node beyond the committee, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Outcome {
    /// An honest answer accepted.
    Honest,
    /// A Sybil's answer accepted.
    Lie,
    /// A tie with no node left to break it: the request fails.
    NoQuorum,
    /// Every generator rejected.
    NoAnswer,
}

/// The outcome, and how many honest generators were rejected on the way (framed). With
/// `recheck`, the client recomputes a rejected answer itself: an honest one then stands.
fn predict(ranked: &[bool], size: usize, recheck: bool) -> (Outcome, usize) {
    let (members, spares) = ranked.split_at(size);
    let mut caught = vec![false; size];
    let mut framed = 0;
    for g in 0..size {
        let mut judges: Vec<bool> = (0..size)
            .filter(|&j| j != g && !caught[j])
            .map(|j| members[j])
            .collect();
        if judges.is_empty() {
            break;
        }
        let mut spare = spares.iter();
        loop {
            let passes = judges.iter().filter(|&&j| j == members[g]).count();
            if passes >= veil_verify::quorum(judges.len()) {
                let outcome = if members[g] {
                    Outcome::Lie
                } else {
                    Outcome::Honest
                };
                return (outcome, framed);
            }
            if 2 * (judges.len() - passes) > judges.len() {
                break;
            }
            match spare.next() {
                Some(&next) => judges.push(next),
                None => return (Outcome::NoQuorum, framed),
            }
        }
        if recheck && !members[g] {
            return (Outcome::Honest, framed);
        }
        caught[g] = true;
        framed += usize::from(!members[g]);
    }
    (Outcome::NoAnswer, framed)
}

/// For committees of `size` drawn from `nodes` admitted nodes of which `sybils` are Sybils,
/// placed uniformly at random (the request id is random): the share of requests with an honest
/// answer, a Sybil's answer, no answer, and with an honest node framed.
fn odds(nodes: usize, size: usize, sybils: usize, recheck: bool) -> [f64; 4] {
    let mut counts = [0usize; 4];
    let mut all = 0;
    for mask in 0u32..(1 << nodes) {
        if mask.count_ones() as usize != sybils {
            continue;
        }
        let ranked: Vec<bool> = (0..nodes).map(|i| mask & (1 << i) != 0).collect();
        all += 1;
        let (outcome, framed) = predict(&ranked, size, recheck);
        counts[match outcome {
            Outcome::Honest => 0,
            Outcome::Lie => 1,
            Outcome::NoQuorum | Outcome::NoAnswer => 2,
        }] += 1;
        counts[3] += usize::from(framed > 0);
    }
    counts.map(|c| c as f64 / all as f64)
}

#[test]
fn what_sybils_holding_the_weights_can_do_on_a_committee() {
    // The rules' table, as docs/SECURITY.md gives it.
    println!("nodes  seats  sybils  honest answer  sybil answer  no answer  honest node framed  with --recheck: honest / sybil / none");
    for (nodes, size) in [(3, 3), (5, 3), (9, 3), (5, 5), (9, 5)] {
        for k in 1..nodes.min(5) {
            let [h, l, x, f] = odds(nodes, size, k, false);
            let [rh, rl, rx, _] = odds(nodes, size, k, true);
            println!(
                "{nodes:>5}  {size:>5}  {k:>6}  {:>12.0}%  {:>11.0}%  {:>8.0}%  {:>17.0}%  {:>3.0}% / {:>3.0}% / {:>3.0}%",
                h * 100.0,
                l * 100.0,
                x * 100.0,
                f * 100.0,
                rh * 100.0,
                rl * 100.0,
                rx * 100.0
            );
        }
    }
    // Sybils that are a minority of the nodes and of the committee never get a lie accepted;
    // a lone Sybil among three seats no longer stops a request when a spare node can break
    // the tie; Sybils holding most seats can.
    for (nodes, size) in [(3, 3), (5, 3), (9, 3), (5, 5), (9, 5), (9, 7)] {
        for k in 1..nodes {
            let [_, lie, _, _] = odds(nodes, size, k, false);
            if 2 * k < size && 2 * k < nodes {
                assert_eq!(lie, 0.0, "{k} Sybils of {nodes} nodes, {size} seats");
            }
        }
    }
    assert_eq!(odds(5, 3, 1, false)[0], 1.0);
    assert!(odds(9, 3, 5, false)[1] > 0.0);
    // Rechecking rejections never frames anyone and never loses an honest answer.
    for (nodes, size) in [(5, 3), (9, 3), (9, 5)] {
        for k in 1..nodes {
            let (plain, rechecked) = (odds(nodes, size, k, false), odds(nodes, size, k, true));
            assert_eq!(rechecked[3], 0.0);
            assert!(rechecked[0] >= plain[0]);
        }
    }

    // Real nodes: two honest, two Sybils that hold the model's file (so they pass the
    // weights check) but serve other weights, the same other weights, so they agree.
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    let model = model_path();
    let boot = serve(&runtime, dir.path(), "h1", None, None);
    let h2 = serve(&runtime, dir.path(), "h2", Some(&boot), None);
    let sybils: HashSet<String> = ["s1", "s2"]
        .map(|name| {
            let addr = serve(
                &runtime,
                dir.path(),
                name,
                Some(&boot),
                Some(Misbehaviour::OtherModel),
            );
            peer_of(&addr).unwrap().to_string()
        })
        .into();
    let honest: HashSet<String> = [&boot, &h2].map(|a| peer_of(a).unwrap().to_string()).into();
    let digest = veil_model::store::file_digest(&model).unwrap().1;
    let (client, found) = discover(&runtime, &boot, &digest, 4);
    let checked = Admission::default().with_weights(WeightsGate::new(model.clone(), 8));
    let (admitted, refused) = runtime.block_on(checked.admit(&client, &found));
    assert_eq!(
        admitted.len(),
        4,
        "Sybils holding the file pass: {refused:?}"
    );

    let local = LocalModel::open_text(&model).unwrap();
    let prompt = local
        .chat_prompt(&[ChatMessage::user("Name the capital city of France.")])
        .unwrap();
    let params = greedy(6);
    let names: Vec<String> = found.iter().map(|c| c.peer.to_string()).collect();
    let request = |request_id: String| VerifiedRequest {
        model_digest: &digest,
        prompt: &prompt,
        order: &PlainOrder,
        params: &params,
        context_length: local.config.context_length,
        size: 3,
        seed: "veil",
        request_id,
        gate: Some(&checked),
        cancelled: &|| false,
        recheck: None,
    };
    // One request id for each way two Sybils can rank among the four nodes (the fourth breaks
    // ties).
    let mut patterns: Vec<(Vec<bool>, String)> = Vec::new();
    for n in 0u32.. {
        let id = format!("{n:064x}");
        let ranked: Vec<bool> = committee(&id, "veil", &names, names.len())
            .iter()
            .map(|m| sybils.contains(m))
            .collect();
        if !patterns.iter().any(|(r, _)| *r == ranked) {
            patterns.push((ranked, id));
        }
        if patterns.len() == 6 {
            break;
        }
    }
    // The client's own recomputation, for requests that recheck rejections.
    let whole = veil_verify::trials::load_whole(&model, WeightFormat::AsStored, None).unwrap();
    let recompute = |job: &veil_verify::Job| {
        veil_verify::validate(
            std::slice::from_ref(&whole),
            &job.claim,
            &Default::default(),
        )
        .map(|v| v.verdict == veil_verify::Verdict::Pass)
        .map_err(|e| e.to_string())
    };
    for recheck in [false, true] {
        for (ranked, id) in &patterns {
            let members = committee(id, "veil", &names, names.len());
            let mut framed = 0;
            let outcome = generate_verified(
                &client,
                runtime.handle(),
                &local.tokenizer,
                &VerifiedRequest {
                    recheck: recheck.then_some(&recompute as &veil_net::Recheck),
                    ..request(id.clone())
                },
                None,
                &mut |evidence| {
                    framed += usize::from(honest.contains(&evidence.job.body.generator))
                },
            );
            let observed = match &outcome {
                Ok(answer) if sybils.contains(&answer.generator) => Outcome::Lie,
                Ok(_) => Outcome::Honest,
                Err(NetError::Verification(why)) if why.contains("no quorum") => Outcome::NoQuorum,
                Err(NetError::Verification(why)) if why.contains("no committee member") => {
                    Outcome::NoAnswer
                }
                Err(e) => panic!("{ranked:?}: {e}"),
            };
            assert_eq!(
                (observed, framed),
                predict(ranked, 3, recheck),
                "nodes {ranked:?} ({members:?}), recheck {recheck}"
            );
            // The answer accepted is the first member of the winning side; an overruled
            // committee names the Sybils that failed it.
            if let Ok(answer) = &outcome {
                let lie = observed == Outcome::Lie;
                let first = ranked.iter().position(|&sybil| sybil == lie).unwrap();
                assert_eq!(answer.generator, members[first]);
                assert!(answer.overruled.iter().all(|j| sybils.contains(j)));
            }
        }
    }

    // An operator's allow-list naming the honest nodes leaves the Sybils no seat.
    let allowed: HashSet<PeerId> = honest.iter().map(|p| p.parse().unwrap()).collect();
    let listed = Admission::default().with_allow_list(allowed);
    for (_, id) in &patterns {
        let answer = generate_verified(
            &client,
            runtime.handle(),
            &local.tokenizer,
            &VerifiedRequest {
                gate: Some(&listed),
                ..request(id.clone())
            },
            None,
            &mut |_| {},
        )
        .unwrap();
        assert!(honest.contains(&answer.generator));
        assert!(answer.evidence.is_empty());
    }
}
