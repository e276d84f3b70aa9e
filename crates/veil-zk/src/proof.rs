//! Proving and verifying inference with halo2 (IPA over the Pasta curves: no trusted setup,
//! so the parameters are derived, not ceremonially generated), and the files that carry
//! keys and proofs between processes.

use halo2_proofs::circuit::Value;
use halo2_proofs::pasta::{group::ff::PrimeField, EqAffine, Fp};
use halo2_proofs::plonk::{
    create_proof, keygen_pk, keygen_vk, verify_proof, ProvingKey, SingleVerifier, VerifyingKey,
};
use halo2_proofs::poly::commitment::Params;
use halo2_proofs::transcript::{Blake2bRead, Blake2bWrite, Challenge255};
use serde::{Deserialize, Serialize};

use crate::circuit::{commitment, instance, InferenceCircuit, K, MAX_WEIGHTS};
use crate::error::{Result, ZkError};
use crate::model::{FixedModel, ModelShape};

fn plonk(e: halo2_proofs::plonk::Error) -> ZkError {
    ZkError::Proof(e.to_string())
}

/// The public parameters for circuits of 2^K rows (deterministic: IPA needs no secret).
pub fn parameters() -> Params<EqAffine> {
    Params::new(K)
}

/// The verifying key for models of `shape`.
pub fn verifying_key(
    params: &Params<EqAffine>,
    shape: &ModelShape,
) -> Result<VerifyingKey<EqAffine>> {
    let circuit = InferenceCircuit::for_shape(FixedModel::of_shape(shape.clone())?);
    keygen_vk(params, &circuit).map_err(plonk)
}

/// The proving key for models of `shape`.
pub fn proving_key(params: &Params<EqAffine>, shape: &ModelShape) -> Result<ProvingKey<EqAffine>> {
    let circuit = InferenceCircuit::for_shape(FixedModel::of_shape(shape.clone())?);
    let vk = keygen_vk(params, &circuit).map_err(plonk)?;
    keygen_pk(params, vk, &circuit).map_err(plonk)
}

/// A short fingerprint of a verifying key, so a verifier can tell it rebuilt the key the
/// prover used (halo2 0.4 cannot write verifying keys; both sides derive them from the shape).
pub fn key_fingerprint(vk: &VerifyingKey<EqAffine>) -> String {
    blake3::hash(format!("{:?}", vk.pinned()).as_bytes())
        .to_hex()
        .to_string()
}

/// A field element as 64 hex digits (little-endian bytes, as halo2 writes them).
pub fn hex_fp(v: &Fp) -> String {
    hex::encode(v.to_repr())
}

/// A field element from 64 hex digits.
pub fn fp_from_hex(text: &str) -> Result<Fp> {
    let bytes: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ZkError::BadInput(format!("{text:?} is not 64 hex digits")))?;
    Option::from(Fp::from_repr(bytes))
        .ok_or_else(|| ZkError::BadInput(format!("{text} is not a field element")))
}

/// A proof of one inference, as a file carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceProof {
    /// The model's public commitment (hex).
    pub commitment: String,
    /// The input pixels, 0..16.
    pub input: Vec<u8>,
    /// The logits at scale 2^6.
    pub output: Vec<i64>,
    /// The halo2 proof (hex).
    pub proof: String,
}

/// Proves `model` (committed with `salt`) labels `pixels` as it does.
pub fn prove(
    params: &Params<EqAffine>,
    pk: &ProvingKey<EqAffine>,
    model: &FixedModel,
    salt: Fp,
    pixels: &[u8],
) -> Result<InferenceProof> {
    if model.weights.len() > MAX_WEIGHTS {
        return Err(ZkError::BadModel(format!(
            "{} weights, over the circuit's {MAX_WEIGHTS}",
            model.weights.len()
        )));
    }
    let trace = model.trace(pixels)?;
    let commitment = commitment(&model.weights, salt);
    let public = instance(commitment, pixels, &trace.output);
    let circuit = InferenceCircuit {
        model: model.clone(),
        salt: Value::known(salt),
        known: true,
        trace: Value::known(trace.clone()),
    };
    let mut transcript = Blake2bWrite::<_, _, Challenge255<_>>::init(Vec::new());
    create_proof(
        params,
        pk,
        &[circuit],
        &[&[&public]],
        halo2_rand::rand_core::UnwrapErr(halo2_rand::rngs::SysRng),
        &mut transcript,
    )
    .map_err(plonk)?;
    Ok(InferenceProof {
        commitment: hex_fp(&commitment),
        input: pixels.to_vec(),
        output: trace.output,
        proof: hex::encode(transcript.finalize()),
    })
}

/// Checks `proof` under `vk` against the commitment the verifier trusts.
pub fn verify(
    params: &Params<EqAffine>,
    vk: &VerifyingKey<EqAffine>,
    trusted_commitment: &Fp,
    proof: &InferenceProof,
) -> Result<()> {
    if fp_from_hex(&proof.commitment)? != *trusted_commitment {
        return Err(ZkError::Proof(
            "the proof is about another commitment than the published one".into(),
        ));
    }
    if proof.input.len() != crate::model::INPUTS
        || proof.input.iter().any(|&p| p > 16)
        || proof.output.len() != 10
    {
        return Err(ZkError::BadInput(
            "a proof carries 64 pixels of 0..16 and 10 logits".into(),
        ));
    }
    let bytes = hex::decode(&proof.proof)
        .map_err(|e| ZkError::BadInput(format!("the proof is not hex: {e}")))?;
    let public = instance(*trusted_commitment, &proof.input, &proof.output);
    let strategy = SingleVerifier::new(params);
    let mut transcript = Blake2bRead::<_, _, Challenge255<_>>::init(&bytes[..]);
    verify_proof(params, vk, strategy, &[&[&public]], &mut transcript)
        .map_err(|e| ZkError::Proof(format!("the proof does not verify: {e}")))
}

