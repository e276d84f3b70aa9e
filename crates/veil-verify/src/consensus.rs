//! Committees, signed commit-reveal verdicts, and evidence anyone can re-check.
//!
//! Every message is signed with the sender's libp2p identity key (ed25519), over the message's
//! JSON with a domain prefix, so a peer id is all it takes to know who said what. Validators
//! first commit to a hash of (verdict, their peer id, a random salt) and reveal only once every
//! commitment is in, so no validator can copy another's verdict.

use libp2p_identity::{Keypair, PeerId, PublicKey};
use rand::Rng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Result, VerifyError};
use crate::validate::{Claim, Verdict};

/// The request, the answer and what produced it: what the generator signs and validators judge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// 32 random bytes in hex, chosen by the client; also picks the committee.
    pub request_id: String,
    /// blake3 of the model file the answer claims to come from.
    pub model_digest: String,
    /// The weight format the generator claims to run (`q8_0`, `f32`...).
    pub format: String,
    /// The generator's peer id.
    pub generator: String,
    /// Prompt, answer, sampling and commitment.
    pub claim: Claim,
}

impl Job {
    /// The job's hash in hex: what commits and reveals refer to.
    pub fn digest(&self) -> Result<String> {
        job_digest(self)
    }
}

/// A validator's sealed verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictCommit {
    /// [`Job::digest`] of the job judged.
    pub job: String,
    /// blake3 of (verdict JSON, validator peer id, salt), in hex.
    pub hash: String,
}

/// A validator's verdict, opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictReveal {
    /// [`Job::digest`] of the job judged.
    pub job: String,
    /// Pass, or the first failing token and why.
    pub verdict: Verdict,
    /// The salt that hid the verdict in the commit, in hex.
    pub salt: String,
}

impl VerdictReveal {
    /// A reveal with a fresh salt.
    pub fn new(job: String, verdict: Verdict) -> Self {
        let salt: [u8; 16] = rand::rng().random();
        Self {
            job,
            verdict,
            salt: hex::encode(salt),
        }
    }

    /// The commit that seals this reveal for `validator`.
    pub fn commit(&self, validator: &PeerId) -> Result<VerdictCommit> {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&serde_json::to_vec(&self.verdict)?);
        hasher.update(validator.to_bytes().as_slice());
        hasher.update(self.salt.as_bytes());
        Ok(VerdictCommit {
            job: self.job.clone(),
            hash: hasher.finalize().to_hex().to_string(),
        })
    }
}

/// What each signed message kind is, so a signature on one kind cannot pass for another.
pub trait SignedKind: Serialize + DeserializeOwned {
    /// The domain prefix signed with the body.
    const DOMAIN: &'static str;
}

impl SignedKind for Job {
    const DOMAIN: &'static str = "veil-verify/1/job";
}
impl SignedKind for VerdictCommit {
    const DOMAIN: &'static str = "veil-verify/1/commit";
}
impl SignedKind for VerdictReveal {
    const DOMAIN: &'static str = "veil-verify/1/reveal";
}

/// A signed record that a committee judges: a whole-model answer ([`Job`]) or one hop of a
/// split chain ([`crate::HopJob`]).
pub trait Judged: SignedKind {
    /// The peer whose work is judged (and who signed it).
    fn judged_node(&self) -> &str;

    /// Checks the inputs evidence carries are the ones this record signed for.
    fn check_inputs(&self, inputs: &[crate::HopInput]) -> Result<()>;
}

impl Judged for Job {
    fn judged_node(&self) -> &str {
        &self.generator
    }

    /// An answer's prompt and tokens are in the job itself: its evidence carries no inputs.
    fn check_inputs(&self, inputs: &[crate::HopInput]) -> Result<()> {
        match inputs.is_empty() {
            true => Ok(()),
            false => Err(VerifyError::Evidence(
                "evidence against an answer carries no hop inputs".into(),
            )),
        }
    }
}

/// A message with its signer's public key and signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signed<T> {
    /// The message.
    pub body: T,
    /// The signer's peer id (derived from `public_key`; checked).
    pub signer: String,
    /// The signer's libp2p public key, protobuf-encoded, in hex.
    pub public_key: String,
    /// ed25519 signature over the domain and the body's JSON, in hex.
    pub signature: String,
}

