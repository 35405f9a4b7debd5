//! k-nearest-neighbour classification of features by cosine similarity: the memory bank is the
//! train split, the queries the test split.

use burn::tensor::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::loss::l2_normalize;

/// How the k neighbours vote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Vote {
    /// InstDisc / lightly: each neighbour adds `exp(similarity / temperature)` to its class.
    Weighted,
    /// Plain majority (the article's scikit-learn classifier): one vote per neighbour.
    Majority,
}

/// Top-1 and top-5 accuracy, fractions in [0, 1].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct KnnAccuracy {
    pub top1: f64,
    pub top5: f64,
}

/// Each class's score from the neighbours' similarities and labels.
pub fn class_scores(
    similarities: &[f32],
    labels: &[usize],
    num_classes: usize,
    vote: Vote,
    temperature: f64,
) -> Vec<f64> {
    let mut scores = vec![0.0; num_classes];
    for (&sim, &label) in similarities.iter().zip(labels) {
        scores[label] += match vote {
            Vote::Weighted => (sim as f64 / temperature).exp(),
            Vote::Majority => 1.0,
        };
    }
    scores
}

/// Classes from best to worst score; equal scores rank the lower class index first (as
/// scikit-learn's majority vote does).
pub fn rank_classes(scores: &[f64]) -> Vec<usize> {
    let mut classes: Vec<usize> = (0..scores.len()).collect();
    classes.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    classes
}

/// Query rows per similarity block: bounds memory to `CHUNK x bank` floats.
const CHUNK: usize = 256;

/// The `k` largest values of each row of the row-major `values` (rows of `columns`), best
/// first, equal values in column order: `(value, column)`, `k` per row.
///
/// On the host rather than burn's `topk_with_indices`: on wgpu (cubecl 0.11) that returned
/// indices of `-1` for `k` = 200 (as cubek's issue 422 reports for NVIDIA under Vulkan),
/// and kNN's k is 200. The similarity block is read back anyway for the votes.
fn top_k_per_row(values: &[f32], columns: usize, k: usize) -> Vec<(f32, usize)> {
    let k = k.min(columns);
    let mut best = vec![(0.0, 0); values.len() / columns.max(1) * k];
    if k == 0 {
        return best;
    }
    best.par_chunks_mut(k)
        .zip(values.par_chunks(columns))
        .for_each_init(Vec::new, |order, (best, row)| {
            let better = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
            order.clear();
            order.extend(0..columns);
            if k < columns {
                order.select_nth_unstable_by(k - 1, better);
            }
            let first = &mut order[..k];
            first.sort_unstable_by(better);
            for (b, &column) in best.iter_mut().zip(first.iter()) {
                *b = (row[column], column);
            }
        });
    best
}

/// Classifies every row of `queries` by its `k` most cosine-similar rows of `bank`, for each
/// `k` in `ks` from one similarity pass (each k is capped at the bank's size), and scores the
/// rankings against `query_labels`.
#[allow(clippy::too_many_arguments)]
pub fn knn_accuracies(
    bank: Tensor<2>,
    bank_labels: &[usize],
    queries: Tensor<2>,
    query_labels: &[usize],
    num_classes: usize,
    ks: &[usize],
    vote: Vote,
    temperature: f64,
) -> Vec<KnnAccuracy> {
    let [bank_len, _] = bank.dims();
    let [query_len, _] = queries.dims();
    assert_eq!(bank_len, bank_labels.len());
    assert_eq!(query_len, query_labels.len());
    let ks: Vec<usize> = ks.iter().map(|&k| k.clamp(1, bank_len)).collect();
    let k_max = ks.iter().copied().max().unwrap_or(1);
    let bank_t = l2_normalize(bank).transpose();
    let queries = l2_normalize(queries);
    let mut hits = vec![(0usize, 0usize); ks.len()];
    for start in (0..query_len).step_by(CHUNK) {
        let end = (start + CHUNK).min(query_len);
        let block = queries.clone().slice_dim(0, start..end);
        let block: Vec<f32> = block.matmul(bank_t.clone()).into_data().iter().collect();
        let nearest = top_k_per_row(&block, bank_len, k_max);
        for (neighbours, label) in nearest.chunks(k_max).zip(&query_labels[start..end]) {
            let sims: Vec<f32> = neighbours.iter().map(|&(sim, _)| sim).collect();
            let labels: Vec<usize> = neighbours.iter().map(|&(_, i)| bank_labels[i]).collect();
            for (&k, hit) in ks.iter().zip(hits.iter_mut()) {
                let scores = class_scores(&sims[..k], &labels[..k], num_classes, vote, temperature);
                let ranking = rank_classes(&scores);
                hit.0 += usize::from(ranking[0] == *label);
                hit.1 += usize::from(ranking.iter().take(5).any(|c| c == label));
            }
        }
    }
    let n = query_len as f64;
    hits.iter()
        .map(|&(t1, t5)| KnnAccuracy {
            top1: t1 as f64 / n,
            top5: t5 as f64 / n,
        })
        .collect()
}

