//! The handwritten digits the private models are trained and tested on (see
//! `datasets/digits/README.md`).

use std::io::{BufRead, BufReader};
use std::path::Path;

use crate::error::{Result, ZkError};
use crate::model::INPUTS;

/// One image and its label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digit {
    /// 8×8 pixel counts, 0..16, row by row.
    pub pixels: Vec<u8>,
    /// 0..9.
    pub label: u8,
}

/// Reads `digits.csv.gz`: 64 pixels and a label per line.
pub fn read_digits(path: &Path) -> Result<Vec<Digit>> {
    let error = |why: String| ZkError::BadData(format!("{}: {why}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| error(e.to_string()))?;
    let mut digits = Vec::new();
    for (n, line) in BufReader::new(flate2::read::GzDecoder::new(file))
        .lines()
        .enumerate()
    {
        let line = line.map_err(|e| error(e.to_string()))?;
        let values: Vec<u8> = line
            .split(',')
            .map(|v| v.trim().parse::<u8>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| error(format!("line {}: {e}", n + 1)))?;
        if values.len() != INPUTS + 1
            || values[..INPUTS].iter().any(|&p| p > 16)
            || values[INPUTS] > 9
        {
            return Err(error(format!(
                "line {}: not 64 pixels of 0..16 and a digit",
                n + 1
            )));
        }
        digits.push(Digit {
            pixels: values[..INPUTS].to_vec(),
            label: values[INPUTS],
        });
    }
    if digits.is_empty() {
        return Err(error("no digits".into()));
    }
    Ok(digits)
}

/// Training and test sets: every fifth digit is held out for testing.
pub fn split(digits: &[Digit]) -> (Vec<Digit>, Vec<Digit>) {
    let (test, train): (Vec<_>, Vec<_>) = digits
        .iter()
        .cloned()
        .enumerate()
        .partition(|(i, _)| i % 5 == 4);
    (
        train.into_iter().map(|(_, d)| d).collect(),
        test.into_iter().map(|(_, d)| d).collect(),
    )
}
