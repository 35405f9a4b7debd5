//! The shapes of one convolution over an NCHW batch, and what follows from them alone: the
//! padded planes, im2col's rows and col2im's adds, and the blocks each path works in.

use super::layout::{channels_last, copy_rows, every_nth};
use super::prefix;
use crate::model::fused::batch_norm::flex::ChannelNorm;
use crate::model::fused::{amx, direct, filled_by_runs};
use burn::backend::ops::ConvOptions;
use burn::tensor::Shape;

/// Floats per im2col chunk of a weight gradient (8 MB): bounds its extra memory, and the
/// zero-fill of its fresh buffers once per call (at 32 MB that fill was 4% of the width-0.25
/// step). The tests use a tiny one, so that their small batches run in several chunks.
#[cfg(not(test))]
pub(super) const CHUNK_FLOATS: usize = 2 << 20;

#[cfg(test)]
pub(super) const CHUNK_FLOATS: usize = 1000;

/// Transformed values (all points, all channels: 4 MB) a Winograd block aims at (see
/// `Geometry::winograd_blocks`).
pub(super) const WINOGRAD_VALUES: usize = 1 << 20;

#[cfg(not(test))]
pub(super) const WINOGRAD_MIN_TILES: usize = 64;

/// In the tests, a few tiles per GEMM, so that their images span several.
#[cfg(test)]
pub(super) const WINOGRAD_MIN_TILES: usize = 2;

/// Shapes of one convolution over an NCHW batch.
#[derive(Clone, Copy)]
pub(super) struct Geometry {
    pub(super) n: usize,
    pub(super) cin: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) cout: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) stride: [usize; 2],
    pub(super) pad: [usize; 2],
    pub(super) ho: usize,
    pub(super) wo: usize,
}

impl Geometry {
    pub(super) fn new(
        x: &Shape,
        cout: usize,
        [kh, kw]: [usize; 2],
        options: &ConvOptions<2>,
    ) -> Self {
        let (n, cin, h, w) = (x[0], x[1], x[2], x[3]);
        let [sh, sw] = options.stride;
        let [ph, pw] = options.padding_begin();
        Geometry {
            n,
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            stride: options.stride,
            pad: [ph, pw],
            ho: (h + 2 * ph - kh) / sh + 1,
            wo: (w + 2 * pw - kw) / sw + 1,
        }
    }

    pub(super) fn positions(&self) -> usize {
        self.ho * self.wo
    }

