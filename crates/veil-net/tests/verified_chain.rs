//! Verified split chains over real libp2p on loopback: every hop signs what it was sent and
//! handed on, judges serving the same blocks replay it, and a hop whose weights are not the
//! model's is named in evidence and routed around.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;
use veil_model::{
    generate, ChatMessage, GenerationParams, LocalModel, ModelStore, Shard, WeightFormat,
    SMOLLM2_135M,
};
use veil_net::protocol::verify;
use veil_net::wire::StepInput;
use veil_net::{
    generate_verified_chain, judge_hops, peer_of, NetError, NodeConfig, NodeState, RemoteChain,
    SessionLimits, SwarmClient, VerifiedChainRequest,
};
use veil_verify::{Keypair, Misbehaviour, Signed};

fn model_path() -> std::path::PathBuf {
    ModelStore::from_env()
        .ensure(&SMOLLM2_135M, &mut |_| {})
        .expect("the default model can be fetched")
}

/// Starts a node serving `shard` (cheating as `misbehave`), joined through `bootstrap`.
fn serve(
    runtime: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    name: &str,
    shard: std::path::PathBuf,
    bootstrap: Option<&Multiaddr>,
    misbehave: Option<Misbehaviour>,
) -> Multiaddr {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let config = NodeConfig {
        shard,
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

/// Checks the node refused the request, saying `want`.
fn refused_with(answer: Result<verify::Response, NetError>, want: &str) {
    match answer {
        Err(NetError::Refused { message, .. }) => {
            assert!(message.contains(want), "{message:?} lacks {want:?}")
        }
        other => panic!("expected a refusal mentioning {want:?}, got {other:?}"),
    }
}

#[test]
fn a_verified_chain_names_the_lying_hop_and_answers_like_one_process() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let model = model_path();
    let manifests = veil_model::write_shard_files(
        &model,
        &[
            Shard::span(0..15, 30).unwrap(),
            Shard::span(15..30, 30).unwrap(),
        ],
        &dir.path().join("shards"),
        &mut |_, _| {},
    )
    .unwrap();
    let digest = manifests[0].model_digest.clone();
    let [front, back] = [0, 1].map(|i| dir.path().join("shards").join(&manifests[i].file));
    let boot = serve(&runtime, dir.path(), "front-a", front.clone(), None, None);
    serve(&runtime, dir.path(), "front-b", front, Some(&boot), None);
    let honest_back: Vec<PeerId> = ["back-a", "back-b"]
        .map(|name| {
            peer_of(&serve(
                &runtime,
                dir.path(),
                name,
                back.clone(),
                Some(&boot),
                None,
            ))
        })
        .into_iter()
        .map(Option::unwrap)
        .collect();
    let liar = peer_of(&serve(
        &runtime,
        dir.path(),
        "back-liar",
        back,
        Some(&boot),
        Some(Misbehaviour::OtherModel),
    ))
    .unwrap();

    // The single-process answer.
    let local = LocalModel::load(&model, WeightFormat::AsStored, &[]).unwrap();
    let prompt = local
        .chat_prompt(&[ChatMessage::user("Name the capital city of France.")])
        .unwrap();
    let params = GenerationParams {
        max_tokens: 12,
        ..GenerationParams::default()
    };
    let alone = generate(
        &mut local.session(),
        &local.tokenizer,
        &prompt,
        local.config.context_length,
        &params,
        &mut |_| {},
    )
    .unwrap();

    let client = runtime
        .block_on(SwarmClient::connect(
            std::slice::from_ref(&boot),
            Duration::from_secs(60),
            Duration::from_secs(10),
        ))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while runtime.block_on(client.discover(&digest)).unwrap().len() < 5 {
        assert!(Instant::now() < deadline, "the five nodes were not found");
        std::thread::sleep(Duration::from_millis(300));
    }
    let request = |id: char| VerifiedChainRequest {
        model_digest: &digest,
        block_count: 30,
        prompt: &prompt,
        params: &params,
        context_length: local.config.context_length,
        judges: 2,
        seed: "veil",
        request_id: id.to_string().repeat(64),
        gate: None,
        cancelled: &|| false,
    };

    // A chain through the liar (the honest back nodes left out of the route): its hop records
    // what it handed on, the other back nodes replay it and fail it, the evidence names it;
    // the honest front hop passes.
    let forced = request('a');
    let mut chain = RemoteChain::open_verified(
        client.clone(),
        runtime.handle().clone(),
        &digest,
        30,
        &honest_back.iter().copied().collect(),
        None,
        forced.request_id.clone(),
    )
    .unwrap();
    generate(
        &mut chain,
        &local.tokenizer,
        &prompt,
        local.config.context_length,
        &params,
        &mut |_| {},
    )
    .unwrap();
    let finished = chain.finish_hops().unwrap();
    assert_eq!(finished.len(), 2);
    assert_eq!(finished[1].job.body.node, liar.to_string());
    // A client framing the hop: one bit of one input changed, the judge refuses to replay it.
    let mut framed = finished[1].inputs.clone();
    let StepInput::Hidden(t) = &mut framed[0] else {
        panic!("the back hop takes hidden states")
    };
    t.data[0] ^= 1;
    let answer = runtime.block_on(client.verify(
        honest_back[0],
        verify::Request::JudgeHop {
            job: Box::new(finished[1].job.clone()),
            inputs: framed,
        },
    ));
    refused_with(answer, "not the ones the hop signed for");
    // A stranger's own signed record claiming four billion steps is refused before the judge
    // expands it (it would have taken 32 GB).
    let rogue = Keypair::generate_ed25519();
    let mut huge = finished[1].job.body.clone();
    huge.node = rogue.public().to_peer_id().to_string();
    huge.digests.steps = vec![(1, u32::MAX)];
    let answer = runtime.block_on(client.verify(
        honest_back[0],
        verify::Request::JudgeHop {
            job: Box::new(Signed::sign(huge, &rogue).unwrap()),
            inputs: finished[1].inputs.clone(),
        },
    ));
    refused_with(answer, "signed for 4294967295 steps");
    let outcomes = judge_hops(
        &client,
        runtime.handle(),
        &forced,
        &finished,
        &HashSet::new(),
    )
    .unwrap();
    assert!(
        outcomes[0].evidence.is_none(),
        "the honest front hop passes"
    );
    assert_eq!(
        outcomes[0].hop.tally.passed.len(),
        1,
        "one other front node"
    );
    let evidence = outcomes[1]
        .evidence
        .as_ref()
        .expect("the lying hop is failed");
    let proven = evidence.check().unwrap();
    assert_eq!(proven.generator, liar.to_string());
    assert_eq!(proven.failed.len(), 2, "both honest back nodes fail it");
    assert_eq!(
        (evidence.job.body.first_block, evidence.job.body.end_block),
        (15, 30)
    );
    // The evidence carries the inputs the hop was sent, so anyone holding the model can
    // replay them: a copy of the same blocks loaded here fails the hop too.
    assert_eq!(
        evidence.inputs.len(),
        evidence.job.body.digests.step_count()
    );
    let mut file = veil_model::GgufFile::open(&model).unwrap();
    let blocks = veil_model::ShardModel::load(
        &mut file,
        &Shard::span(15..30, 30).unwrap(),
        WeightFormat::AsStored,
    )
    .unwrap();
    let replayed = veil_verify::judge_hop(&blocks, &evidence.job.body, &evidence.inputs).unwrap();
    assert!(
        matches!(replayed, veil_verify::Verdict::Fail { .. }),
        "{replayed:?}"
    );
    // It survives its file form bit for bit, and inputs other than the signed ones do not check.
    let bytes = evidence.to_bytes().unwrap();
    assert_eq!(
        &veil_verify::Evidence::<veil_verify::HopJob>::from_bytes(&bytes).unwrap(),
        evidence
    );
    let mut forged = evidence.clone();
    match &mut forged.inputs[0] {
        veil_verify::HopInput::Hidden { values, .. } => values[0] += 1.0,
        other => panic!("the back hop takes hidden states, not {other:?}"),
    }
    let err = forged.check().unwrap_err().to_string();
    assert!(err.contains("not the ones the hop signed for"), "{err}");

    // Under one byte a token for each hop's inputs and outputs together, beyond the header.
    assert!(outcomes[0].hop.commitment_bytes <= 16 + 2 * 16);

    // The client keeps the evidence: the liar is left out of routes and committees from now
    // on, and the whole flow gives the single-process answer, every hop passed by its judge.
    let state = NodeState::open(&dir.path().join("client.redb")).unwrap();
    state.apply_evidence(evidence).unwrap();
    assert!(state.avoided().unwrap().contains(&liar));
    let answer = generate_verified_chain(
        &client,
        runtime.handle(),
        &local.tokenizer,
        &VerifiedChainRequest {
            judges: 1,
            ..request('b')
        },
        Some(&state),
        &mut |_| panic!("no hop lies now"),
    )
    .unwrap();
    assert_eq!(answer.completion.text, alone.text);
    assert_eq!(answer.hops.len(), 2);
    for hop in &answer.hops {
        assert_ne!(hop.node, liar.to_string());
        assert_eq!((hop.tally.passed.len(), hop.tally.failed.len()), (1, 0));
    }
}
