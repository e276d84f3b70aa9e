//! Handing a node a new shard (key rotation on the swarm): only the key holder its operator
//! named may, the file is checked before it is loaded, a session runs on the model it opened
//! to its end, a staged shard can be dropped, and what a killed node left is cleared when it
//! starts again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::quantized::GgmlDType;
use libp2p::identity::Keypair;
use tokio::sync::mpsc;
use veil_model::{ModelStore, Shard, WeightFormat, SMOLLM2_135M};
use veil_net::protocol::{handoff, infer, prove};
use veil_net::wire::{SessionId, StepInput, WireDType, WireTensor};
use veil_net::{peer_of, NetError, NodeConfig, SwarmClient};

fn model_path() -> PathBuf {
    ModelStore::from_env()
        .ensure(&SMOLLM2_135M, &mut |_| {})
        .expect("the default model can be fetched")
}

/// Blocks `first..end` of `model`, cut into `dir`.
fn cut(model: &Path, first: usize, end: usize, dir: &Path) -> PathBuf {
    let manifests = veil_model::write_shard_files(
        model,
        &[Shard::span(first..end, 30).unwrap()],
        dir,
        &mut |_, _| {},
    )
    .unwrap();
    dir.join(&manifests[0].file)
}

fn refused_with<T: std::fmt::Debug>(r: Result<T, NetError>, want: &str) {
    match r {
        Err(NetError::Refused { message, .. }) => {
            assert!(message.contains(want), "{message:?} lacks {want:?}")
        }
        other => panic!("expected a refusal mentioning {want:?}, got {other:?}"),
    }
}

/// Hidden states of `n` positions, deterministic.
fn hidden(n: usize, seed: u32) -> StepInput {
    let values: Vec<f32> = (0..n * 576)
        .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    StepInput::Hidden(WireTensor {
        dtype: WireDType::F32,
        shape: vec![n, 576],
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    })
}

async fn open(client: &SwarmClient, peer: libp2p::PeerId, model: Option<&str>) -> SessionId {
    let model = model.map(str::to_string);
    match client.infer(peer, infer::Request::Open { model }).await {
        Ok(infer::Response::Opened { session }) => session,
        other => panic!("no session: {other:?}"),
    }
}

async fn step(
    client: &SwarmClient,
    peer: libp2p::PeerId,
    session: SessionId,
    input: StepInput,
) -> Vec<u8> {
    match client
        .infer(peer, infer::Request::Step { session, input })
        .await
    {
        Ok(infer::Response::Output(t)) => t.data,
        other => panic!("no output: {other:?}"),
    }
}

