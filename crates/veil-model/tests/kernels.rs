//! Veil's kernels against candle's on the real default model.

use veil_model::{ChatMessage, Kernels, LocalModel, LogitsAt, ModelStore, Tensor, WeightFormat, SMOLLM2_135M};

fn model_path() -> std::path::PathBuf {
    ModelStore::from_env()
        .ensure(&SMOLLM2_135M, &mut |_| {})
        .expect("the default model can be fetched")
}

fn diff(a: &Tensor, b: &Tensor) -> (f32, usize) {
    let d = (a - b).unwrap().abs().unwrap();
    let rows = d.max(1).unwrap().to_vec1::<f32>().unwrap();
    let (i, m) = rows.iter().enumerate().fold((0, 0f32), |(bi, bm), (i, &m)| if m > bm { (i, m) } else { (bi, bm) });
    (m, i)
}

#[test]
fn explore() {
    let load = |k: &str| LocalModel::load_with(&model_path(), WeightFormat::AsStored, &[], k.parse::<Kernels>().unwrap()).unwrap();
    let (scalar, avx2, avx512, candle) = (load("scalar"), load("avx2"), load("avx512"), load("candle"));
    let prompt = scalar.chat_prompt(&[ChatMessage::user("Hi")]).unwrap();
    let all = |m: &LocalModel| m.session().forward(&prompt, LogitsAt::All).unwrap();
    let one_by_one = |m: &LocalModel| {
        let mut s = m.session();
        let rows: Vec<Tensor> = prompt.iter().map(|t| s.forward(&[*t], LogitsAt::Last).unwrap()).collect();
        Tensor::cat(&rows, 0).unwrap()
    };
    let s_all = all(&scalar);
    eprintln!("prompt {} tokens", prompt.len());
    eprintln!("avx2 all vs scalar all {:?}", diff(&all(&avx2), &s_all));
    eprintln!("avx512 all vs scalar all {:?}", diff(&all(&avx512), &s_all));
    eprintln!("candle all vs scalar all {:?}", diff(&all(&candle), &s_all));
    let s_one = one_by_one(&scalar);
    eprintln!("scalar one vs scalar all {:?}", diff(&s_one, &s_all));
    eprintln!("avx512 one vs scalar one {:?}", diff(&one_by_one(&avx512), &s_one));
    eprintln!("candle one vs scalar one {:?}", diff(&one_by_one(&candle), &s_one));
}