impl<T: SignedKind> Signed<T> {
    /// Signs `body` with `key`.
    pub fn sign(body: T, key: &Keypair) -> Result<Self> {
        let signature = key
            .sign(&signing_bytes(&body)?)
            .map_err(|e| VerifyError::Signature(e.to_string()))?;
        Ok(Self {
            body,
            signer: key.public().to_peer_id().to_string(),
            public_key: hex::encode(key.public().encode_protobuf()),
            signature: hex::encode(signature),
        })
    }

    /// Checks the signature and that the key is the named signer's; returns the signer.
    pub fn verify(&self) -> Result<PeerId> {
        let bad =
            |why: &str| VerifyError::Signature(format!("message from {}: {why}", self.signer));
        let key_bytes = hex::decode(&self.public_key).map_err(|_| bad("public key is not hex"))?;
        let signature = hex::decode(&self.signature).map_err(|_| bad("signature is not hex"))?;
        // One spelling only (lowercase), so no byte of a record can change unnoticed.
        if hex::encode(&key_bytes) != self.public_key || hex::encode(&signature) != self.signature {
            return Err(bad("hex must be lowercase"));
        }
        let key = PublicKey::try_decode_protobuf(&key_bytes)
            .map_err(|_| bad("public key does not decode"))?;
        let peer = key.to_peer_id();
        if peer.to_string() != self.signer {
            return Err(bad("public key belongs to another peer"));
        }
        if !key.verify(&signing_bytes(&self.body)?, &signature) {
            return Err(bad("signature does not match the message"));
        }
        Ok(peer)
    }
}

/// A fresh request id: 32 random bytes as 64 lowercase hex digits (it picks the committee, so
/// the client draws it).
pub fn random_request_id() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Whether `id` has a request id's form: 64 hex digits.
pub fn is_request_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The hash in hex of any judged record: what commits and reveals refer to.
pub fn job_digest<J: Serialize>(job: &J) -> Result<String> {
    Ok(blake3::hash(&serde_json::to_vec(job)?).to_hex().to_string())
}

fn signing_bytes<T: SignedKind>(body: &T) -> Result<Vec<u8>> {
    let mut bytes = T::DOMAIN.as_bytes().to_vec();
    bytes.push(0);
    bytes.extend(serde_json::to_vec(body)?);
    Ok(bytes)
}

/// The committee for a request: the `size` candidates with the smallest
/// blake3(request id, public seed, peer id). Anyone can recompute it, and no one can steer it
/// without choosing the request id, which the client does.
pub fn committee(request_id: &str, seed: &str, candidates: &[String], size: usize) -> Vec<String> {
    let mut ranked: Vec<(blake3::Hash, &String)> = candidates
        .iter()
        .map(|peer| {
            let mut h = blake3::Hasher::new();
            for part in [request_id, seed, peer.as_str()] {
                h.update(&(part.len() as u64).to_le_bytes());
                h.update(part.as_bytes());
            }
            (h.finalize(), peer)
        })
        .collect();
    ranked.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()).then(a.1.cmp(b.1)));
    ranked.dedup_by(|a, b| a.1 == b.1);
    ranked
        .into_iter()
        .take(size)
        .map(|(_, p)| p.clone())
        .collect()
}

/// How the validators' reveals came out.
#[derive(Debug, Clone, PartialEq)]
pub struct Tally {
    /// Validators whose reveal passed the answer.
    pub passed: Vec<String>,
    /// Validators whose reveal failed it, with their verdicts.
    pub failed: Vec<(String, Verdict)>,
}

impl Tally {
    /// Whether at least `quorum` validators passed the answer.
    pub fn accepted(&self, quorum: usize) -> bool {
        self.passed.len() >= quorum
    }

    /// Whether a strict majority of the validators that revealed failed the answer.
    pub fn rejected(&self) -> bool {
        !self.failed.is_empty() && self.failed.len() * 2 > self.passed.len() + self.failed.len()
    }
}

/// The quorum for `validators`: a strict majority.
pub fn quorum(validators: usize) -> usize {
    validators / 2 + 1
}

