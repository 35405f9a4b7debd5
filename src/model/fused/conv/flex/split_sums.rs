//! Weight gradients by im2col whose sums are split over the threads, each adding its chunks
//! of samples into a partial `[taps, C_out]` of its own (f32 on gemm, bf16 on AMX tiles).

use super::amx_path::{AMX_GRADIENT_B_BYTES, add_chunk_on_amx};
use super::geometry::Geometry;
use super::{gemm_into, prefix, side_by_side};
use crate::model::fused::batch_norm::flex::ChannelNorm;
use crate::model::fused::{as_slots, transpose16, wide, written_by_runs};
use rayon::prelude::*;

/// Floats of im2col per chunk of an f32 weight gradient split over the threads
/// (`add_chunk_by_gemm`): in L2 with the chunk's `dy` while gemm reads them. Timed per
/// convolution at width 0.25 (least of four rounds, ms) against chunks of 8 MB for all
/// threads: the stem 1.39 vs 2.18, the strided 3x3 2.35 and 1.99 vs 3.53 and 2.40 (1 MB
/// chunks: 1.65, 2.79, 1.92). The tests take one or two samples.
#[cfg(not(test))]
pub(super) const SPLIT_CHUNK_FLOATS: usize = 1 << 16;

#[cfg(test)]
pub(super) const SPLIT_CHUNK_FLOATS: usize = 1200;

/// [`weight_grad`](super::weight_grad) with the sum split over the threads: each sums its samples
/// into a `[taps, C_out]` part of its own, a chunk of samples at a time, their im2col made in its
/// own buffers and read while in cache: in bf16 on AMX tiles ([`add_chunk_on_amx`], where the flat
/// weight gradient does not apply), in f32 for the small results (at most
/// [`SPLIT_SUM_MAX_RESULT`](super::SPLIT_SUM_MAX_RESULT), where gemm's own threading splits `m x n`
/// only) by gemm on the thread ([`add_chunk_by_gemm`]).
pub(super) fn split_weight_grad(
    g: &Geometry,
    xs: &[f32],
    dys: &[f32],
    norm: Option<&ChannelNorm>,
    bf16: bool,
) -> Vec<f32> {
    let (positions, taps, cout) = (g.positions(), g.taps(), g.cout);
    let chunk = if bf16 {
        AMX_GRADIENT_B_BYTES / (positions * cout * 2)
    } else {
        SPLIT_CHUNK_FLOATS / (positions * taps)
    };
    summed_by_threads(g, chunk, |part, [first, count], accumulate| {
        // Out of `part` while the chunk is read from it, which leaves `part` free to lend.
        let mut padded = std::mem::take(&mut part.padded);
        let inputs = g.padded(xs, [first, count], &mut padded, false, norm);
        let dys = &dys[first * cout * positions..][..count * cout * positions];
        if bf16 {
            add_chunk_on_amx(g, [inputs, dys], count, part, accumulate);
        } else {
            add_chunk_by_gemm(g, [inputs, dys], count, part);
        }
        part.padded = padded;
    })
}

/// A `[C_out, taps]` weight gradient summed over the threads: each adds its own samples,
/// `chunk` at a time, into a `[taps, C_out]` part of its own that keeps its buffers
/// across the chunks (`add(part, [first, count], accumulate)`, `accumulate` false on its
/// first chunk, when the part is still zero); the parts are then added and transposed.
pub(super) fn summed_by_threads(
    g: &Geometry,
    chunk: usize,
    add: impl Fn(&mut SumPart, [usize; 2], bool) + Sync,
) -> Vec<f32> {
    let (taps, cout, chunk) = (g.taps(), g.cout, chunk.clamp(1, g.n));
    let threads = rayon::current_num_threads().clamp(1, g.n);
    let mut parts: Vec<SumPart> = (0..threads).map(|_| SumPart::new(taps * cout)).collect();
    parts.par_iter_mut().enumerate().for_each(|(index, part)| {
        let samples = g.n * index / threads..g.n * (index + 1) / threads;
        for first in samples.clone().step_by(chunk) {
            let count = chunk.min(samples.end - first);
            add(part, [first, count], first > samples.start);
        }
    });
    transposed_sum(&parts, [taps, cout])
}

