//! Choosing a method from features: Veil's selector and the baselines it is measured against.
//!
//! Records are grouped into cases (one workload on one model and machine, every method
//! measured). Veil's selector is a cost model: one gradient-boosted regressor learns, from the
//! features and the method, how much each method costs relative to the plain method on that
//! case, and the cheapest predicted method within the quality budget wins. Relative costs carry
//! over between models and machines of different speeds; the plain baselines instead learn the
//! winner's label directly.

use std::collections::BTreeMap;

use smartcore::ensemble::random_forest_classifier::{
    RandomForestClassifier, RandomForestClassifierParameters,
};
use smartcore::linalg::basic::matrix::DenseMatrix;
use smartcore::metrics::distance::euclidian::Euclidian;
use smartcore::neighbors::knn_classifier::{KNNClassifier, KNNClassifierParameters};
use smartcore::xgboost::xgb_regressor::{XGRegressor, XGRegressorParameters};

use crate::error::{MetaError, Result};
use crate::features::Features;
use crate::method::{default_method, method, Method, METHODS};
use crate::record::RunRecord;

/// What may be chosen and what counts as faster.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SelectionRules {
    /// The quality budget: allowed perplexity as a multiple of the plain method's (1.0: no
    /// worse than the model as stored).
    pub max_perplexity_ratio: f64,
    /// A method counts as faster than a simpler one only when it is cheaper by more than this
    /// share; within it, the simpler method (earlier in [`METHODS`]) is the fastest. Runs of
    /// the same method on this machine differ by 2.5% (median) to 4.5% (75th percentile), so
    /// smaller gaps are not measured differences.
    pub tie_margin: f64,
}

impl Default for SelectionRules {
    fn default() -> Self {
        Self {
            max_perplexity_ratio: 1.0,
            tie_margin: 0.05,
        }
    }
}

/// Among `costs`, the simplest method within `margin` of the cheapest.
fn simplest_within<'a>(
    costs: impl Iterator<Item = (&'static str, f64)> + Clone + 'a,
    margin: f64,
) -> Option<&'static str> {
    let min = costs.clone().map(|(_, c)| c).fold(f64::INFINITY, f64::min);
    costs
        .filter(|(_, c)| *c <= min * (1.0 + margin))
        .min_by_key(|(m, _)| method_index(m))
        .map(|(m, _)| m)
}

/// One workload on one model and machine, with the cost of every method measured on it.
#[derive(Debug, Clone)]
pub struct Case {
    /// What it ran on.
    pub features: Features,
    /// Cost per generated token of each allowed method (median of repeated runs), by name.
    pub costs: BTreeMap<&'static str, f64>,
    /// What counts as faster.
    pub tie_margin: f64,
}

impl Case {
    /// The fastest method: the simplest one within the tie margin of the cheapest.
    pub fn best(&self) -> &'static str {
        simplest_within(self.costs.iter().map(|(m, c)| (*m, *c)), self.tie_margin)
            .expect("a case has costs")
    }

    /// The cheapest method, however small its lead.
    pub fn cheapest(&self) -> &'static str {
        simplest_within(self.costs.iter().map(|(m, c)| (*m, *c)), 0.0).expect("a case has costs")
    }

    /// How much more `chosen` costs than the cheapest method (0 = the cheapest).
    pub fn regret(&self, chosen: &str) -> f64 {
        let best = self.costs[self.cheapest()];
        match self.costs.get(chosen) {
            Some(cost) => cost / best - 1.0,
            // A method not measured here (or over the quality budget) counts as the worst.
            None => self.costs.values().cloned().fold(0.0, f64::max) / best - 1.0,
        }
    }
}

