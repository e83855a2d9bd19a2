//! A learnable synthetic task: each sequence is `<bos> w_a succ(w_a) succ²(w_a) ...` for
//! a seeded permutation `succ` of the words. The first word is random, so its label is masked;
//! every later token is determined by the one before (there is no end token: where a sequence
//! stops is random), so a working trainer drives the loss toward zero. Lengths vary, so batches are padded and token counts are uneven.

use rand_chacha::ChaCha8Rng;
use rand_core::RngCore;

use crate::data::batch::{Batch, IGNORE};
use crate::data::tokenizer::Specials;
use crate::weights::stream;

/// The successor task over a tokenizer's words.
#[derive(Debug, Clone)]
pub struct SuccessorTask {
    sp: Specials,
    succ: Vec<usize>,
}

fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

impl SuccessorTask {
    /// A task over the first `n_words` words (all when larger) whose permutation is drawn
    /// from `seed`.
    pub fn new(mut sp: Specials, seed: u64, n_words: usize) -> Self {
        sp.words.truncate(n_words.max(2));
        let n = sp.words.len();
        let mut rng = stream(seed, "successor_task");
        // A single cycle (Sattolo's algorithm), so every chain is long.
        let mut succ: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = below(&mut rng, i);
            succ.swap(i, j);
        }
        SuccessorTask { sp, succ }
    }

    /// The special ids.
    pub fn specials(&self) -> &Specials {
        &self.sp
    }

    /// One sequence of `len` words after `<bos>`, and its labels.
    pub fn sequence(&self, rng: &mut ChaCha8Rng, len: usize) -> (Vec<u32>, Vec<i64>) {
        let mut w = below(rng, self.succ.len());
        let mut ids = vec![self.sp.bos];
        for _ in 0..len {
            ids.push(self.sp.words[w]);
            w = self.succ[w];
        }
        let mut labels: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        labels[0] = IGNORE;
        labels[1] = IGNORE; // the random first word cannot be predicted
        (ids, labels)
    }

    /// `n` micro-batches of `batch` sequences with 2..=`max_len` words each, from `seed`.
    pub fn batches(&self, seed: u64, n: usize, batch: usize, max_len: usize) -> Vec<Batch> {
        let mut rng = stream(seed, "successor_batches");
        (0..n)
            .map(|_| {
                let seqs: Vec<(Vec<u32>, Vec<i64>)> = (0..batch)
                    .map(|_| {
                        let len = 2 + below(&mut rng, max_len.max(2) - 1);
                        self.sequence(&mut rng, len)
                    })
                    .collect();
                let s = seqs.iter().map(|(i, _)| i.len()).max().unwrap_or(0);
                let ids = seqs.iter().map(|(i, _)| pad(i, s, self.sp.pad)).collect();
                let labels = seqs.iter().map(|(_, l)| pad(l, s, IGNORE)).collect();
                Batch { ids, labels, attention_mask: None }
            })
            .collect()
    }
}

fn pad<T: Copy>(v: &[T], len: usize, with: T) -> Vec<T> {
    v.iter().copied().chain(std::iter::repeat(with)).take(len).collect()
}
