//! What the fixture tests share: the tiny conformance models, loading them whole, one step.

use std::path::{Path, PathBuf};

use veil_model::{
    GgufFile, LlamaConfig, LogitsAt, Shard, ShardCache, ShardInput, ShardModel, WeightFormat,
};

/// The tiny random-weight GGUFs of `veil-model`'s conformance tests.
pub fn conformance_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../veil-model/tests/fixtures/conformance")
}

/// The whole model at `path`, its matrices in `format`.
pub fn load(path: &Path, format: WeightFormat) -> ShardModel {
    let mut gguf = GgufFile::open(path).expect("open");
    let blocks = LlamaConfig::from_gguf(&gguf).expect("config").block_count;
    ShardModel::load(&mut gguf, &Shard::whole(blocks), format).expect("load")
}

/// The last position's logits after feeding `ids`.
pub fn step(model: &ShardModel, cache: &mut ShardCache, ids: &[u32]) -> Vec<f32> {
    model
        .forward(ShardInput::Tokens(ids), cache, LogitsAt::Last)
        .expect("forward")
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("logits")
}