/// [`knn_accuracies`] for a single `k`.
#[allow(clippy::too_many_arguments)]
pub fn knn_accuracy(
    bank: Tensor<2>,
    bank_labels: &[usize],
    queries: Tensor<2>,
    query_labels: &[usize],
    num_classes: usize,
    k: usize,
    vote: Vote,
    temperature: f64,
) -> KnnAccuracy {
    knn_accuracies(
        bank,
        bank_labels,
        queries,
        query_labels,
        num_classes,
        &[k],
        vote,
        temperature,
    )[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn matrix(rows: &[[f32; 2]]) -> Tensor<2> {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_data(TensorData::new(flat, [rows.len(), 2]), &Device::default())
    }

    #[test]
    fn weighted_vote_sums_exp_similarity_over_temperature() {
        let scores = class_scores(&[0.9, 0.5, 0.4], &[1, 0, 0], 3, Vote::Weighted, 0.1);
        assert!((scores[1] - 9f64.exp()).abs() < 1e-3 * 9f64.exp());
        assert!((scores[0] - (5f64.exp() + 4f64.exp())).abs() < 1e-3 * 5f64.exp());
        assert_eq!(scores[2], 0.0);
        assert_eq!(rank_classes(&scores)[0], 1);
        // Majority: two votes beat one closer neighbour.
        let scores = class_scores(&[0.9, 0.5, 0.4], &[1, 0, 0], 3, Vote::Majority, 0.1);
        assert_eq!(scores, vec![2.0, 1.0, 0.0]);
        assert_eq!(rank_classes(&scores), vec![0, 1, 2]);
    }

    /// Against a full sort of each row, with ties (equal values rank by column) and a `k`
    /// beyond the row.
    #[test]
    fn top_k_per_row_is_the_head_of_each_sorted_row() {
        let columns = 37;
        let values: Vec<f32> = (0..5 * columns)
            .map(|i| ((i * 7919) % 23) as f32 - 11.0)
            .collect();
        for k in [1, 5, 36, 37, 50] {
            let best = top_k_per_row(&values, columns, k);
            let k = k.min(columns);
            assert_eq!(best.len(), 5 * k);
            for (row, best) in values.chunks(columns).zip(best.chunks(k)) {
                let mut sorted: Vec<(f32, usize)> = row.iter().copied().zip(0..).collect();
                sorted.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                assert_eq!(best, &sorted[..k], "k = {k}");
            }
        }
    }

    #[test]
    fn ties_go_to_the_lower_class() {
        assert_eq!(rank_classes(&[1.0, 2.0, 2.0, 0.0]), vec![1, 2, 0, 3]);
    }

    #[test]
    fn toy_bank_hand_computed() {
        // Bank: class 0 points right, class 1 points up.
        let bank = matrix(&[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]);
        let bank_labels = [0, 0, 1, 1];
        let queries = matrix(&[[1.0, 0.2], [0.2, 1.0], [-1.0, 0.05]]);
        // Third query is nearest to class 1 ([0,1] has cosine ~0.05 vs -1 for [1,0]).
        let labels = [0, 1, 1];
        let acc = knn_accuracy(
            bank.clone(),
            &bank_labels,
            queries.clone(),
            &labels,
            2,
            1,
            Vote::Majority,
            0.1,
        );
        assert_eq!(acc.top1, 1.0);
        assert_eq!(acc.top5, 1.0);
        // k larger than the bank uses the whole bank: majority over 2 vs 2 is a tie, class 0 wins.
        let acc = knn_accuracy(
            bank.clone(),
            &bank_labels,
            queries.clone(),
            &labels,
            2,
            50,
            Vote::Majority,
            0.1,
        );
        assert!((acc.top1 - 1.0 / 3.0).abs() < 1e-12, "{acc:?}");
        // Weighted over the whole bank still separates them by similarity.
        let acc = knn_accuracy(
            bank,
            &bank_labels,
            queries,
            &labels,
            2,
            50,
            Vote::Weighted,
            0.1,
        );
        assert_eq!(acc.top1, 1.0);
    }
}
