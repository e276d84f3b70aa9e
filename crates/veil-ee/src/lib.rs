//! Equivariant encryption (EE): serve a model that works on permuted tokens and transformed
//! activations, so a node computes answers it cannot read.

pub mod agreement;
pub mod attack;
pub mod error;
pub mod frequency;
mod group_local;
pub mod inversion;
pub mod key;
pub mod model_file;
pub mod obfuscation;
pub mod rotation;
pub mod session;
pub mod transform;

pub use agreement::{agreement, Agreement, EVAL_PROMPTS};
pub use attack::{match_embeddings, WeightMatch};
pub use error::{EeError, Result};
pub use frequency::{FrequencyAttack, FrequencyGuess};
pub use inversion::{
    hidden_states_seen, invert_hidden_states, HiddenView, Inversion, InversionBudget,
};
pub use key::{refuse_inexact, EeKey, KeyKind, LayerKey, KEY_VERSION};
pub use model_file::{
    check_key, encrypt_model, encrypt_model_with, model_digest, natural_kind, obfuscation_noise,
    Obfuscate,
};
pub use rotation::{KeyUsage, RotationPolicy};
pub use session::{EncryptedSession, EncryptedStep};
pub use transform::{
    decrypt_logits, decrypt_tokens, encrypt_tokens, encrypt_weights, EncryptedOrder,
};
