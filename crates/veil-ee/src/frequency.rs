//! Frequency analysis: what a node learns from the encrypted token stream alone.
//!
//! A vocabulary permutation is a substitution cipher over ~49k symbols, so the classic attack
//! applies: pair ciphertext ids with plaintext ids by frequency rank against a reference text,
//! then hill-climb on a language-model score of the decryption. The language model is the
//! reference text's bigram and unigram counts, and the score is Jakobsen's: how far the
//! decryption's counts lie from the counts the reference predicts for a stream this long. (Its
//! log-likelihood under a smoothed bigram model did worse: it hands rare ids whatever fits their
//! few neighbours, and recovered 12–33% where this recovers 33–68%.) A change is rescored in
//! microseconds, where the 135M-parameter model would need a forward pass over the stream, so the
//! figures are a lower bound on what a patient attacker holding the plaintext model recovers.
//!
//! Written by hand because no maintained crate solves substitution ciphers over token ids.

use std::collections::HashMap;

/// Knobs of the search; the defaults are what the measurements in THREAT_MODEL.md used.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrequencyAttack {
    /// Full sweeps over the ciphertext ids; the climb stops earlier once a sweep changes nothing.
    pub max_sweeps: usize,
    /// How far from its frequency rank a plaintext candidate may lie, at least.
    pub min_window: usize,
}

impl Default for FrequencyAttack {
    fn default() -> Self {
        Self {
            max_sweeps: 8,
            min_window: 24,
        }
    }
}

/// A guess for every ciphertext id in the stream, before and after the climb.
#[derive(Debug, Clone, PartialEq)]
pub struct FrequencyGuess {
    /// Ciphertext id to plaintext id from frequency ranks alone.
    pub by_rank: HashMap<u32, u32>,
    /// Ciphertext id to plaintext id after hill climbing.
    pub climbed: HashMap<u32, u32>,
    /// Changes the climb accepted.
    pub moves: usize,
}

impl FrequencyGuess {
    /// Share of the stream's token occurrences that `guess` decrypts right; `truth` maps a
    /// ciphertext id to its plaintext id (the key holder's view, used only to score).
    pub fn recovered(guess: &HashMap<u32, u32>, cipher: &[u32], truth: impl Fn(u32) -> u32) -> f64 {
        let right = cipher
            .iter()
            .filter(|&&c| guess.get(&c) == Some(&truth(c)))
            .count();
        right as f64 / cipher.len().max(1) as f64
    }
}

impl FrequencyAttack {
    /// Guesses the plaintext of every id in `cipher` from a plaintext `reference` stream over
    /// the same vocabulary of `vocab` ids. Ids at or past `vocab` are ignored.
    pub fn run(&self, reference: &[u32], cipher: &[u32], vocab: usize) -> FrequencyGuess {
        let reference: Vec<u32> = reference
            .iter()
            .copied()
            .filter(|&t| (t as usize) < vocab)
            .collect();
        let cipher: Vec<u32> = cipher
            .iter()
            .copied()
            .filter(|&t| (t as usize) < vocab)
            .collect();
        let lm = ReferenceCounts::new(&reference, vocab, cipher.len());
        let stream = CipherStream::new(&cipher);

        // Plaintext ids by reference frequency, every id included so unseen ones can be tried.
        let mut plain_by_rank: Vec<u32> = (0..vocab as u32).collect();
        plain_by_rank.sort_by_key(|&p| (std::cmp::Reverse(lm.unigram[p as usize]), p));

        // guess[i] is the plaintext id for stream.ids[i]; owner[p] the stream index holding p.
        let mut guess: Vec<u32> = plain_by_rank[..stream.ids.len()].to_vec();
        let mut owner: Vec<Option<usize>> = vec![None; vocab];
        for (i, &p) in guess.iter().enumerate() {
            owner[p as usize] = Some(i);
        }
        let by_rank = stream.as_map(&guess);

        let mut moves = 0;
        for _ in 0..self.max_sweeps {
            let mut changed = 0;
            for i in 0..stream.ids.len() {
                // Candidates around this id's rank; rarer ids have noisier ranks, so wider windows.
                let window = (self.min_window + i / 4).min(self.min_window * 20);
                let from = i.saturating_sub(window);
                let to = (i + window + 1).min(vocab);
                let mut best: Option<(f64, u32)> = None;
                for &p in &plain_by_rank[from..to] {
                    if p == guess[i] {
                        continue;
                    }
                    let delta = stream.delta(&lm, &guess, i, p, owner[p as usize]);
                    if delta > 1e-9 && best.is_none_or(|(d, _)| delta > d) {
                        best = Some((delta, p));
                    }
                }
                if let Some((_, p)) = best {
                    let old = guess[i];
                    if let Some(j) = owner[p as usize] {
                        guess[j] = old;
                        owner[old as usize] = Some(j);
                    } else {
                        owner[old as usize] = None;
                    }
                    guess[i] = p;
                    owner[p as usize] = Some(i);
                    changed += 1;
                }
            }
            moves += changed;
            if changed == 0 {
                break;
            }
        }
        FrequencyGuess {
            by_rank,
            climbed: stream.as_map(&guess),
            moves,
        }
    }
}

