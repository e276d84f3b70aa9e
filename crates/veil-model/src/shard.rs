//! Which part of a model a process runs.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use crate::error::{ModelError, Result};

/// A contiguous range of a model's blocks, with or without the embedding in front and the final
/// norm and head behind. A whole model is the shard `0..n` with both ends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Shard {
    /// The blocks this shard runs, in model order.
    pub layers: Range<usize>,
    /// Whether the shard takes token ids (and embeds them) rather than hidden states.
    pub embedding: bool,
    /// Whether the shard ends in the final norm and head, returning logits.
    pub head: bool,
}

impl Shard {
    /// The whole model: embedding, every block, head.
    pub fn whole(block_count: usize) -> Self {
        Self {
            layers: 0..block_count,
            embedding: true,
            head: true,
        }
    }

    /// The shard for `layers` in a model of `block_count` blocks: it embeds when it starts at
    /// block 0 and applies the head when it ends at the last block.
    pub fn span(layers: Range<usize>, block_count: usize) -> Result<Self> {
        let shard = Self {
            embedding: layers.start == 0,
            head: layers.end == block_count,
            layers,
        };
        shard.check(block_count)?;
        Ok(shard)
    }

    /// Splits `0..block_count` at the given ranges, checking that they tile it with no gap.
    pub fn tiling(ranges: &[Range<usize>], block_count: usize) -> Result<Vec<Self>> {
        let mut next = 0;
        for r in ranges {
            if r.start != next {
                return Err(ModelError::InvalidShard(format!(
                    "ranges must cover 0..{block_count} in order without gaps or overlaps; {}..{} starts at {} but the previous ended at {next}",
                    r.start, r.end, r.start
                )));
            }
            next = r.end;
        }
        if next != block_count {
            return Err(ModelError::InvalidShard(format!(
                "ranges end at block {next}, but the model has {block_count} blocks"
            )));
        }
        ranges
            .iter()
            .map(|r| Self::span(r.clone(), block_count))
            .collect()
    }

    /// Checks the range against a model of `block_count` blocks.
    pub fn check(&self, block_count: usize) -> Result<()> {
        let Range { start, end } = self.layers;
        if start > end {
            return Err(ModelError::InvalidShard(format!(
                "layer range {start}..{end} is reversed"
            )));
        }
        if end > block_count {
            return Err(ModelError::InvalidShard(format!(
                "layer range {start}..{end} goes past the model's {block_count} blocks"
            )));
        }
        if start == end && !self.embedding && !self.head {
            return Err(ModelError::InvalidShard(format!(
                "layer range {start}..{end} is empty and the shard has neither embedding nor head"
            )));
        }
        Ok(())
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.layers.start, self.layers.end)?;
        if self.embedding {
            write!(f, "+embedding")?;
        }
        if self.head {
            write!(f, "+head")?;
        }
        Ok(())
    }
}

/// A layer range as users write it: `10-20` or `10..20`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRange(pub Range<usize>);

impl FromStr for LayerRange {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        let (a, b) = s
            .split_once("..")
            .or_else(|| s.split_once('-'))
            .ok_or_else(|| {
                ModelError::InvalidShard(format!("{s:?} is not a layer range like 0-10"))
            })?;
        let parse = |x: &str| {
            x.trim().parse::<usize>().map_err(|_| {
                ModelError::InvalidShard(format!("{s:?} is not a layer range like 0-10"))
            })
        };
        let (start, end) = (parse(a)?, parse(b)?);
        if start >= end {
            return Err(ModelError::InvalidShard(format!(
                "layer range {s:?} is empty or reversed"
            )));
        }
        Ok(Self(start..end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiling_accepts_a_cover_and_rejects_gaps() {
        let shards = Shard::tiling(&[0..10, 10..20, 20..30], 30).unwrap();
        assert!(shards[0].embedding && !shards[0].head);
        assert!(!shards[1].embedding && !shards[1].head);
        assert!(!shards[2].embedding && shards[2].head);
        assert!(Shard::tiling(&[0..10, 11..30], 30).is_err());
        assert!(Shard::tiling(&[0..10, 10..29], 30).is_err());
        assert!(Shard::tiling(&[0..10, 10..31], 30).is_err());
    }

    #[test]
    fn layer_ranges_parse_both_spellings() {
        assert_eq!("3-7".parse::<LayerRange>().unwrap().0, 3..7);
        assert_eq!("3..7".parse::<LayerRange>().unwrap().0, 3..7);
        assert!("7-3".parse::<LayerRange>().is_err());
        assert!("x-3".parse::<LayerRange>().is_err());
        assert!("5".parse::<LayerRange>().is_err());
    }

    #[test]
    fn shard_past_the_model_is_rejected() {
        assert!(Shard::span(20..31, 30).is_err());
        assert!(Shard::span(0..30, 30).unwrap().head);
    }
}