async fn info(client: &SwarmClient, peer: libp2p::PeerId, model: Option<&str>) -> String {
    let model = model.map(str::to_string);
    match client.infer(peer, infer::Request::Info { model }).await {
        Ok(infer::Response::Info(info)) => info.model_digest,
        other => panic!("no info: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_named_key_holder_hands_over_and_sessions_keep_their_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_path();
    // The node serves blocks 10-20 of the default model. The "re-keyed" model is the same
    // model in Q8_0: another file (another digest) of the same shapes.
    let served = cut(&model, 10, 20, &dir.path().join("a"));
    let other_model = dir.path().join("other.gguf");
    veil_model::write_converted(&model, GgmlDType::Q8_0, &other_model).unwrap();
    let successor = cut(&other_model, 10, 20, &dir.path().join("b"));
    let wrong_range = cut(&model, 0, 10, &dir.path().join("c"));

    // What a node killed mid-rotation leaves behind: a transfer cut short and a handed shard.
    // The next run on the same database removes them, and nothing else there.
    let handoff_dir = dir.path().join("node").join("node.redb.handoff");
    std::fs::create_dir_all(&handoff_dir).unwrap();
    let leftovers = [
        "incoming-0011223344556677.part",
        &format!("{}-0011223344556677.gguf", "ab".repeat(32)),
    ];
    for name in leftovers {
        std::fs::write(handoff_dir.join(name), b"left by a killed node").unwrap();
    }
    std::fs::write(handoff_dir.join("operator-notes.txt"), b"not the node's").unwrap();

    let holder_key = Keypair::generate_ed25519();
    let holder_id = holder_key.public().to_peer_id();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let config = NodeConfig {
        shard: served.clone(),
        format: WeightFormat::AsStored,
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap: Vec::new(),
        state: dir.path().join("node").join("node.redb"),
        limits: Default::default(),
        request_timeout: Duration::from_secs(30),
        judge_tokens_per_minute: 8192,
        max_memory_bytes: None,
        on_listen: Some(tx),
        misbehave: None,
        history: None,
        tee: None,
        zk: None,
        relay_server: None,
        relays: Vec::new(),
        find_relays: 0,
        probes: Default::default(),
        handoff: handoff::HandoffPolicy {
            from: [holder_id].into_iter().collect(),
            max_bytes: 0,
        },
    };
    tokio::spawn(async move {
        veil_net::run_node(config, futures::future::pending())
            .await
            .expect("node runs")
    });
    let addr = rx.recv().await.expect("the node listens");
    let peer = peer_of(&addr).unwrap();
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(names(&handoff_dir), ["operator-notes.txt"]);
    let timeout = Duration::from_secs(30);
    let bootstrap = [addr];
    let holder = SwarmClient::connect_as(holder_key, &bootstrap, &[], timeout, timeout)
        .await
        .unwrap();
    let rogue = SwarmClient::connect(&bootstrap, timeout, timeout)
        .await
        .unwrap();
    let old = info(&holder, peer, None).await;

    // A stranger cannot hand over, promote or discard anything.
    refused_with(
        rogue.hand_off_shard(peer, &successor).await,
        "--accept-shards-from",
    );
    let promote = handoff::Request::Promote { model: old.clone() };
    refused_with(rogue.handoff(peer, promote).await, "--accept-shards-from");

    // The key holder's bad transfers are refused, each for its reason.
    let begin = |bytes: u64, blake3: &str| handoff::Request::Begin {
        bytes,
        blake3: blake3.to_string(),
    };
    let digest = "ab".repeat(32);
    refused_with(
        holder.handoff(peer, begin(u64::MAX, &digest)).await,
        "bytes",
    );
    refused_with(holder.handoff(peer, begin(10, "not hex")).await, "64 hex");
    let chunk = |offset: u64, data: Vec<u8>| handoff::Request::Chunk { offset, data };
    refused_with(
        holder.handoff(peer, chunk(0, vec![1; 4])).await,
        "send Begin first",
    );
    holder.handoff(peer, begin(8, &digest)).await.unwrap();
    refused_with(holder.handoff(peer, chunk(4, vec![1; 4])).await, "in order");
    refused_with(
        holder.handoff(peer, chunk(0, vec![1; 9])).await,
        "within the 8 announced",
    );
    refused_with(
        holder.handoff(peer, handoff::Request::Finish).await,
        "not complete",
    );
    holder.handoff(peer, chunk(0, vec![1; 8])).await.unwrap();
    refused_with(
        holder.handoff(peer, handoff::Request::Finish).await,
        "corrupted",
    );
    // A shard of other blocks loads, but cannot follow this node's.
    refused_with(
        holder.hand_off_shard(peer, &wrong_range).await,
        "blocks 0..10",
    );
    let again = holder.hand_off_shard(peer, &served).await;
    refused_with(again, "serves already");

    // A session opened now runs on the old shard, whatever comes next.
    let running = open(&holder, peer, None).await;
    let first = step(&holder, peer, running, hidden(3, 1)).await;

    let staged = holder.hand_off_shard(peer, &successor).await.unwrap();
    let new = staged.model_digest.clone();
    // Handed twice (a key holder retrying): the second copy replaces the first, whose removal
    // leaves the second's file in place (its weight openings below still read it).
    let again = holder.hand_off_shard(peer, &successor).await.unwrap();
    assert_eq!(again, staged);
    assert_ne!(new, old);
    assert_eq!((staged.first_block, staged.end_block), (10, 20));
    // Staged: asked by name only.
    assert_eq!(info(&holder, peer, None).await, old);
    assert_eq!(info(&holder, peer, Some(&new)).await, new);
    let on_new = open(&holder, peer, Some(&new)).await;
    let new_first = step(&holder, peer, on_new, hidden(3, 1)).await;
    assert_ne!(new_first, first, "the staged shard computes as the old one");
    let unknown = infer::Request::Open {
        model: Some(digest.clone()),
    };
    refused_with(holder.infer(peer, unknown).await, "this node serves model");
    // A stranger's long name is not echoed back.
    let long = infer::Request::Info {
        model: Some("x".repeat(1 << 20)),
    };
    refused_with(rogue.infer(peer, long).await, "<a name of 1048576 bytes>");

    // Promoted: new sessions get it; the running one stays on the old shard, which still
    // answers by name (for requests under the old key).
    let promote = handoff::Request::Promote { model: new.clone() };
    assert_eq!(
        holder.handoff(peer, promote).await.unwrap(),
        handoff::Response::Promoted
    );
    assert_eq!(info(&holder, peer, None).await, new);
    let second = step(&holder, peer, running, hidden(1, 2)).await;
    let replay = open(&holder, peer, Some(&old)).await;
    assert_eq!(step(&holder, peer, replay, hidden(3, 1)).await, first);
    assert_eq!(step(&holder, peer, replay, hidden(1, 2)).await, second);
    let fresh = open(&holder, peer, None).await;
    assert_eq!(step(&holder, peer, fresh, hidden(3, 1)).await, new_first);
    // Weight openings are read from the shard named.
    for model in [&old, &new] {
        let open = prove::Request::OpenWeights {
            leaves: vec![0],
            model: Some(model.clone()),
        };
        let opened = holder.prove(peer, open).await;
        assert!(
            matches!(opened, Ok(prove::Response::WeightOpenings(_))),
            "{opened:?}"
        );
    }

    // A staged shard the rotation gave up on is dropped.
    let restaged = holder.hand_off_shard(peer, &served).await.unwrap();
    assert_eq!(restaged.model_digest, old);
    let discard = handoff::Request::Discard { model: old.clone() };
    assert_eq!(
        holder.handoff(peer, discard.clone()).await.unwrap(),
        handoff::Response::Discarded
    );
    refused_with(holder.handoff(peer, discard).await, "no shard of model");
    let gone = infer::Request::Info {
        model: Some(old.clone()),
    };
    refused_with(holder.infer(peer, gone).await, "this node serves model");
    assert_eq!(info(&holder, peer, None).await, new);
    // Handed files are removed once their shard is dropped; only the current one is kept.
    let kept = names(&handoff_dir);
    let handed: Vec<_> = kept.iter().filter(|n| n.ends_with(".gguf")).collect();
    assert_eq!((kept.len(), handed.len()), (2, 1), "{kept:?}");
}
