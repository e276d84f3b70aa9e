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
    /// The cost model, a gradient-boosted regressor per method of its cost relative to plain.
    CostModel,
    /// Veil's selector: the cost model, gradient boosting on the winner and kNN voting; the
    /// cost model breaks a three-way split.
    Vote,
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
    pub const ALL: [Learner; 6] = [
        Self::Vote,
        Self::CostModel,
        Self::SingleBest,
        Self::GradientBoosting,
        Self::Knn,
        Self::RandomForest,
    ];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::CostModel => "cost model",
            Self::Vote => "veil (vote: cost, winner, kNN)",
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
            Self::Vote => Box::new(Vote::fit(cases)?),
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

/// Each case's feature vector, a row per case.
fn feature_rows(cases: &[Case]) -> Vec<Vec<f64>> {
    cases.iter().map(|c| c.features.vector()).collect()
}

/// Each case's fastest method as a class label (its index in [`METHODS`]).
fn winner_labels(cases: &[Case]) -> Vec<u32> {
    cases
        .iter()
        .map(|c| method_index(c.best()) as u32)
        .collect()
}

/// The method a classifier's first label names.
fn labelled(y: &[u32]) -> &'static str {
    y.first()
        .and_then(|&i| METHODS.get(i as usize))
        .map_or(default_method().name, |m| m.name)
}

fn method_index(name: &str) -> usize {
    METHODS.iter().position(|m| m.name == name).unwrap_or(0)
}

type Regressor = XGRegressor<f64, f64, DenseMatrix<f64>, Vec<f64>>;

fn boosting() -> XGRegressorParameters {
    XGRegressorParameters::default()
        .with_n_estimators(200)
        .with_learning_rate(0.1)
        .with_max_depth(4)
        .with_base_score(0.0)
}

/// Veil's selector: predicts each method's cost relative to plain (one regressor per method,
/// over the workload, model and machine features), takes the cheapest.
pub struct CostModel {
    /// Each method but plain, with its regressor of ln(cost / plain's cost).
    models: Vec<(&'static Method, Regressor)>,
    tie_margin: f64,
}

impl CostModel {
    /// Fits the cost model on every measured (case, method) pair.
    pub fn fit(cases: &[Case]) -> Result<Self> {
        if cases.is_empty() {
            return Err(MetaError::NotEnoughData(
                "no complete cases to learn from".into(),
            ));
        }
        let plain = default_method().name;
        let mut models = Vec::new();
        for m in METHODS.iter().filter(|m| m.name != plain) {
            let (rows, targets): (Vec<Vec<f64>>, Vec<f64>) = cases
                .iter()
                .filter_map(|c| {
                    Some((
                        c.features.vector(),
                        (c.costs.get(m.name)? / c.costs[plain]).ln(),
                    ))
                })
                .unzip();
            if rows.is_empty() {
                continue;
            }
            let model =
                Regressor::fit(&matrix(&rows)?, &targets, boosting()).map_err(learner_error)?;
            models.push((m, model));
        }
        let tie_margin = cases.first().map_or(0.0, |c| c.tie_margin);
        Ok(Self { models, tie_margin })
    }

    /// Predicted cost of each method relative to plain (1.0 = the same).
    pub fn predict(&self, features: &Features) -> Vec<(&'static str, f64)> {
        let Ok(x) = matrix(&[features.vector()]) else {
            return vec![(default_method().name, 1.0)];
        };
        let mut out = vec![(default_method().name, 1.0)];
        for (m, model) in &self.models {
            if !m.applies_to(&features.workload) {
                continue;
            }
            if let Some(p) = model.predict(&x).ok().and_then(|p| p.first().copied()) {
                out.push((m.name, p.exp()));
            }
        }
        out
    }
}

impl Chooser for CostModel {
    fn choose(&self, features: &Features) -> &'static str {
        // A predicted gain within the tie margin is not worth a more complex method.
        simplest_within(self.predict(features).into_iter(), self.tie_margin)
            .unwrap_or(default_method().name)
    }
}

/// Veil's selector as `--accel auto` uses it: the vote of the cost model, gradient boosting
/// on the winner and kNN (the best of the learners on the committed dataset, held out one
/// workload at a time, once it held batches of 16; the cost model alone was before).
pub struct Selector(Vote);

impl Selector {
    /// Fits the learners on `cases` (milliseconds for the committed dataset, so
    /// `--accel auto` fits them at start).
    pub fn fit(cases: &[Case]) -> Result<Self> {
        Ok(Self(Vote::fit(cases)?))
    }

    /// Predicted cost of each applicable method relative to plain (the cost model's).
    pub fn predict(&self, features: &Features) -> Vec<(&'static str, f64)> {
        self.0.cost.predict(features)
    }

    /// Methods in order of preference: the pick, then the rest by predicted cost (for when
    /// the pick cannot run, say in another weight format).
    pub fn rank(&self, features: &Features) -> Vec<&'static str> {
        let first = self.choose(features);
        let mut rest = self.0.cost.predict(features);
        rest.sort_by(|a, b| a.1.total_cmp(&b.1));
        std::iter::once(first)
            .chain(rest.into_iter().map(|(m, _)| m).filter(|m| *m != first))
            .collect()
    }
}

impl Chooser for Selector {
    fn choose(&self, features: &Features) -> &'static str {
        let pick = self.0.choose(features);
        // The learners that name the winner may name a method whose mechanism is idle here
        // (batching a single request): on this workload it is the simpler method.
        method(pick).map_or(pick, |m| m.on(&features.workload).name)
    }
}

/// Three learners that see the problem differently, voting: the cost model predicts how much
/// each method saves, gradient boosting learns where each method wins, kNN follows the
/// nearest measured workloads; a split vote goes to the cost model.
struct Vote {
    cost: CostModel,
    winner: WinnerBoosting,
    neighbours: WinnerKnn,
}

impl Vote {
    fn fit(cases: &[Case]) -> Result<Self> {
        Ok(Self {
            cost: CostModel::fit(cases)?,
            winner: WinnerBoosting::fit(cases)?,
            neighbours: WinnerKnn::fit(cases)?,
        })
    }
}

impl Chooser for Vote {
    fn choose(&self, features: &Features) -> &'static str {
        let cost = self.cost.choose(features);
        let winner = self.winner.choose(features);
        let near = self.neighbours.choose(features);
        if winner == near {
            winner
        } else {
            cost
        }
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
        let x = matrix(&feature_rows(cases))?;
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
        let rows = feature_rows(cases);
        let scaler = Standardizer::fit(&rows);
        let x = matrix(&rows.iter().map(|r| scaler.apply(r)).collect::<Vec<_>>())?;
        let y = winner_labels(cases);
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
            .map_or(default_method().name, |y| labelled(&y))
    }
}

type Forest = RandomForestClassifier<f64, u32, DenseMatrix<f64>, Vec<u32>>;

/// A random forest classifying the winner.
struct WinnerForest(Forest);

impl WinnerForest {
    fn fit(cases: &[Case]) -> Result<Self> {
        let x = matrix(&feature_rows(cases))?;
        let y = winner_labels(cases);
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
            .map_or(default_method().name, |y| labelled(&y))
    }
}