/// Unigram and bigram counts of the reference text, scaled to the ciphertext's length: what a
/// correct decryption's counts should look like.
struct ReferenceCounts {
    unigram: Vec<u32>,
    pairs: HashMap<(u32, u32), u32>,
    /// Ciphertext tokens per reference token.
    scale: f64,
}

impl ReferenceCounts {
    fn new(reference: &[u32], vocab: usize, cipher_len: usize) -> Self {
        let mut unigram = vec![0u32; vocab];
        for &t in reference {
            unigram[t as usize] += 1;
        }
        let mut pairs = HashMap::new();
        for w in reference.windows(2) {
            *pairs.entry((w[0], w[1])).or_insert(0) += 1;
        }
        Self {
            unigram,
            pairs,
            scale: cipher_len as f64 / reference.len().max(1) as f64,
        }
    }

    /// Score of `n` occurrences of the decrypted bigram `(a, b)`: minus its count distance
    /// `|n - e|` from the expected count `e`, plus `e` so that cells never seen in the
    /// ciphertext (where the distance is just `e`) need no visiting.
    fn pair_score(&self, n: u32, a: u32, b: u32) -> f64 {
        let e = self.pairs.get(&(a, b)).copied().unwrap_or(0) as f64 * self.scale;
        e - (n as f64 - e).abs()
    }

    /// The same for `n` occurrences of a ciphertext id decrypted to `p`.
    fn unigram_score(&self, n: u32, p: u32) -> f64 {
        let e = self.unigram[p as usize] as f64 * self.scale;
        e - (n as f64 - e).abs()
    }
}

/// The ciphertext's distinct ids (most frequent first) and bigram counts between them.
struct CipherStream {
    /// Distinct ciphertext ids, most frequent first.
    ids: Vec<u32>,
    counts: Vec<u32>,
    /// For each distinct id, (next id index, count) over the stream's bigrams.
    next: Vec<Vec<(usize, u32)>>,
    /// For each distinct id, (previous id index, count).
    prev: Vec<Vec<(usize, u32)>>,
}

impl CipherStream {
    fn new(cipher: &[u32]) -> Self {
        let mut count: HashMap<u32, u32> = HashMap::new();
        for &c in cipher {
            *count.entry(c).or_insert(0) += 1;
        }
        let mut ids: Vec<u32> = count.keys().copied().collect();
        ids.sort_by_key(|c| (std::cmp::Reverse(count[c]), *c));
        let index: HashMap<u32, usize> = ids.iter().enumerate().map(|(i, &c)| (c, i)).collect();
        let mut pairs: HashMap<(usize, usize), u32> = HashMap::new();
        for w in cipher.windows(2) {
            *pairs.entry((index[&w[0]], index[&w[1]])).or_insert(0) += 1;
        }
        let mut next = vec![Vec::new(); ids.len()];
        let mut prev = vec![Vec::new(); ids.len()];
        for (&(a, b), &n) in &pairs {
            next[a].push((b, n));
            prev[b].push((a, n));
        }
        // Sorted, so the climb (which sums scores in list order) repeats exactly.
        next.iter_mut()
            .chain(prev.iter_mut())
            .for_each(|l| l.sort_unstable());
        Self {
            counts: ids.iter().map(|c| count[c]).collect(),
            ids,
            next,
            prev,
        }
    }

    fn as_map(&self, guess: &[u32]) -> HashMap<u32, u32> {
        self.ids
            .iter()
            .copied()
            .zip(guess.iter().copied())
            .collect()
    }