/// Groups records into cases; only cases where the plain method and at least one other were
/// measured are kept, and methods over the quality budget are left out. A record of a method
/// with an idle mechanism on its workload counts for the method it reduces to
/// ([`Method::on`]).
pub fn cases(records: &[RunRecord], rules: &SelectionRules) -> Vec<Case> {
    let mut groups: BTreeMap<String, (Features, BTreeMap<&'static str, Vec<&RunRecord>>)> =
        BTreeMap::new();
    for r in records {
        let Ok(m) = method(&r.method) else { continue };
        let m = m.on(&r.features.workload);
        let key = serde_json::to_string(&r.features).unwrap_or_default();
        groups
            .entry(key)
            .or_insert_with(|| (r.features.clone(), BTreeMap::new()))
            .1
            .entry(m.name)
            .or_default()
            .push(r);
    }
    let plain = default_method().name;
    groups
        .into_values()
        .filter_map(|(features, runs)| {
            let plain_runs = runs.get(plain)?;
            let plain_ppl = median(plain_runs.iter().map(|r| r.perplexity).collect());
            let costs: BTreeMap<&'static str, f64> = runs
                .iter()
                .filter(|(_, rs)| {
                    median(rs.iter().map(|r| r.perplexity).collect())
                        <= plain_ppl * rules.max_perplexity_ratio
                })
                .map(|(m, rs)| (*m, median(rs.iter().map(|r| r.cost()).collect())))
                .collect();
            (costs.len() >= 2).then_some(Case {
                features,
                costs,
                tie_margin: rules.tie_margin,
            })
        })
        .collect()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Something that picks a method for features.
pub trait Chooser {
    /// The method to run.
    fn choose(&self, features: &Features) -> &'static str;
}

/// The learners compared in `veil meta eval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learner {
    /// Veil's selector: a gradient-boosted cost model over features and method.
    CostModel,
    /// The method that was cheapest most often relative to the others in training.
    SingleBest,
    /// Gradient boosting that learns the winner directly (one regressor per method, scoring
    /// whether it wins).
    GradientBoosting,
    /// k nearest neighbours over standardized features, voting for the winner.
    Knn,
    /// A random forest classifying the winner.
    RandomForest,
}

impl Learner {
    /// Every learner, Veil's first.
    pub const ALL: [Learner; 5] = [
        Self::CostModel,
        Self::SingleBest,
        Self::GradientBoosting,
        Self::Knn,
        Self::RandomForest,
    ];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::CostModel => "veil cost model",
            Self::SingleBest => "single best method",
            Self::GradientBoosting => "gradient boosting (winner)",
            Self::Knn => "kNN (k = 3)",
            Self::RandomForest => "random forest (winner)",
        }
    }

    /// Fits this learner on `cases`.
    pub fn fit(self, cases: &[Case]) -> Result<Box<dyn Chooser>> {
        if cases.is_empty() {
            return Err(MetaError::NotEnoughData(
                "no complete cases to learn from".into(),
            ));
        }
        Ok(match self {
            Self::CostModel => Box::new(CostModel::fit(cases)?),
            Self::SingleBest => Box::new(SingleBest::fit(cases)),
            Self::GradientBoosting => Box::new(WinnerBoosting::fit(cases)?),
            Self::Knn => Box::new(WinnerKnn::fit(cases)?),
            Self::RandomForest => Box::new(WinnerForest::fit(cases)?),
        })
    }
}

fn learner_error(e: impl std::fmt::Display) -> MetaError {
    MetaError::Learner(e.to_string())
}

fn matrix(rows: &[Vec<f64>]) -> Result<DenseMatrix<f64>> {
    DenseMatrix::from_2d_vec(&rows.to_vec()).map_err(learner_error)
}

fn method_index(name: &str) -> usize {
    METHODS.iter().position(|m| m.name == name).unwrap_or(0)
}

/// Features followed by the method as one-hot entries.
fn with_method(features: &Features, m: &Method) -> Vec<f64> {
    let mut row = features.vector();
    row.extend(METHODS.iter().map(|o| if o == m { 1.0 } else { 0.0 }));
    row
}

type Regressor = XGRegressor<f64, f64, DenseMatrix<f64>, Vec<f64>>;

fn boosting() -> XGRegressorParameters {
    XGRegressorParameters::default()
        .with_n_estimators(200)
        .with_learning_rate(0.1)
        .with_max_depth(4)
        .with_base_score(0.0)
}

/// Veil's selector: predicts each method's cost relative to plain, takes the cheapest.
pub struct CostModel {
    model: Regressor,
    methods: Vec<&'static Method>,
    tie_margin: f64,
}

