//! The verification part of `veil demo`: whole-model nodes serving the encrypted model, one of
//! them lying; a committee catches it in the encrypted basis, the evidence re-checks against the
//! encrypted file, and the next request leaves the liar out. With `--bench`, an encrypted
//! committee of 3 against one unverified node serving the plaintext model, side by side.

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use veil_ee::EeKey;
use veil_model::{generate, ChatMessage, GenerationParams, LocalModel, WeightFormat};
use veil_net::{generate_verified, NodeState, RemoteChain, SwarmClient, VerifiedRequest};
use veil_verify::trials::load_whole;
use veil_verify::{committee, validate, Tolerances, Verdict};

use crate::commands::demo_nodes::{retry, NodeChild};
use crate::commands::measure::median;
use crate::commands::network_runtime::runtime;

/// The encrypted model the demo's committee serves, and what the key holder keeps.
pub struct EncryptedModel<'a> {
    /// The encrypted GGUF the nodes serve.
    pub file: &'a Path,
    /// Its key (the tokens' order).
    pub key: &'a EeKey,
}

/// Runs the verification demo in `work`: nodes serve `encrypted`; `base` is the plaintext model
/// (for `--bench`'s unverified baseline) and `text` its tokenizer.
pub fn run(
    work: &Path,
    base: &Path,
    encrypted: &EncryptedModel<'_>,
    text: &LocalModel,
    question: &str,
    bench: bool,
) -> Result<()> {
    let state = |name: &str| work.join(format!("verify-{name}.redb"));
    // A group-locally encrypted quantized model on Veil's kernels: the same bits on every
    // node, so the committee verifies with exact commitments, in the encrypted basis.
    let served = encrypted.file;
    let mut nodes = vec![NodeChild::start_with(
        served,
        "all",
        &state("a"),
        None,
        &[],
    )?];
    let boot = nodes[0].addr.clone();
    for name in ["b", "c"] {
        nodes.push(NodeChild::start_with(
            served,
            "all",
            &state(name),
            Some(&boot),
            &[],
        )?);
    }
    let liar = NodeChild::start_with(
        served,
        "all",
        &state("liar"),
        Some(&boot),
        &["--misbehave", "other-model"],
    )?;
    let peer = |addr: &str| addr.rsplit('/').next().unwrap_or_default().to_string();
    let liar_id = peer(&liar.addr);
    nodes.push(liar);
    let ids: Vec<String> = nodes.iter().map(|n| peer(&n.addr)).collect();
    eprintln!("6. verification: 4 whole-model nodes serving the encrypted model; {liar_id} serves it with weights perturbed by 1% (--misbehave other-model)");

    let rt = runtime()?;
    let client = rt.block_on(SwarmClient::connect(
        &[boot.parse()?],
        std::time::Duration::from_secs(120),
        std::time::Duration::from_secs(10),
    ))?;
    let digest = veil_model::store::file_digest(served)?.1;
    let order = veil_ee::EncryptedOrder::new(encrypted.key);
    let client_state = NodeState::open(&work.join("verify-client.redb"))?;
    let prompt = text.chat_prompt(&[ChatMessage::user(question.to_string())])?;
    let params = GenerationParams {
        max_tokens: 48,
        ..GenerationParams::default()
    };
    // Nodes announce themselves after joining: wait until all four are found.
    retry(|| {
        let found = rt.block_on(client.discover(&digest))?.len();
        anyhow::ensure!(found == ids.len(), "{found} of {} nodes found", ids.len());
        Ok(())
    })?;
    // A request id for which the liar ranks first, so the demo shows it being caught.
    let request_id = (0u32..)
        .map(|n| format!("{n:064x}"))
        .find(|id| committee(id, "veil", &ids, 4).first() == Some(&liar_id))
        .context("no request id puts the liar first")?;
    let request = |request_id: String, size: usize| VerifiedRequest {
        model_digest: &digest,
        prompt: &prompt,
        order: &order,
        params: &params,
        context_length: text.config.context_length,
        size,
        seed: "veil",
        request_id,
        gate: None,
        cancelled: &|| false,
        recheck: None,
    };
    let answer = retry(|| {
        generate_verified(
            &client,
            rt.handle(),
            &text.tokenizer,
            &request(request_id.clone(), 4),
            Some(&client_state),
            &mut |_| {},
        )
        .map_err(anyhow::Error::from)
    })?;
    eprintln!(
        "   committee of {}: {} ({} commitments)",
        answer.committee.len(),
        answer.committee.join(", "),
        answer.mode
    );
    for record in &answer.evidence {
        let proven = record.check()?;
        eprintln!(
            "   {} generated first: failed by {} of {} judges{}",
            proven.generator,
            proven.failed.len(),
            proven.failed.len() + proven.passed.len(),
            proven
                .failed
                .first()
                .map(|(_, v)| format!(", e.g. {v}"))
                .unwrap_or_default()
        );
        let path = work.join("evidence.json");
        std::fs::write(&path, record.to_bytes()?)?;
        let format: WeightFormat = record.job.body.format.parse()?;
        let local = [load_whole(served, format, None)?];
        let recheck = validate(&local, &record.job.body.claim, &Tolerances::default())?;
        eprintln!(
            "   evidence ({} bytes, every message signed) re-checked here: {}",
            std::fs::metadata(&path)?.len(),
            match recheck.verdict {
                Verdict::Pass => "the answer passes (the evidence would not hold)".to_string(),
                Verdict::Fail { token, .. } =>
                    format!("fails at token {token}, as the judges said"),
            }
        );
    }
    eprintln!(
        "   accepted {}'s answer, passed by {} of {} judges: {}",
        answer.generator,
        answer.tally.passed.len(),
        answer.tally.passed.len() + answer.tally.failed.len(),
        answer.completion.text.trim()
    );
    let reputations: Vec<String> = client_state
        .reputations()?
        .iter()
        .map(|(node, score)| format!("{node} {score:+}"))
        .collect();
    eprintln!("   reputation now: {}", reputations.join(", "));
    if bench {
        // A prompt with a long answer, so the figure covers many tokens.
        let long = text.chat_prompt(&[ChatMessage::user(
            "Write a short story about a lighthouse keeper.".to_string(),
        )])?;
        let long_request = |request_id: String, size: usize| VerifiedRequest {
            prompt: &long,
            ..request(request_id, size)
        };
        // The baseline: one node serving the plaintext model, unverified.
        let plain = NodeChild::start_with(base, "all", &state("plain"), Some(&boot), &[])?;
        let plain_digest = veil_model::store::file_digest(base)?.1;
        bench_committee(
            &client,
            &rt,
            text,
            &plain_digest,
            &long,
            &client_state,
            &liar_id,
            &long_request,
        )?;
        drop(plain);
    }
    drop(nodes);
    eprintln!("7. stopped the verification nodes");
    Ok(())
}