/// `part.sum += im2col [taps, S * P] x dy^T [S * P, C_out]` of a chunk of `count` samples
/// (`padded` as [`Geometry::padded`] makes them, `dys` NCHW) by gemm on this thread: the
/// chunk's im2col (at most [`SPLIT_CHUNK_FLOATS`]) in `part`'s buffer, `dy` read where it
/// lies for a chunk of one sample.
pub(super) fn add_chunk_by_gemm(
    g: &Geometry,
    [padded, dys]: [&[f32]; 2],
    count: usize,
    part: &mut SumPart,
) {
    let (positions, taps, cout) = (g.positions(), g.taps(), g.cout);
    let depth = count * positions;
    let columns = prefix(&mut part.im2col, taps * depth);
    for (tap, row) in columns.chunks_exact_mut(depth).enumerate() {
        g.fill_tap_row(padded, tap, [0, g.ho], row);
    }
    let grads = side_by_side(dys, [cout, positions], &mut part.grads);
    gemm_into(
        &mut part.sum,
        [1, cout],
        [cout, taps, depth],
        grads,
        [depth, 1],
        columns,
        [1, depth],
        true,
        gemm::Parallelism::None,
    );
}

/// One thread's share of a weight gradient split over the threads: its `[taps, C_out]`
/// sum over every chunk, and (bf16) its packing buffers, kept across the chunks.
pub(super) struct SumPart {
    pub(super) sum: Vec<f32>,
    pub(super) row: Vec<f32>,
    pub(super) padded: Vec<f32>,
    /// f32: the chunk's im2col and (for several samples) its `dy` (in the direct weight
    /// gradient: its lanes, and each sample's line-aligned `dy`).
    pub(super) im2col: Vec<f32>,
    pub(super) grads: Vec<f32>,
    /// bf16: packed operands.
    pub(super) columns: Vec<u16>,
    pub(super) dy: Vec<u16>,
}

impl SumPart {
    pub(super) fn new(len: usize) -> Self {
        SumPart {
            sum: vec![0.0; len],
            row: Vec::new(),
            padded: Vec::new(),
            im2col: Vec::new(),
            grads: Vec::new(),
            columns: Vec::new(),
            dy: Vec::new(),
        }
    }
}

/// The `[C_out, taps]` weight gradient: the parts' `[taps, C_out]` sums added and
/// transposed in one pass, output channels in parallel, by 16 x 16 blocks (rows of the
/// sums read and rows of the result written as runs of 16).
pub(super) fn transposed_sum(parts: &[SumPart], [taps, cout]: [usize; 2]) -> Vec<f32> {
    /// Output channels per task.
    const CHANNELS: usize = 16;
    // SAFETY: each run's channels get every tap, 16 taps at a time.
    unsafe {
        written_by_runs(cout * taps, CHANNELS * taps, |block, out| {
            let (first, channels) = (block * CHANNELS, out.len() / taps);
            wide(
                #[inline(always)]
                || {
                    for first_tap in (0..taps).step_by(CHANNELS) {
                        let count = CHANNELS.min(taps - first_tap);
                        let mut sums = [[0f32; CHANNELS]; CHANNELS];
                        for (tap, sums) in sums.iter_mut().enumerate().take(count) {
                            for part in parts {
                                let at = (first_tap + tap) * cout + first;
                                let row = &part.sum[at..at + channels];
                                for (s, &v) in sums.iter_mut().zip(row) {
                                    *s += v;
                                }
                            }
                        }
                        transpose16(&mut sums);
                        for (out, sums) in out.chunks_exact_mut(taps).zip(&sums) {
                            out[first_tap..first_tap + count]
                                .copy_from_slice(as_slots(&sums[..count]));
                        }
                    }
                },
            )
        })
    }
}
