//! Leave-one-group-out evaluation: each group of cases (a workload, or a model) is held out in
//! turn, every learner trains on the rest and picks a method for each held-out case; accuracy
//! counts picks of the fastest method, regret how much slower a pick was than the fastest.

use std::collections::BTreeMap;

use crate::error::{MetaError, Result};
use crate::selector::{Case, Learner};

/// What is held out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldOut {
    /// One workload at a time (on every model and machine it ran on).
    Workloads,
    /// One model at a time.
    Models,
}

impl HeldOut {
    fn group(self, case: &Case) -> String {
        match self {
            Self::Workloads => serde_json::to_string(&case.features.workload).unwrap_or_default(),
            Self::Models => case.features.model.name.clone(),
        }
    }
}

/// One row of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    /// The learner (or oracle, random).
    pub name: &'static str,
    /// Share of held-out cases where it picked the fastest method (within the tie margin,
    /// the simplest).
    pub accuracy: f64,
    /// Share where it picked the cheapest method however small its lead.
    pub strict_accuracy: f64,
    /// Mean over held-out cases of (cost of the pick / cost of the fastest − 1).
    pub mean_regret: f64,
    /// The held-out cases it got wrong: (workload, fastest, pick, regret).
    pub misses: Vec<Miss>,
}

/// A held-out case where a learner did not pick the fastest method.
#[derive(Debug, Clone, PartialEq)]
pub struct Miss {
    /// The workload's features.
    pub workload: crate::WorkloadFeatures,
    /// The fastest method.
    pub best: &'static str,
    /// What the learner picked.
    pub pick: &'static str,
    /// How much more the pick cost.
    pub regret: f64,
}

/// Scores the oracle, random choice and every learner with `held_out` groups left out in
/// turn.
pub fn evaluate(cases: &[Case], held_out: HeldOut) -> Result<Vec<Score>> {
    let mut groups: BTreeMap<String, Vec<&Case>> = BTreeMap::new();
    for c in cases {
        groups.entry(held_out.group(c)).or_default().push(c);
    }
    if groups.len() < 2 {
        return Err(MetaError::NotEnoughData(format!(
            "{} group(s) of {held_out:?}: holding one out needs at least two",
            groups.len()
        )));
    }
    let n = cases.len() as f64;
    let random_accuracy = cases
        .iter()
        .map(|c| 1.0 / c.costs.len() as f64)
        .sum::<f64>()
        / n;
    let random_regret = cases
        .iter()
        .map(|c| c.costs.keys().map(|m| c.regret(m)).sum::<f64>() / c.costs.len() as f64)
        .sum::<f64>()
        / n;
    let mut scores = vec![
        Score {
            name: "oracle",
            accuracy: 1.0,
            strict_accuracy: 1.0,
            mean_regret: 0.0,
            misses: Vec::new(),
        },
        Score {
            name: "random choice",
            accuracy: random_accuracy,
            strict_accuracy: random_accuracy,
            mean_regret: random_regret,
            misses: Vec::new(),
        },
    ];
    for learner in Learner::ALL {
        let (mut hits, mut strict, mut regret, mut misses) = (0usize, 0usize, 0.0, Vec::new());
        for (held, tested) in &groups {
            let training: Vec<Case> = groups
                .iter()
                .filter(|(g, _)| *g != held)
                .flat_map(|(_, cs)| cs.iter().map(|c| (*c).clone()))
                .collect();
            let chooser = learner.fit(&training)?;
            for case in tested {
                let pick = chooser.choose(&case.features);
                hits += usize::from(pick == case.best());
                strict += usize::from(pick == case.cheapest());
                regret += case.regret(pick);
                if pick != case.best() {
                    misses.push(Miss {
                        workload: case.features.workload.clone(),
                        best: case.best(),
                        pick,
                        regret: case.regret(pick),
                    });
                }
            }
        }
        scores.push(Score {
            name: learner.name(),
            accuracy: hits as f64 / n,
            strict_accuracy: strict as f64 / n,
            mean_regret: regret / n,
            misses,
        });
    }
    Ok(scores)
}
