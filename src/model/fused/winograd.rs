//! Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray 2016) for the f32 convolutions of
//! 3x3 kernels at stride 1 with padding 1, most of a ResNet's FLOPs: each 2x2 block of outputs
//! comes from a 4x4 input patch with 16 multiplications per input channel instead of 36, as 16
//! GEMMs (one per point of the transformed 4x4 tile) over all the tiles:
//!
//! `Y = A^T [ (G g G^T) (.) (B^T d B) ] A`, with
//! `B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]`, `G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]`
//! and `A^T = [1 1 1 0; 0 1 -1 -1]`. The transforms only add and halve, so in f32 the result
//! stays within a few units in the last place of the direct sum.
//!
//! Layouts: transformed weights `[16, C_out, C_in]` (the GEMM's `rhs`, `k` contiguous),
//! transformed inputs `[16, C_in, tiles]` and products `[16, C_out, tiles]` (tiles
//! contiguous: gemm reads them without packing).

/// Points of a transformed tile.
pub(super) const POINTS: usize = 16;

/// Whether F(2x2, 3x3) computes this convolution: a 3x3 kernel at stride 1, padding 1 (the
/// output the size of the input), and an even output, so that whole 2x2 tiles cover it.
pub(super) fn applies(
    [kh, kw]: [usize; 2],
    stride: [usize; 2],
    pad: [usize; 2],
    out: [usize; 2],
) -> bool {
    [kh, kw] == [3, 3]
        && stride == [1, 1]
        && pad == [1, 1]
        && out.iter().all(|&o| o >= 2 && o % 2 == 0)
}

/// `[C_out, C_in, 3, 3]` kernels as `G g G^T`, `[16, C_out, C_in]`.
pub(super) fn transform_weights(weights: &[f32], [cout, cin]: [usize; 2]) -> Vec<f32> {
    assert_eq!(weights.len(), cout * cin * 9, "3x3 kernels");
    let mut out = vec![0.0; POINTS * cout * cin];
    for (pair, g) in weights.chunks_exact(9).enumerate() {
        // `columns[j][i]` is `(G g)[i][j]`.
        let columns: [[f32; 4]; 3] = std::array::from_fn(|j| g_times([g[j], g[3 + j], g[6 + j]]));
        for i in 0..4 {
            let row = g_times([columns[0][i], columns[1][i], columns[2][i]]);
            for (j, v) in row.into_iter().enumerate() {
                out[(i * 4 + j) * cout * cin + pair] = v;
            }
        }
    }
    out
}

/// `G v`: `[v0, (v0 + v1 + v2) / 2, (v0 - v1 + v2) / 2, v2]`.
fn g_times([a, b, c]: [f32; 3]) -> [f32; 4] {
    [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c]
}

/// The tiles of output tile rows `first..first + rows` of `count` padded samples
/// (`[count, C_in, hp, pitch]`, padding 1 included) as `B^T d B`, into `out`
/// (`[16, C_in, tiles]`, tile `(s, ty, tx)` at `(s * rows + ty - first) * tw + tx`).
#[inline(always)]
pub(super) fn transform_input(
    padded: &[f32],
    [count, cin, hp, pitch]: [usize; 4],
    [first, rows]: [usize; 2],
    tw: usize,
    out: &mut [f32],
) {
    let tiles = count * rows * tw;
    assert_eq!(out.len(), POINTS * cin * tiles, "transformed input size");
    assert!(padded.len() >= count * cin * hp * pitch && pitch >= 2 * tw + 2 && pitch % 2 == 0);
    assert!(
        2 * (first + rows) + 2 <= hp,
        "tile rows beyond the padded rows"
    );
    let phase = pitch / 2;
    // The padded rows these tiles read, each with its even columns first and then its odd
    // ones, so that the taps of a tile column are contiguous runs; then `B^T d` of a band of
    // four such rows.
    let read = (2 * first * pitch)..(2 * (first + rows) + 2) * pitch;
    let mut split = vec![0.0f32; read.len()];
    let mut band = vec![0.0f32; 4 * pitch];
    for s in 0..count {
        for c in 0..cin {
            let plane = &padded[(s * cin + c) * hp * pitch..][..hp * pitch];
            for (row, out) in plane[read.clone()]
                .chunks_exact(pitch)
                .zip(split.chunks_exact_mut(pitch))
            {
                deinterleave(row, out);
            }
            for ty in first..first + rows {
                let band_rows = &split[2 * (ty - first) * pitch..][..4 * pitch];
                let (d0, rest) = band_rows.split_at(pitch);
                let (d1, rest) = rest.split_at(pitch);
                let (d2, d3) = rest.split_at(pitch);
                let [b0, b1, b2, b3] = four(&mut band);
                lanes(b0, d0, d2, |a, b| a - b);
                lanes(b1, d1, d2, |a, b| a + b);
                lanes(b2, d2, d1, |a, b| a - b);
                lanes(b3, d1, d3, |a, b| a - b);
                let at = (s * rows + ty - first) * tw;
                for (i, e) in band.chunks_exact(pitch).enumerate() {
                    // Columns 2tx, 2tx + 2 (even) and 2tx + 1, 2tx + 3 (odd) of every tile.
                    let (even, odd) = e.split_at(phase);
                    let (e0, e1, o0, o1) = (&even[..tw], &even[1..=tw], &odd[..tw], &odd[1..=tw]);
                    let run = |j: usize| {
                        let at = ((i * 4 + j) * cin + c) * tiles + at;
                        at..at + tw
                    };
                    let [p0, p1, p2, p3] = out
                        .get_disjoint_mut([run(0), run(1), run(2), run(3)])
                        .expect("the runs of four points are disjoint");
                    lanes(p0, e0, e1, |a, b| a - b);
                    lanes(p1, o0, e1, |a, b| a + b);
                    lanes(p2, e1, o0, |a, b| a - b);
                    lanes(p3, o0, o1, |a, b| a - b);
                }
            }
        }
    }
}