/// Checks every commit and reveal for `job_digest` and counts verdicts. A validator counts only
/// if it signed both, the reveal opens the commit, and it is not the generator; each counts once.
pub fn tally(
    job_digest: &str,
    generator: &str,
    commits: &[Signed<VerdictCommit>],
    reveals: &[Signed<VerdictReveal>],
) -> Result<Tally> {
    let mut seen = std::collections::BTreeSet::new();
    let mut tally = Tally {
        passed: Vec::new(),
        failed: Vec::new(),
    };
    for reveal in reveals {
        let peer = reveal.verify()?;
        let name = peer.to_string();
        if name == generator {
            return Err(VerifyError::Evidence(format!(
                "the generator {name} cannot judge its own answer"
            )));
        }
        if !seen.insert(name.clone()) {
            return Err(VerifyError::Evidence(format!("{name} revealed twice")));
        }
        if reveal.body.job != job_digest {
            return Err(VerifyError::Evidence(format!(
                "{name} revealed a verdict on another job"
            )));
        }
        let commit = commits
            .iter()
            .find(|c| c.signer == name)
            .ok_or_else(|| VerifyError::Evidence(format!("{name} revealed without committing")))?;
        commit.verify()?;
        if commit.body != reveal.body.commit(&peer)? {
            return Err(VerifyError::Evidence(format!(
                "{name}'s reveal does not open its commit"
            )));
        }
        match &reveal.body.verdict {
            Verdict::Pass => tally.passed.push(name),
            v @ Verdict::Fail { .. } => tally.failed.push((name, v.clone())),
        }
    }
    Ok(tally)
}

/// Signed proof that a generator's answer (or a chain hop's work, `J` = [`crate::HopJob`])
/// failed validation: its own signed job and the committee's signed commits and reveals.
/// Stored as canonical pretty JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound = "J: Serialize + DeserializeOwned")]
pub struct Evidence<J = Job> {
    /// Format version of the record.
    pub version: u32,
    /// The job, signed by the node judged.
    pub job: Signed<J>,
    /// The validators' commits.
    pub commits: Vec<Signed<VerdictCommit>>,
    /// The validators' reveals.
    pub reveals: Vec<Signed<VerdictReveal>>,
    /// For a chain hop: every input it was sent, as its judges replayed them, so that anyone
    /// holding the model can replay them too (`veil verify-evidence`). Empty for an answer,
    /// whose prompt and tokens are in the job.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<crate::HopInput>,
}

/// What a checked piece of evidence establishes.
#[derive(Debug, Clone, PartialEq)]
pub struct Proven {
    /// The peer caught.
    pub generator: String,
    /// The validators that failed it, with their verdicts.
    pub failed: Vec<(String, Verdict)>,
    /// The validators that passed it.
    pub passed: Vec<String>,
}

/// Current evidence format.
pub const EVIDENCE_VERSION: u32 = 1;

impl<J: Judged> Evidence<J> {
    /// The record as it is written to a file.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut bytes = serde_json::to_vec_pretty(self)?;
        bytes.push(b'\n');
        Ok(bytes)
    }

    /// Reads a record, refusing any file that is not exactly how Veil writes it, so that no
    /// byte of it can change without the check failing.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let evidence: Self = serde_json::from_slice(bytes)?;
        if evidence.to_bytes()? != bytes {
            return Err(VerifyError::Evidence(
                "the file is not in the canonical form Veil writes (was it edited?)".into(),
            ));
        }
        Ok(evidence)
    }

    /// Checks every signature and that a majority of the committee failed the answer. It does
    /// not recompute the answer: `veil verify-evidence` does that with the model.
    pub fn check(&self) -> Result<Proven> {
        if self.version != EVIDENCE_VERSION {
            return Err(VerifyError::Evidence(format!(
                "version {} (this build reads {EVIDENCE_VERSION})",
                self.version
            )));
        }
        let generator = self.job.verify()?.to_string();
        if generator != self.job.body.judged_node() {
            return Err(VerifyError::Evidence(format!(
                "the job names {} as its node but {generator} signed it",
                self.job.body.judged_node()
            )));
        }
        self.job.body.check_inputs(&self.inputs)?;
        if self.commits.len() != self.reveals.len() {
            return Err(VerifyError::Evidence(format!(
                "{} commits but {} reveals",
                self.commits.len(),
                self.reveals.len()
            )));
        }
        let digest = job_digest(&self.job.body)?;
        let tally = tally(&digest, &generator, &self.commits, &self.reveals)?;
        if !tally.rejected() {
            return Err(VerifyError::Evidence(format!(
                "only {} of {} validators failed the answer: not a majority",
                tally.failed.len(),
                self.reveals.len()
            )));
        }
        Ok(Proven {
            generator,
            failed: tally.failed,
            passed: tally.passed,
        })
    }
}