impl CostModel {
    /// Fits the cost model on every measured (case, method) pair.
    pub fn fit(cases: &[Case]) -> Result<Self> {
        let plain = default_method().name;
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for case in cases {
            let base = case.costs[plain];
            for (name, cost) in &case.costs {
                rows.push(with_method(&case.features, method(name)?));
                targets.push((cost / base).ln());
            }
        }
        let methods = METHODS
            .iter()
            .filter(|m| cases.iter().any(|c| c.costs.contains_key(m.name)))
            .collect();
        let model = Regressor::fit(&matrix(&rows)?, &targets, boosting()).map_err(learner_error)?;
        let tie_margin = cases.first().map_or(0.0, |c| c.tie_margin);
        Ok(Self {
            model,
            methods,
            tie_margin,
        })
    }

    /// Predicted cost of each method relative to plain (1.0 = the same).
    pub fn predict(&self, features: &Features) -> Vec<(&'static str, f64)> {
        let candidates: Vec<&'static Method> = self
            .methods
            .iter()
            .copied()
            .filter(|m| m.applies_to(&features.workload))
            .collect();
        let rows: Vec<Vec<f64>> = candidates
            .iter()
            .map(|m| with_method(features, m))
            .collect();
        let predicted = matrix(&rows)
            .and_then(|x| self.model.predict(&x).map_err(learner_error))
            .unwrap_or_else(|_| vec![0.0; rows.len()]);
        candidates
            .iter()
            .zip(predicted)
            .map(|(m, p)| (m.name, p.exp()))
            .collect()
    }
}

/// A cost model as saved by `veil meta train`.
#[derive(serde::Deserialize)]
struct SavedCostModel {
    version: u32,
    methods: Vec<String>,
    tie_margin: f64,
    model: Regressor,
}

/// The same, borrowed, for writing.
#[derive(serde::Serialize)]
struct SavingCostModel<'a> {
    version: u32,
    methods: Vec<&'a str>,
    tie_margin: f64,
    model: &'a Regressor,
}

/// Bumped when the features or methods change meaning, so an old file is refused.
const SAVED_VERSION: u32 = 2;

impl CostModel {
    /// The trained model as JSON.
    pub fn to_json(&self) -> Result<String> {
        let saved = SavingCostModel {
            version: SAVED_VERSION,
            methods: self.methods.iter().map(|m| m.name).collect(),
            tie_margin: self.tie_margin,
            model: &self.model,
        };
        serde_json::to_string(&saved).map_err(learner_error)
    }

    /// A model saved by [`to_json`](Self::to_json).
    pub fn from_json(text: &str) -> Result<Self> {
        let saved: SavedCostModel = serde_json::from_str(text)
            .map_err(|e| MetaError::Learner(format!("not a saved selector: {e}")))?;
        if saved.version != SAVED_VERSION {
            return Err(MetaError::Learner(format!(
                "selector file version {} (this build reads {SAVED_VERSION}): run `veil meta train` again",
                saved.version
            )));
        }
        let methods = saved
            .methods
            .iter()
            .map(|m| method(m))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            model: saved.model,
            methods,
            tie_margin: saved.tie_margin,
        })
    }
}

impl Chooser for CostModel {
    fn choose(&self, features: &Features) -> &'static str {
        // A predicted gain within the tie margin is not worth a more complex method.
        simplest_within(self.predict(features).into_iter(), self.tie_margin)
            .unwrap_or(default_method().name)
    }
}