    /// Change in the score if id `i` decrypted to `p` (and `j`, the id that
    /// now decrypts to `p`, if any, took `i`'s old plaintext). Only bigrams touching `i` or `j`
    /// change, so only those are rescored.
    fn delta(
        &self,
        lm: &ReferenceCounts,
        guess: &[u32],
        i: usize,
        p: u32,
        j: Option<usize>,
    ) -> f64 {
        let old_i = guess[i];
        let moved = |k: usize| -> u32 {
            if k == i {
                p
            } else if Some(k) == j {
                old_i
            } else {
                guess[k]
            }
        };
        let mut delta = 0.0;
        let mut rescore = |a: usize, b: usize, n: u32| {
            delta += lm.pair_score(n, moved(a), moved(b)) - lm.pair_score(n, guess[a], guess[b]);
        };
        // Each affected bigram once: (i, *) from next[i]; (*, i) from prev[i] except (i, i);
        // then j's, skipping those already counted through i.
        for &(b, n) in &self.next[i] {
            rescore(i, b, n);
        }
        for &(a, n) in &self.prev[i] {
            if a != i {
                rescore(a, i, n);
            }
        }
        if let Some(j) = j {
            for &(b, n) in &self.next[j] {
                if b != i {
                    rescore(j, b, n);
                }
            }
            for &(a, n) in &self.prev[j] {
                if a != i && a != j {
                    rescore(a, j, n);
                }
            }
        }
        delta += lm.unigram_score(self.counts[i], p) - lm.unigram_score(self.counts[i], old_i);
        if let Some(j) = j {
            delta += lm.unigram_score(self.counts[j], old_i) - lm.unigram_score(self.counts[j], p);
        }
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    /// A stream from a random sparse Markov chain with Zipf-like unigram weights: English-like
    /// enough that frequency ranks alone are ambiguous and the bigrams settle them.
    fn markov_stream(vocab: usize, len: usize, rng: &mut ChaCha20Rng) -> Vec<u32> {
        let successors: Vec<Vec<u32>> = (0..vocab)
            .map(|_| {
                (0..6)
                    .map(|_| {
                        // Zipf-ish: small ids far more likely.
                        let u: f64 = rng.random_range(0.0..1.0);
                        ((vocab as f64).powf(u) - 1.0) as u32
                    })
                    .collect()
            })
            .collect();
        let mut t = 0u32;
        (0..len)
            .map(|_| {
                let next = &successors[t as usize];
                t = next[rng.random_range(0..next.len())];
                t
            })
            .collect()
    }

    #[test]
    fn the_climb_recovers_more_than_ranks_alone() {
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let vocab = 400;
        let text = markov_stream(vocab, 60_000, &mut rng);
        let (reference, plain) = text.split_at(40_000);
        let mut key: Vec<u32> = (0..vocab as u32).collect();
        key.shuffle(&mut rng);
        let inverse = crate::key::inverse(&key);
        let cipher: Vec<u32> = plain.iter().map(|&t| key[t as usize]).collect();

        let guess = FrequencyAttack::default().run(reference, &cipher, vocab);
        let truth = |c: u32| inverse[c as usize];
        let by_rank = FrequencyGuess::recovered(&guess.by_rank, &cipher, truth);
        let climbed = FrequencyGuess::recovered(&guess.climbed, &cipher, truth);
        assert!(guess.moves > 0);
        assert!(climbed > 0.9, "climbed {climbed}, by rank {by_rank}");
        assert!(
            climbed > by_rank + 0.2,
            "climbed {climbed}, by rank {by_rank}"
        );
    }

    #[test]
    fn a_wrong_truth_scores_near_zero() {
        let mut rng = ChaCha20Rng::seed_from_u64(12);
        let text = markov_stream(200, 20_000, &mut rng);
        let guess = FrequencyAttack::default().run(&text[..10_000], &text[10_000..], 200);
        // With the identity as the key the climb should find it; a shifted truth must not match.
        let right = FrequencyGuess::recovered(&guess.climbed, &text[10_000..], |c| c);
        let wrong = FrequencyGuess::recovered(&guess.climbed, &text[10_000..], |c| (c + 1) % 200);
        assert!(right > 0.9, "{right}");
        assert!(wrong < 0.05, "{wrong}");
    }

    #[test]
    fn out_of_range_ids_and_empty_streams_are_harmless() {
        let guess = FrequencyAttack::default().run(&[], &[5, 99, 5], 10);
        assert_eq!(guess.climbed.len(), 1);
        let guess = FrequencyAttack::default().run(&[1, 2, 3], &[], 10);
        assert!(guess.climbed.is_empty());
        assert_eq!(FrequencyGuess::recovered(&guess.climbed, &[], |c| c), 0.0);
    }
}