/// `row`'s even values into the first half of `out`, its odd ones into the second.
#[inline(always)]
fn deinterleave(row: &[f32], out: &mut [f32]) {
    let half = out.len() / 2;
    assert!(row.len() == 2 * half && out.len() == 2 * half);
    let (even, odd) = out.split_at_mut(half);
    for k in 0..half {
        even[k] = row[2 * k];
        odd[k] = row[2 * k + 1];
    }
}

/// The products (`[16, C_out, tiles]`, tiles as in [`transform_input`]) as `A^T m A`, each
/// tile's 2x2 outputs written into `out` (`[count, C_out, ho, wo]`) at output rows
/// `2 * first..2 * (first + rows)`.
#[inline(always)]
pub(super) fn transform_output(
    products: &[f32],
    [count, cout, ho, wo]: [usize; 4],
    [first, rows]: [usize; 2],
    out: &mut [f32],
) {
    let tw = wo / 2;
    let tiles = count * rows * tw;
    assert_eq!(products.len(), POINTS * cout * tiles, "products size");
    assert_eq!(out.len(), count * cout * ho * wo, "output size");
    // For all tiles at once: the rows of `A^T m` (`u` the first, `w` the second, four
    // columns each), then the four corners of `A^T m A`.
    let mut scratch = vec![0.0f32; 12 * tiles];
    for co in 0..cout {
        let m: [&[f32]; POINTS] =
            std::array::from_fn(|p| &products[(p * cout + co) * tiles..][..tiles]);
        let (u, rest) = scratch.split_at_mut(4 * tiles);
        let (w, corners) = rest.split_at_mut(4 * tiles);
        for (j, (u, w)) in u
            .chunks_exact_mut(tiles)
            .zip(w.chunks_exact_mut(tiles))
            .enumerate()
        {
            lanes3(u, m[j], m[4 + j], m[8 + j], |a, b, c| a + b + c);
            lanes3(w, m[4 + j], m[8 + j], m[12 + j], |a, b, c| a - b - c);
        }
        let (u, w): ([&[f32]; 4], [&[f32]; 4]) = (
            std::array::from_fn(|j| &u[j * tiles..][..tiles]),
            std::array::from_fn(|j| &w[j * tiles..][..tiles]),
        );
        let [y00, y01, y10, y11] = four(corners);
        lanes3(y00, u[0], u[1], u[2], |a, b, c| a + b + c);
        lanes3(y01, u[1], u[2], u[3], |a, b, c| a - b - c);
        lanes3(y10, w[0], w[1], w[2], |a, b, c| a + b + c);
        lanes3(y11, w[1], w[2], w[3], |a, b, c| a - b - c);
        let (y00, y01, y10, y11) = (&*y00, &*y01, &*y10, &*y11);
        for s in 0..count {
            let plane = &mut out[(s * cout + co) * ho * wo..][..ho * wo];
            for ty in first..first + rows {
                let run = (s * rows + ty - first) * tw..(s * rows + ty - first + 1) * tw;
                let (top, bottom) = plane[2 * ty * wo..][..2 * wo].split_at_mut(wo);
                interleave(top, &y00[run.clone()], &y01[run.clone()]);
                interleave(bottom, &y10[run.clone()], &y11[run]);
            }
        }
    }
}

/// Four equal quarters of `values`.
fn four(values: &mut [f32]) -> [&mut [f32]; 4] {
    let quarter = values.len() / 4;
    let (a, rest) = values.split_at_mut(quarter);
    let (b, rest) = rest.split_at_mut(quarter);
    let (c, d) = rest.split_at_mut(quarter);
    [a, b, c, d]
}