    pub(super) fn taps(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    /// Samples whose im2col fits in one chunk.
    pub(super) fn samples_per_chunk(&self) -> usize {
        (CHUNK_FLOATS / (self.positions() * self.taps()).max(1)).clamp(1, self.n)
    }

    /// The padded copy of one input plane as `[H + 2 * pad_h, pitch]` with its row length
    /// `W + 2 * pad_w` split into `stride_w` phases of `phase` values each (columns `x` with
    /// `x % stride_w == p` together, in order): every kernel tap then reads a contiguous run
    /// of each row, whatever the stride. Returns `[rows, pitch, phase]`.
    pub(super) fn padded_plane(&self) -> [usize; 3] {
        let sw = self.stride[1];
        let phase = (self.w + 2 * self.pad[1]).div_ceil(sw);
        [self.h + 2 * self.pad[0], sw * phase, phase]
    }

    /// Per column phase `p` of a padded row (padded columns `p, p + stride, ...`), the same
    /// in every row: `[skip, first, count]`, its `skip` values of padding before the
    /// image, then `count` input columns `first, first + stride, ...`.
    pub(super) fn column_phases(&self) -> Vec<[usize; 3]> {
        let ([_, pw], [_, sw], w) = (self.pad, self.stride, self.w);
        (0..sw)
            .map(|p| {
                let skip = pw.saturating_sub(p).div_ceil(sw);
                let first = skip * sw + p - pw;
                [skip, first.min(w), w.saturating_sub(first).div_ceil(sw)]
            })
            .collect()
    }

    /// Samples `first..first + count` padded and phase-split ([`Self::padded_plane`]), so
    /// that im2col copies plain runs without bounds checks, and normalised by `norm` when
    /// given: a slice of `xs` when there is nothing to do, else a copy in `buffer` (samples
    /// in parallel when `parallel`).
    pub(super) fn padded<'a>(
        &self,
        xs: &'a [f32],
        [first, count]: [usize; 2],
        buffer: &'a mut Vec<f32>,
        parallel: bool,
        norm: Option<&ChannelNorm>,
    ) -> &'a [f32] {
        let image = self.cin * self.h * self.w;
        if norm.is_none() && self.pad == [0, 0] && self.stride[1] == 1 {
            return &xs[first * image..][..count * image];
        }
        let [hp, pitch, _] = self.padded_plane();
        let padded_image = self.cin * hp * pitch;
        if parallel {
            // A new buffer made by the threads: growing `buffer` would zero it on this one.
            *buffer = filled_by_runs(count * padded_image, padded_image, |s, out| {
                self.pad_samples(xs, first + s, out, norm)
            });
            return buffer;
        }
        let padded = prefix(buffer, count * padded_image);
        self.pad_samples(xs, first, padded, norm);
        padded
    }

    /// Whether the padded planes' column phases are split ([`Self::pad_samples`]) and
    /// merged back (the strided input gradient) a vector at a time: stride 2 with one
    /// column of padding and rows of an even width, on AVX-512
    /// ([`direct::phase_split_plane`], [`direct::phase_merge_plane`]).
    pub(super) fn phases_in_vectors(&self) -> bool {
        self.stride[1] == 2 && self.pad[1] == 1 && direct::splits_phases(self.w)
    }

    /// Copies samples `first..` (`padded.len()` holds as many) into `padded`, padded and
    /// phase-split, each value through `norm` when given (the padding stays zero: it pads
    /// the normalised input); a vector at a time where [`Self::phases_in_vectors`].
    pub(super) fn pad_samples(
        &self,
        xs: &[f32],
        first: usize,
        padded: &mut [f32],
        norm: Option<&ChannelNorm>,
    ) {
        let (h, w) = (self.h, self.w);
        let [hp, pitch, _] = self.padded_plane();
        let planes = xs[first * self.cin * h * w..].chunks_exact(h * w);
        let padded = padded.chunks_exact_mut(hp * pitch);
        if self.phases_in_vectors() {
            for (plane, (out, image)) in padded.zip(planes).enumerate() {
                let c = plane % self.cin;
                let affine = norm.map(|norm| (norm.affine(c), norm.relu()));
                direct::phase_split_plane(image, [h, w], self.pad[0], affine, out);
            }
            return;
        }
        let phase_runs = self.column_phases();
        for (plane, (out, image)) in padded.zip(planes).enumerate() {
            let norm = norm.map(|norm| norm.channel(plane % self.cin));
            self.pad_plane(image, norm, &phase_runs, out);
        }
    }

    /// One input plane (`[H, W]`) into `out` as [`Self::pad_samples`] lays each out, each
    /// value through `norm` when given; `phase_runs` are [`Self::column_phases`].
    #[inline(always)]
    pub(super) fn pad_plane(
        &self,
        image: &[f32],
        norm: Option<impl Fn(f32, f32) -> f32>,
        phase_runs: &[[usize; 3]],
        out: &mut [f32],
    ) {
        let Geometry {
            h,
            w,
            kh,
            kw,
            pad: [ph, pw],
            stride: [sh, sw],
            ..
        } = *self;
        let [_, pitch, phase] = self.padded_plane();
        // Rows and phases no tap reads (a 1x1 kernel at stride 2 reads a quarter of the
        // input) are left as they are.
        let row_read = |row: usize| kh >= sh || row % sh < kh;
        let phase_runs = &phase_runs[..kw.min(sw)];
        out[..ph * pitch].fill(0.0);
        out[(ph + h) * pitch..].fill(0.0);
        let rows = out[ph * pitch..(ph + h) * pitch].chunks_exact_mut(pitch);
        for (y, (out, input)) in rows.zip(image.chunks_exact(w)).enumerate() {
            if !row_read(ph + y) {
                continue;
            }
            if sw == 1 {
                out[..pw].fill(0.0);
                match &norm {
                    None => out[pw..pw + w].copy_from_slice(input),
                    Some(f) => {
                        for (o, &v) in out[pw..pw + w].iter_mut().zip(input) {
                            *o = f(v, 0.0);
                        }
                    }
                }
                out[pw + w..].fill(0.0);
            } else {
                let phases = out.chunks_exact_mut(phase).zip(phase_runs);
                for (values, &[skip, first_input, count]) in phases {
                    values[..skip].fill(0.0);
                    values[skip + count..].fill(0.0);
                    let values = &mut values[skip..skip + count];
                    let inputs = &input[first_input..];
                    match &norm {
                        None => every_nth(values, inputs, sw, |v| v),
                        Some(f) => every_nth(values, inputs, sw, |v| f(v, 0.0)),
                    }
                }
            }
        }
    }

    /// The blocks of a Winograd convolution or weight gradient, `[samples, tile rows]`: a block of
    /// several samples for small images, else of some tile rows of one sample. Tiles per block:
    /// enough that each pass over the weights does much work (at least 64), few enough that the
    /// transformed tiles (`points x C x tiles`, for the wider of C_in and C_out) stay near 4 MB and
    /// at most `max_tiles` ([`WINOGRAD_MAX_TILES`](super::winograd_path::WINOGRAD_MAX_TILES),
    /// [`WINOGRAD_NARROW_MAX_TILES`](super::winograd_path::WINOGRAD_NARROW_MAX_TILES)), and no more
    /// than a thread's share, so that the small images of the deep layers (a tile or four each)
    /// still make a block for every thread (width 0.25 1.05x, width 1 1.02x).
    pub(super) fn winograd_blocks(
        &self,
        tile: usize,
        points: usize,
        max_tiles: usize,
    ) -> [usize; 2] {
        let (th, tw) = (self.ho.div_ceil(tile), self.wo.div_ceil(tile));
        let tiles = (WINOGRAD_VALUES / (points * self.cin.max(self.cout)))
            .clamp(WINOGRAD_MIN_TILES.min(max_tiles), max_tiles);
        let balanced = (self.n * th * tw).div_ceil(rayon::current_num_threads());
        let tiles = tiles.min(balanced.max(1));
        [
            (tiles / (th * tw)).clamp(1, self.n),
            (tiles / tw).clamp(1, th),
        ]
    }

    /// Samples `first..first + count` padded for a Winograd convolution with channels last
    /// and `tile x tile` output tiles (`[count, hp, wp, C_in]`: padding 1 before, and after
    /// out to whole tiles), each value through `norm` when given. Returns them and `[hp,
    /// wp]`.
    #[inline(always)]
    pub(super) fn padded_channels_last<'a>(
        &self,
        xs: &[f32],
        [first, count]: [usize; 2],
        tile: usize,
        buffer: &'a mut Vec<f32>,
        norm: Option<&ChannelNorm>,
    ) -> (&'a [f32], [usize; 2]) {
        let Geometry { cin, h, w, pad, .. } = *self;
        let image = cin * h * w;
        let padded = [
            tile * self.ho.div_ceil(tile) + 2,
            tile * self.wo.div_ceil(tile) + 2,
        ];
        let values = channels_last(
            &xs[first * image..][..count * image],
            [cin, h, w],
            pad,
            padded,
            buffer,
            norm,
        );
        (values, padded)
    }

    /// Fills `row` with kernel tap `tap = (c, i, j)` at output rows `first_row..first_row +
    /// rows` of the padded samples in `padded` (`row.len() / (rows * W_out)` of them): each
    /// value is the input under that tap at one output position. The rows of all taps make
    /// the im2col `[taps, samples * positions]`, positions contiguous, which GEMM reads as
    /// is; each output row is a copy of one run of a padded input row.
    pub(super) fn fill_tap_row<T: Copy>(
        &self,
        padded: &[T],
        tap: usize,
        span: [usize; 2],
        row: &mut [T],
    ) {
        let (kh, kw) = (self.kh, self.kw);
        let (c, offset) = (tap / (kh * kw), [tap / kw % kh, tap % kw]);
        self.fill_offset_row(padded, [c, self.cin], offset, span, 1, row);
    }

    /// As [`Self::fill_tap_row`] for plane `plane` of `planes` per sample, kernel offset
    /// `(i, j)`, in padded planes of `lanes` values per position (2: [`Self::padded_pairs`]).
    pub(super) fn fill_offset_row<T: Copy>(
        &self,
        padded: &[T],
        [plane, planes]: [usize; 2],
        [i, j]: [usize; 2],
        [first_row, rows]: [usize; 2],
        lanes: usize,
        row: &mut [T],
    ) {
        let Geometry {
            stride: [sh, sw],
            wo,
            ..
        } = *self;
        let [hp, pitch, phase] = self.padded_plane();
        // Column `ox * sw + j` of a padded row is value `ox + j / sw` of phase `j % sw`.
        let start = ((first_row * sh + i) * pitch + j % sw * phase + j / sw) * lanes;
        let plane_len = hp * pitch * lanes;
        let samples = padded.chunks_exact(planes * plane_len);
        for (sample, image) in row.chunks_exact_mut(rows * wo * lanes).zip(samples) {
            let plane = &image[plane * plane_len..][..plane_len];
            copy_rows(sample, &plane[start..], wo * lanes, sh * pitch * lanes);
        }
    }

    /// Adds each tap's row of `columns` (`[taps, positions]` of one sample) back into
    /// `padded` (one sample, padded and phase-split) where [`Self::fill_tap_row`] copies
    /// it from: the adjoint of im2col.
    pub(super) fn add_tap_rows(
        &self,
        columns: &[f32],
        [row_length, first]: [usize; 2],
        padded: &mut [f32],
    ) {
        let (kh, kw, wo) = (self.kh, self.kw, self.wo);
        let [sh, sw] = self.stride;
        let [hp, pitch, phase] = self.padded_plane();
        let rows = columns.chunks_exact(row_length);
        for (tap, row) in rows
            .map(|row| &row[first..][..self.positions()])
            .enumerate()
        {
            let (c, i, j) = (tap / (kh * kw), tap / kw % kh, tap % kw);
            let plane = &mut padded[c * hp * pitch..][..hp * pitch];
            let start = i * pitch + j % sw * phase + j / sw;
            for (oy, values) in row.chunks_exact(wo).enumerate() {
                let out = &mut plane[start + oy * sh * pitch..][..wo];
                for (o, v) in out.iter_mut().zip(values) {
                    *o += v;
                }
            }
        }
    }

    /// Samples `first..first + count` padded and phase-split as [`Self::padded`] lays them
    /// out, in bf16 with their channels interleaved in pairs, `[count, ceil(C_in / 2), rows,
    /// pitch, 2]` (the second of an odd last pair zero), each value through `norm` when
    /// given: the two taps of a channel pair at one kernel offset are then one run of
    /// value pairs, the layout of a row of an AMX B tile. Each pair's two padded planes go
    /// through `planes` (f32 scratch, in L1) on the way, not the whole samples through
    /// memory.
    pub(super) fn padded_pairs<'a>(
        &self,
        xs: &[f32],
        [first, count]: [usize; 2],
        norm: Option<&ChannelNorm>,
        buffer: &'a mut Vec<u16>,
        planes: &mut Vec<f32>,
    ) -> &'a [u16] {
        let [hp, pitch, _] = self.padded_plane();
        let (plane, pairs) = (hp * pitch, self.cin.div_ceil(2));
        let (channel, image) = (self.h * self.w, self.cin * self.h * self.w);
        let as_is = norm.is_none() && self.pad == [0, 0] && self.stride[1] == 1;
        let phase_runs = self.column_phases();
        let out = prefix(buffer, count * pairs * plane * 2);
        let (first_plane, second_plane) = prefix(planes, 2 * plane).split_at_mut(plane);
        let samples = xs[first * image..][..count * image].chunks_exact(image);
        for (out, sample) in out.chunks_exact_mut(pairs * plane * 2).zip(samples) {
            let values = |c: usize| &sample[c * channel..][..channel];
            let pad = |c: usize, scratch: &mut [f32]| {
                let norm = norm.map(|norm| norm.channel(c));
                self.pad_plane(values(c), norm, &phase_runs, scratch);
            };
            for (p, out) in out.chunks_exact_mut(plane * 2).enumerate() {
                let (a, b) = (2 * p, 2 * p + 1);
                let first: &[f32] = if as_is {
                    values(a)
                } else {
                    pad(a, first_plane);
                    first_plane
                };
                let second: &[f32] = if b == self.cin {
                    &[]
                } else if as_is {
                    values(b)
                } else {
                    pad(b, second_plane);
                    second_plane
                };
                amx::interleave_runs(first, second, out);
            }
        }
        out
    }
}