/// The one method with the lowest mean relative cost in training.
struct SingleBest(&'static str);

impl SingleBest {
    fn fit(cases: &[Case]) -> Self {
        let plain = default_method().name;
        let best = METHODS
            .iter()
            .map(|m| {
                let total: f64 = cases
                    .iter()
                    .map(|c| {
                        c.costs
                            .get(m.name)
                            .map_or(f64::INFINITY, |x| x / c.costs[plain])
                    })
                    .sum();
                (m.name, total)
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(plain, |(m, _)| m);
        Self(best)
    }
}

impl Chooser for SingleBest {
    fn choose(&self, _: &Features) -> &'static str {
        self.0
    }
}

/// Gradient boosting on the winner: one regressor per method scores "this one wins".
struct WinnerBoosting {
    models: Vec<(&'static str, Regressor)>,
}

impl WinnerBoosting {
    fn fit(cases: &[Case]) -> Result<Self> {
        let x = matrix(
            &cases
                .iter()
                .map(|c| c.features.vector())
                .collect::<Vec<_>>(),
        )?;
        let mut models = Vec::new();
        for m in METHODS {
            let y: Vec<f64> = cases
                .iter()
                .map(|c| if c.best() == m.name { 1.0 } else { 0.0 })
                .collect();
            let model = Regressor::fit(&x, &y, boosting()).map_err(learner_error)?;
            models.push((m.name, model));
        }
        Ok(Self { models })
    }
}

impl Chooser for WinnerBoosting {
    fn choose(&self, features: &Features) -> &'static str {
        let Ok(x) = matrix(&[features.vector()]) else {
            return default_method().name;
        };
        self.models
            .iter()
            .filter_map(|(m, model)| Some((*m, model.predict(&x).ok()?[0])))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(default_method().name, |(m, _)| m)
    }
}

/// Mean and spread of each feature, so no feature dominates a distance by its units.
struct Standardizer {
    mean: Vec<f64>,
    scale: Vec<f64>,
}

impl Standardizer {
    fn fit(rows: &[Vec<f64>]) -> Self {
        let n = rows.len() as f64;
        let width = rows.first().map_or(0, Vec::len);
        let mean: Vec<f64> = (0..width)
            .map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / n)
            .collect();
        let scale = (0..width)
            .map(|j| {
                let var = rows.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / n;
                if var > 0.0 {
                    var.sqrt()
                } else {
                    1.0
                }
            })
            .collect();
        Self { mean, scale }
    }

    fn apply(&self, row: &[f64]) -> Vec<f64> {
        row.iter()
            .zip(&self.mean)
            .zip(&self.scale)
            .map(|((x, m), s)| (x - m) / s)
            .collect()
    }
}

type Knn = KNNClassifier<f64, u32, DenseMatrix<f64>, Vec<u32>, Euclidian<f64>>;

/// kNN voting for the winner.
struct WinnerKnn {
    model: Knn,
    scaler: Standardizer,
}

impl WinnerKnn {
    fn fit(cases: &[Case]) -> Result<Self> {
        let rows: Vec<Vec<f64>> = cases.iter().map(|c| c.features.vector()).collect();
        let scaler = Standardizer::fit(&rows);
        let x = matrix(&rows.iter().map(|r| scaler.apply(r)).collect::<Vec<_>>())?;
        let y: Vec<u32> = cases
            .iter()
            .map(|c| method_index(c.best()) as u32)
            .collect();
        let k = 3.min(cases.len());
        let model = Knn::fit(&x, &y, KNNClassifierParameters::default().with_k(k))
            .map_err(learner_error)?;
        Ok(Self { model, scaler })
    }
}

impl Chooser for WinnerKnn {
    fn choose(&self, features: &Features) -> &'static str {
        matrix(&[self.scaler.apply(&features.vector())])
            .ok()
            .and_then(|x| self.model.predict(&x).ok())
            .and_then(|y| METHODS.get(y[0] as usize))
            .map_or(default_method().name, |m| m.name)
    }
}

type Forest = RandomForestClassifier<f64, u32, DenseMatrix<f64>, Vec<u32>>;

/// A random forest classifying the winner.
struct WinnerForest(Forest);

impl WinnerForest {
    fn fit(cases: &[Case]) -> Result<Self> {
        let x = matrix(
            &cases
                .iter()
                .map(|c| c.features.vector())
                .collect::<Vec<_>>(),
        )?;
        let y: Vec<u32> = cases
            .iter()
            .map(|c| method_index(c.best()) as u32)
            .collect();
        let params = RandomForestClassifierParameters::default()
            .with_n_trees(100)
            .with_seed(7);
        Ok(Self(Forest::fit(&x, &y, params).map_err(learner_error)?))
    }
}

impl Chooser for WinnerForest {
    fn choose(&self, features: &Features) -> &'static str {
        matrix(&[features.vector()])
            .ok()
            .and_then(|x| self.0.predict(&x).ok())
            .and_then(|y| METHODS.get(y[0] as usize))
            .map_or(default_method().name, |m| m.name)
    }
}