/// `out[i] = f(a[i], b[i])`: a loop the compiler vectorises.
#[inline(always)]
fn lanes(out: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
        *o = f(a, b);
    }
}

/// `out[i] = f(a[i], b[i], c[i])`.
#[inline(always)]
fn lanes3(out: &mut [f32], a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) {
    for (((o, &a), &b), &c) in out.iter_mut().zip(a).zip(b).zip(c) {
        *o = f(a, b, c);
    }
}

/// `out = [a0, b0, a1, b1, ...]`.
#[inline(always)]
fn interleave(out: &mut [f32], a: &[f32], b: &[f32]) {
    for ((pair, &a), &b) in out.chunks_exact_mut(2).zip(a).zip(b) {
        pair[0] = a;
        pair[1] = b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in [-1, 1) from a fixed linear congruential sequence.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// The 3x3, stride-1, padding-1 cross-correlation as its definition, in f64.
    fn direct(x: &[f32], [n, cin, h, w]: [usize; 4], weights: &[f32], cout: usize) -> Vec<f32> {
        let mut out = vec![0.0; n * cout * h * w];
        for s in 0..n {
            for co in 0..cout {
                for oy in 0..h {
                    for ox in 0..w {
                        let mut sum = 0.0f64;
                        for c in 0..cin {
                            for i in 0..3 {
                                for j in 0..3 {
                                    let (y, x_) = (oy + i, ox + j);
                                    if y < 1 || x_ < 1 || y > h || x_ > w {
                                        continue;
                                    }
                                    let v = x[((s * cin + c) * h + y - 1) * w + x_ - 1];
                                    let g = weights[((co * cin + c) * 3 + i) * 3 + j];
                                    sum += f64::from(v) * f64::from(g);
                                }
                            }
                        }
                        out[((s * cout + co) * h + oy) * w + ox] = sum as f32;
                    }
                }
            }
        }
        out
    }

    /// The three transforms with the 16 products summed in plain loops, over tile rows in
    /// chunks of `chunk`.
    fn winograd(
        x: &[f32],
        [n, cin, h, w]: [usize; 4],
        weights: &[f32],
        cout: usize,
        chunk: usize,
    ) -> Vec<f32> {
        let (hp, pitch) = (h + 2, w + 2);
        let mut padded = vec![0.0; n * cin * hp * pitch];
        for plane in 0..n * cin {
            for y in 0..h {
                for x_ in 0..w {
                    padded[(plane * hp + y + 1) * pitch + x_ + 1] = x[(plane * h + y) * w + x_];
                }
            }
        }
        let u = transform_weights(weights, [cout, cin]);
        let (th, tw) = (h / 2, w / 2);
        let mut out = vec![f32::NAN; n * cout * h * w];
        for first in (0..th).step_by(chunk) {
            let rows = chunk.min(th - first);
            let tiles = n * rows * tw;
            let mut v = vec![f32::NAN; POINTS * cin * tiles];
            transform_input(&padded, [n, cin, hp, pitch], [first, rows], tw, &mut v);
            let mut m = vec![0.0; POINTS * cout * tiles];
            for p in 0..POINTS {
                for co in 0..cout {
                    for c in 0..cin {
                        let g = u[(p * cout + co) * cin + c];
                        for t in 0..tiles {
                            m[(p * cout + co) * tiles + t] += g * v[(p * cin + c) * tiles + t];
                        }
                    }
                }
            }
            transform_output(&m, [n, cout, h, w], [first, rows], &mut out);
        }
        out
    }

    #[test]
    fn matches_the_direct_convolution() {
        for (shape, cout, chunk) in [
            ([1, 1, 2, 2], 1, 1),
            ([2, 3, 4, 6], 5, 1),
            ([2, 3, 8, 8], 4, 3),
            ([1, 7, 6, 4], 2, 8),
        ] {
            let [n, cin, h, w] = shape;
            let x = values(n * cin * h * w, 1);
            let weights = values(cout * cin * 9, 2);
            let (ours, exact) = (
                winograd(&x, shape, &weights, cout, chunk),
                direct(&x, shape, &weights, cout),
            );
            for (i, (a, b)) in ours.iter().zip(&exact).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{shape:?}[{i}]: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn applies_to_even_3x3_stride_1_padding_1_only() {
        assert!(applies([3, 3], [1, 1], [1, 1], [32, 32]));
        assert!(applies([3, 3], [1, 1], [1, 1], [2, 4]));
        assert!(!applies([3, 3], [1, 1], [1, 1], [9, 9]));
        assert!(!applies([3, 3], [2, 2], [1, 1], [16, 16]));
        assert!(!applies([1, 1], [1, 1], [0, 0], [32, 32]));
        assert!(!applies([3, 3], [1, 1], [0, 0], [30, 30]));
    }
}