/// End-to-end time of a committee of 3 (one generates, two judge) against one unverified node
/// serving the plaintext model (`digest`), alternating, medians of 3; the liar is left out.
#[allow(clippy::too_many_arguments)]
fn bench_committee<'a>(
    client: &SwarmClient,
    rt: &tokio::runtime::Runtime,
    text: &LocalModel,
    digest: &str,
    prompt: &[u32],
    state: &NodeState,
    liar: &str,
    request: &dyn Fn(String, usize) -> VerifiedRequest<'a>,
) -> Result<()> {
    let avoid: HashSet<libp2p::PeerId> = HashSet::from([liar.parse()?]);
    let params = GenerationParams {
        max_tokens: 64,
        ..GenerationParams::default()
    };
    let (mut plain, mut verified) = (Vec::new(), Vec::new());
    let mut tokens = 0;
    for run in 0..3 {
        let started = Instant::now();
        let mut chain = retry(|| {
            Ok(RemoteChain::open_avoiding(
                client.clone(),
                rt.handle().clone(),
                digest,
                text.config.block_count,
                None,
                &avoid,
            )?)
        })?;
        tokens = generate(
            &mut chain,
            &text.tokenizer,
            prompt,
            text.config.context_length,
            &params,
            &mut |_| {},
        )?
        .tokens
        .len();
        chain.close();
        plain.push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        let mut req = request(format!("{:064x}", 1000 + run), 3);
        req.params = &params;
        generate_verified(
            client,
            rt.handle(),
            &text.tokenizer,
            &req,
            Some(state),
            &mut |_| {},
        )?;
        verified.push(started.elapsed().as_secs_f64());
    }
    let (p, v) = (median(&mut plain), median(&mut verified));
    eprintln!(
        "bench: {tokens} greedy tokens end to end: one unverified plaintext node {p:.2} s, encrypted committee of 3 {v:.2} s: verified and encrypted runs at {:.2}x its speed (median of 3, nodes sharing this machine's cores)",
        p / v
    );
    Ok(())
}