/// What only the model's owner (the prover) keeps: the weights and the commitment's salt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretModel {
    /// The public shape.
    pub shape: ModelShape,
    /// The 8-bit weights.
    pub weights: Vec<i64>,
    /// The salt (hex) that hides the weights in the commitment.
    pub salt: String,
}

/// What everybody may know: the shape, the commitment and the key's fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicModel {
    /// The shape the circuit is laid out from.
    pub shape: ModelShape,
    /// log2 of the circuit's rows.
    pub rows_log2: u32,
    /// The commitment to the weights (hex).
    pub commitment: String,
    /// The verifying key's fingerprint.
    pub verifying_key: String,
}

impl SecretModel {
    /// Commits to `model` under a fresh random salt.
    pub fn new(model: &FixedModel) -> Self {
        use halo2_proofs::pasta::group::ff::Field;
        let salt = Fp::random(&mut halo2_rand::rand_core::UnwrapErr(
            halo2_rand::rngs::SysRng,
        ));
        Self {
            shape: model.shape.clone(),
            weights: model.weights.clone(),
            salt: hex_fp(&salt),
        }
    }

    /// The fixed-point model and its salt, checked.
    pub fn open(&self) -> Result<(FixedModel, Fp)> {
        Ok((
            FixedModel::new(self.shape.clone(), self.weights.clone())?,
            fp_from_hex(&self.salt)?,
        ))
    }

    /// The public half: shape, commitment, key fingerprint.
    pub fn public(&self, params: &Params<EqAffine>) -> Result<PublicModel> {
        let (model, salt) = self.open()?;
        Ok(PublicModel {
            shape: self.shape.clone(),
            rows_log2: K,
            commitment: hex_fp(&commitment(&model.weights, salt)),
            verifying_key: key_fingerprint(&verifying_key(params, &self.shape)?),
        })
    }
}

impl PublicModel {
    /// The verifying key, rebuilt from the shape and checked against the fingerprint.
    pub fn verifying_key(&self, params: &Params<EqAffine>) -> Result<VerifyingKey<EqAffine>> {
        if self.rows_log2 != K || params.k() != K {
            return Err(ZkError::BadModel(format!(
                "circuits here have 2^{K} rows; the files say 2^{} and 2^{}",
                self.rows_log2,
                params.k()
            )));
        }
        let vk = verifying_key(params, &self.shape)?;
        if key_fingerprint(&vk) != self.verifying_key {
            return Err(ZkError::BadModel(
                "the verifying key rebuilt from the shape is not the published one".into(),
            ));
        }
        Ok(vk)
    }
}

/// A node's side of a committed private model: the weights, the salt and the proving key,
/// ready to prove answers.
pub struct Prover {
    model: FixedModel,
    salt: Fp,
    commitment: String,
    params: Params<EqAffine>,
    pk: ProvingKey<EqAffine>,
}

impl std::fmt::Debug for Prover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Prover {{ commitment: {} }}", self.commitment)
    }
}

impl Prover {
    /// Opens the setup files; the announced commitment is the published one, and proofs are
    /// made from the secret file's weights (so a node whose weights differ is caught).
    pub fn open(
        secret: &SecretModel,
        public: &PublicModel,
        params: Params<EqAffine>,
    ) -> Result<Self> {
        let (model, salt) = secret.open()?;
        if secret.shape != public.shape {
            return Err(ZkError::BadModel(
                "the secret and public files describe different shapes".into(),
            ));
        }
        let pk = proving_key(&params, &public.shape)?;
        Ok(Self {
            model,
            salt,
            commitment: public.commitment.clone(),
            params,
            pk,
        })
    }

    /// The commitment the node announces.
    pub fn commitment(&self) -> &str {
        &self.commitment
    }

    /// Proves the model's answer on `pixels`.
    pub fn prove(&self, pixels: &[u8]) -> Result<InferenceProof> {
        prove(&self.params, &self.pk, &self.model, self.salt, pixels)
    }
}

/// A gateway's side: the published commitment and the key to check proofs with.
pub struct Verifier {
    params: Params<EqAffine>,
    vk: VerifyingKey<EqAffine>,
    commitment: Fp,
    commitment_hex: String,
}

impl Verifier {
    /// Rebuilds the verifying key from the public file and checks its fingerprint.
    pub fn open(public: &PublicModel, params: Params<EqAffine>) -> Result<Self> {
        let vk = public.verifying_key(&params)?;
        Ok(Self {
            commitment: fp_from_hex(&public.commitment)?,
            commitment_hex: public.commitment.clone(),
            params,
            vk,
        })
    }

    /// The published commitment (hex).
    pub fn commitment(&self) -> &str {
        &self.commitment_hex
    }

    /// Checks `proof` answers `pixels` under the published commitment.
    pub fn check(&self, pixels: &[u8], proof: &InferenceProof) -> Result<()> {
        if proof.input != pixels {
            return Err(ZkError::Proof("the proof is about another input".into()));
        }
        verify(&self.params, &self.vk, &self.commitment, proof)
    }
}
