//! Bias-free 2-D convolution on GEMM for flex training: forward, input and weight gradients.
//!
//! - Forward: samples in parallel, each in tiles of output positions whose im2col (channels
//!   last, so every tap is a contiguous copy) stays in cache for its single-threaded GEMM, and
//!   whose result rows are copied straight into the NCHW output. flex's own convolution does the
//!   same GEMMs but converts the input to NHWC on one thread and writes its output one strided
//!   element at a time.
//! - Input gradient: burn 0.22's default runs `conv_transpose2d`, which flex computes as a
//!   direct loop. For the stride-1 convolutions that make up most of a ResNet the input gradient
//!   *is* a convolution, of the output gradient with the kernel flipped in space and its in/out
//!   channels swapped, padded by `k - 1 - p`: it takes the forward above. Strided convolutions
//!   keep burn's.
//! - Weight gradient: `dy [C_out, N*P] x im2col(x)^T`, im2col tap-major so that GEMM reads both
//!   operands along the `N*P` sum.
//!
//! GEMM is the `gemm` crate flex itself uses, called directly for strides and accumulation.
//! burn's `Conv2d` module keeps the parameters; [`forward`] replaces its forward.

use burn::backend::backend_extension;
use burn::backend::ops::ConvOptions;
use burn::backend::tensor::FloatTensor;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;

#[backend_extension(Flex, Autodiff)]
pub trait GemmConvOps: burn::backend::Backend {
    /// `conv2d(x, weight)` without bias.
    fn gemm_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self>;

    /// The weight gradient of [`gemm_conv2d`](GemmConvOps::gemm_conv2d) (no groups, no
    /// dilation, symmetric padding): `dy` as `[C_out, N*P]` times `im2col(x)` as
    /// `[N*P, C_in*kh*kw]`, one GEMM per chunk of samples.
    fn gemm_conv2d_weight_grad(
        x: FloatTensor<Self>,
        output_grad: FloatTensor<Self>,
        kernel: [usize; 2],
        options: ConvOptions<2>,
    ) -> FloatTensor<Self>;
}

/// `conv` applied to an NCHW batch: through [`GemmConvOps`] on flex in f32 without a bias,
/// burn's `Conv2d::forward` otherwise.
pub fn forward(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let Some(options) = crate::model::precision::conv_options(conv) else {
        return conv.forward(x);
    };
    if !takes_gemm_path(conv, &x) {
        return conv.forward(x);
    }
    Tensor::from_dispatch(<burn::backend::Dispatch as GemmConvOps>::gemm_conv2d(
        x.into_dispatch(),
        conv.weight.val().into_dispatch(),
        options,
    ))
}

fn takes_gemm_path(conv: &Conv2d, x: &Tensor<4>) -> bool {
    let device = x.device();
    super::enabled()
        && conv.bias.is_none()
        && x.dtype() == burn::tensor::DType::F32
        && super::is_flex(&device)
}

/// Whether our GEMM convolution and weight gradient handle these options (flex's convolution
/// and burn's weight gradient take the rest).
fn on_gemm(options: &ConvOptions<2>) -> bool {
    options.dilation == [1, 1] && options.groups == 1 && !options.is_asymmetric()
}

/// Whether the input gradient of a convolution with these options is a plain convolution.
fn input_grad_is_a_convolution(options: &ConvOptions<2>, kernel: [usize; 2]) -> bool {
    options.stride == [1, 1]
        && options.dilation == [1, 1]
        && options.groups == 1
        && !options.is_asymmetric()
        && (0..2).all(|i| options.padding_begin()[i] < kernel[i])
}

mod flex {
    use super::super::{contiguous_f32, tensor};
    use super::{GemmConvOps, on_gemm};
    use burn::backend::Flex;
    use burn::backend::ops::{ConvOptions, ModuleOps};
    use burn::backend::tensor::FloatTensor;
    use burn::tensor::Shape;
    use rayon::prelude::*;

    /// Floats per im2col chunk of a weight gradient (32 MB): bounds its extra memory. The tests
    /// use a tiny one, so that their small batches run in several chunks.
    #[cfg(not(test))]
    const CHUNK_FLOATS: usize = 8 << 20;
    #[cfg(test)]
    const CHUNK_FLOATS: usize = 1000;

    /// Output positions per GEMM of a forward convolution: the tile's im2col (at most 512 x
    /// 4608 floats in ResNet-18) stays in L2 between being written and being read. The tests
    /// use a small one, so that their images span several tiles.
    #[cfg(not(test))]
    const TILE_POSITIONS: usize = 256;
    #[cfg(test)]
    const TILE_POSITIONS: usize = 7;

    /// Shapes of one convolution over an NCHW batch.
    #[derive(Clone, Copy)]
    struct Geometry {
        n: usize,
        cin: usize,
        h: usize,
        w: usize,
        cout: usize,
        kh: usize,
        kw: usize,
        stride: [usize; 2],
        pad: [usize; 2],
        ho: usize,
        wo: usize,
    }

    impl Geometry {
        fn new(x: &Shape, cout: usize, [kh, kw]: [usize; 2], options: &ConvOptions<2>) -> Self {
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

        fn positions(&self) -> usize {
            self.ho * self.wo
        }

        fn taps(&self) -> usize {
            self.cin * self.kh * self.kw
        }

        /// Samples whose im2col fits in one chunk.
        fn samples_per_chunk(&self) -> usize {
            (CHUNK_FLOATS / (self.positions() * self.taps()).max(1)).clamp(1, self.n)
        }

        /// im2col of `count` samples from `first`, as `[taps, count * P]`: one row per kernel
        /// tap `(c, i, j)`, one column per output position of each sample. Each row is filled
        /// from runs of input rows (contiguous when the stride is 1), rows in parallel.
        fn im2col_tap_major(&self, xs: &[f32], first: usize, count: usize) -> Vec<f32> {
            let Geometry {
                cin: _,
                h,
                w,
                kh,
                kw,
                stride: [sh, sw],
                pad: [ph, pw],
                ho,
                wo,
                ..
            } = *self;
            let (positions, plane) = (self.positions(), h * w);
            let mut columns = vec![0f32; self.taps() * count * positions];
            columns
                .par_chunks_mut(count * positions)
                .enumerate()
                .for_each(|(tap, row)| {
                    let (c, i, j) = (tap / (kh * kw), tap / kw % kh, tap % kw);
                    // Output columns whose input column `ox * sw + j - pw` lies in the image.
                    let first_ox = pw.saturating_sub(j).div_ceil(sw);
                    let end_ox = (w + pw).saturating_sub(j).div_ceil(sw).min(wo);
                    for s in 0..count {
                        let image = &xs[((first + s) * self.cin + c) * plane..][..plane];
                        for oy in 0..ho {
                            let Some(y) = (oy * sh + i).checked_sub(ph).filter(|&y| y < h) else {
                                continue; // a padding row: stays zero
                            };
                            let out = &mut row[s * positions + oy * wo..][..wo];
                            let input = &image[y * w..][..w];
                            if first_ox >= end_ox {
                                continue;
                            }
                            let x0 = first_ox * sw + j - pw;
                            if sw == 1 {
                                out[first_ox..end_ox]
                                    .copy_from_slice(&input[x0..x0 + end_ox - first_ox]);
                            } else {
                                for (o, v) in out[first_ox..end_ox]
                                    .iter_mut()
                                    .zip(input[x0..].iter().step_by(sw))
                                {
                                    *o = *v;
                                }
                            }
                        }
                    }
                });
            columns
        }
    }

    impl Geometry {
        /// The kernel `[C_out, C_in, kh, kw]` as `[C_out, kh, kw, C_in]`.
        fn weights_channels_last(&self, weights: &[f32]) -> Vec<f32> {
            let (cin, k) = (self.cin, self.kh * self.kw);
            let mut out = vec![0f32; self.cout * cin * k];
            for (dst, src) in out.chunks_mut(cin * k).zip(weights.chunks(cin * k)) {
                for c in 0..cin {
                    for t in 0..k {
                        dst[t * cin + c] = src[c * k + t];
                    }
                }
            }
            out
        }

        /// Sample `s` of the NCHW batch as HWC.
        fn channels_last(&self, xs: &[f32], s: usize) -> Vec<f32> {
            let (cin, plane) = (self.cin, self.h * self.w);
            let source = &xs[s * cin * plane..][..cin * plane];
            let mut image = vec![0f32; plane * cin];
            // Blocks of channels, so that the writes stay in a few cache lines.
            for c0 in (0..cin).step_by(16) {
                let c1 = (c0 + 16).min(cin);
                for p in 0..plane {
                    for c in c0..c1 {
                        image[p * cin + c] = source[c * plane + p];
                    }
                }
            }
            image
        }

        /// Appends to `columns` the im2col of output positions `start..start + tile` of one
        /// HWC image, as `[tile, taps]` with taps in `(i, j, c)` order: each tap is a copy of
        /// `C_in` contiguous values, or zeros in the padding.
        fn append_im2col(&self, image: &[f32], start: usize, tile: usize, columns: &mut Vec<f32>) {
            let Geometry {
                cin,
                h,
                w,
                kh,
                kw,
                stride: [sh, sw],
                pad: [ph, pw],
                wo,
                ..
            } = *self;
            let taps = self.taps();
            let from = columns.len();
            columns.resize(from + tile * taps, 0.0);
            for (offset, position) in columns[from..].chunks_mut(taps).enumerate() {
                let (oy, ox) = ((start + offset) / wo, (start + offset) % wo);
                for i in 0..kh {
                    let Some(y) = (oy * sh + i).checked_sub(ph).filter(|&y| y < h) else {
                        continue; // a padding row: stays zero
                    };
                    for j in 0..kw {
                        if let Some(x) = (ox * sw + j).checked_sub(pw).filter(|&x| x < w) {
                            position[(i * kw + j) * cin..][..cin]
                                .copy_from_slice(&image[(y * w + x) * cin..][..cin]);
                        }
                    }
                }
            }
        }
    }

    /// `dst[m x n] (+)= lhs[m x k] * rhs[k x n]`, each matrix given by its row and column
    /// strides (`dst` row- or column-major); `accumulate` adds to `dst` instead of overwriting
    /// it. GEMM is fastest when `k` is the contiguous dimension of both operands.
    #[allow(clippy::too_many_arguments)]
    fn gemm_into(
        dst: &mut [f32],
        [dst_rs, dst_cs]: [usize; 2],
        [m, n, k]: [usize; 3],
        lhs: &[f32],
        [lhs_rs, lhs_cs]: [usize; 2],
        rhs: &[f32],
        [rhs_rs, rhs_cs]: [usize; 2],
        accumulate: bool,
        parallelism: gemm::Parallelism,
    ) {
        let last = |rows: usize, cols: usize, rs: usize, cs: usize| {
            (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs
        };
        assert!(
            [dst_rs, dst_cs] == [n, 1] || [dst_rs, dst_cs] == [1, m],
            "gemm destination must be row- or column-major"
        );
        assert!(dst.len() >= m * n, "gemm destination too small");
        assert!(
            lhs.len() > last(m, k, lhs_rs, lhs_cs),
            "gemm lhs out of bounds"
        );
        assert!(
            rhs.len() > last(k, n, rhs_rs, rhs_cs),
            "gemm rhs out of bounds"
        );
        // SAFETY: the assertions above keep every index gemm reads or writes in bounds, and
        // `dst` is borrowed mutably, so it aliases neither operand.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                dst_cs as isize,
                dst_rs as isize,
                accumulate,
                lhs.as_ptr(),
                lhs_cs as isize,
                lhs_rs as isize,
                rhs.as_ptr(),
                rhs_cs as isize,
                rhs_rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }

    impl GemmConvOps for Flex {
        /// Samples (or groups of small ones) in parallel; per tile of output positions:
        /// `im2col [tile, taps] x weight^T [taps, C_out]` into `[C_out, tile]`, copied into the
        /// NCHW output row by row. Taps run `(i, j, c)`, so that im2col copies runs of channels
        /// from an NHWC copy of the sample and GEMM reads both operands along the taps; a tile's
        /// columns stay in cache between im2col and GEMM.
        fn gemm_conv2d(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            options: ConvOptions<2>,
        ) -> FloatTensor<Self> {
            let ws = weight.layout().shape().clone();
            let fits = (0..2)
                .all(|d| x.layout().shape()[2 + d] + 2 * options.padding_begin()[d] >= ws[2 + d]);
            if !on_gemm(&options) || !fits {
                return <Flex as ModuleOps<Flex>>::conv2d(x, weight, None, options);
            }
            let g = Geometry::new(x.layout().shape(), ws[0], [ws[2], ws[3]], &options);
            let (positions, taps, cout) = (g.positions(), g.taps(), g.cout);
            let xs = contiguous_f32(&x);
            let weights = g.weights_channels_last(&contiguous_f32(&weight));
            // Small images go several to a GEMM, so that its rows fill a tile.
            let group = (TILE_POSITIONS / positions).clamp(1, g.n);
            let mut output = vec![0f32; g.n * cout * positions];
            output
                .par_chunks_mut(group * cout * positions)
                .enumerate()
                .for_each(|(index, block)| {
                    let count = block.len() / (cout * positions);
                    let images: Vec<Vec<f32>> = (0..count)
                        .map(|s| g.channels_last(&xs, index * group + s))
                        .collect();
                    let mut columns = Vec::new();
                    let mut product = Vec::new();
                    for start in (0..positions).step_by(TILE_POSITIONS) {
                        let tile = TILE_POSITIONS.min(positions - start);
                        columns.clear();
                        for image in &images {
                            g.append_im2col(image, start, tile, &mut columns);
                        }
                        let rows = count * tile;
                        product.resize(cout * rows, 0.0);
                        gemm_into(
                            &mut product,
                            [1, rows],
                            [rows, cout, taps],
                            &columns,
                            [taps, 1],
                            &weights,
                            [1, taps],
                            false,
                            gemm::Parallelism::None,
                        );
                        for (s, sample) in block.chunks_mut(cout * positions).enumerate() {
                            for (co, out) in sample.chunks_mut(positions).enumerate() {
                                out[start..start + tile]
                                    .copy_from_slice(&product[co * rows + s * tile..][..tile]);
                            }
                        }
                    }
                });
            tensor(output, Shape::new([g.n, cout, g.ho, g.wo]))
        }

        /// Per chunk of samples: `dy [C_out, S * P] x im2col^T [S * P, taps]`, summed into one
        /// `[C_out, taps]` gradient.
        fn gemm_conv2d_weight_grad(
            x: FloatTensor<Self>,
            output_grad: FloatTensor<Self>,
            kernel: [usize; 2],
            options: ConvOptions<2>,
        ) -> FloatTensor<Self> {
            let cout = output_grad.layout().shape()[1];
            let g = Geometry::new(x.layout().shape(), cout, kernel, &options);
            let (positions, taps) = (g.positions(), g.taps());
            let xs = contiguous_f32(&x);
            let dys = contiguous_f32(&output_grad);
            let per_chunk = g.samples_per_chunk();
            let mut total = vec![0f32; cout * taps];
            let mut grads = Vec::new();
            for first in (0..g.n).step_by(per_chunk) {
                let count = per_chunk.min(g.n - first);
                let columns = g.im2col_tap_major(&xs, first, count);
                let width = count * positions;
                // dy of these samples as [C_out, S * P].
                grads.resize(cout * width, 0.0);
                grads
                    .par_chunks_mut(width)
                    .enumerate()
                    .for_each(|(co, out)| {
                        for s in 0..count {
                            let at = ((first + s) * cout + co) * positions;
                            out[s * positions..][..positions]
                                .copy_from_slice(&dys[at..at + positions]);
                        }
                    });
                gemm_into(
                    &mut total,
                    [taps, 1],
                    [cout, taps, width],
                    &grads,
                    [width, 1],
                    &columns,
                    [1, width],
                    first > 0,
                    gemm::Parallelism::Rayon(0),
                );
            }
            tensor(total, Shape::new([cout, g.cin, g.kh, g.kw]))
        }
    }
}

mod autodiff {
    use super::{GemmConvOps, input_grad_is_a_convolution, on_gemm};
    use burn::backend::ops::ConvOptions;
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{AutodiffBackend, Backend, TensorMetadata};
    use burn_autodiff::Autodiff;
    use burn_autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
    use burn_autodiff::grads::Gradients;
    use burn_autodiff::ops::{Backward, Ops, OpsKind};

    #[derive(Debug)]
    struct GemmConv2d;

    impl<B: Backend + GemmConvOps> Backward<B, 2> for GemmConv2d {
        type State = (FloatTensor<B>, FloatTensor<B>, ConvOptions<2>);

        fn backward(
            self,
            ops: Ops<Self::State, 2>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let [node_x, node_weight] = ops.parents;
            let grad = grads.consume::<B>(&ops.node);
            let (x, weight, options) = ops.state;
            if let Some(node) = node_weight {
                let weight_grad = if on_gemm(&options) {
                    let shape = weight.shape();
                    B::gemm_conv2d_weight_grad(
                        x.clone(),
                        grad.clone(),
                        [shape[2], shape[3]],
                        options.clone(),
                    )
                } else {
                    B::conv2d_weight_backward(
                        x.clone(),
                        weight.clone(),
                        grad.clone(),
                        options.clone(),
                    )
                };
                grads.register::<B>(node.id, weight_grad);
            }
            if let Some(node) = node_x {
                let shape = weight.shape();
                let kernel = [shape[2], shape[3]];
                let x_grad = if input_grad_is_a_convolution(&options, kernel) {
                    // The kernel flipped in space, in/out channels swapped, padded k - 1 - p.
                    let flipped = B::float_swap_dims(B::float_flip(weight, &[2, 3]), 0, 1);
                    let padding = [
                        kernel[0] - 1 - options.padding_begin()[0],
                        kernel[1] - 1 - options.padding_begin()[1],
                    ];
                    B::gemm_conv2d(grad, flipped, ConvOptions::new([1, 1], padding, [1, 1], 1))
                } else {
                    B::conv2d_x_backward(x, weight, grad, options)
                };
                grads.register::<B>(node.id, x_grad);
            }
        }
    }

    impl<B: Backend + GemmConvOps, C: CheckpointStrategy> GemmConvOps for Autodiff<B, C> {
        fn gemm_conv2d(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            options: ConvOptions<2>,
        ) -> FloatTensor<Self> {
            let nodes = [x.node(), weight.node()];
            let (x, weight) = (x.into_primitive(), weight.into_primitive());
            let output = B::gemm_conv2d(x.clone(), weight.clone(), options.clone());
            match GemmConv2d.prepare::<C>(nodes).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish((x, weight, options), output),
                OpsKind::UnTracked(prep) => prep.finish(output),
            }
        }

        /// Not differentiated again: computed on the inner backend, outside the graph.
        fn gemm_conv2d_weight_grad(
            x: FloatTensor<Self>,
            output_grad: FloatTensor<Self>,
            kernel: [usize; 2],
            options: ConvOptions<2>,
        ) -> FloatTensor<Self> {
            Self::from_inner(B::gemm_conv2d_weight_grad(
                Self::inner(x),
                Self::inner(output_grad),
                kernel,
                options,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Module;
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::{Device, Distribution};

    /// Output and gradients (input and weight) against burn's own `Conv2d`, for the stride-1
    /// case that takes the convolution path and a strided one that keeps burn's backward.
    #[test]
    fn matches_burns_convolution_forward_and_backward() {
        let device = Device::flex().autodiff();
        device.seed(5);
        // 9x9 images span several tiles of output positions; 2x2 ones with stride 2 (one
        // output position each) go several to a tile.
        for (kernel, stride, pad, size) in [
            (3, 1, 1, 9),
            (1, 1, 0, 9),
            (3, 2, 1, 9),
            (1, 2, 0, 9),
            (7, 2, 3, 9),
            (3, 2, 1, 2),
        ] {
            let conv = Conv2dConfig::new([4, 6], [kernel, kernel])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .with_bias(false)
                .init(&device);
            let x =
                Tensor::<4>::random([3, 4, size, size], Distribution::Normal(0.0, 1.0), &device);
            assert!(takes_gemm_path(&conv, &x));
            let run = |ours: bool| {
                let x = x.clone().detach().require_grad();
                let y = if ours {
                    forward(&conv, x.clone())
                } else {
                    conv.forward(x.clone())
                };
                let weights =
                    Tensor::<4>::ones(y.dims(), &device).mul_scalar(0.5) + y.clone().detach();
                let grads = (y.clone() * weights).sum().backward();
                let flat = |t: Tensor<4>| t.into_data().iter::<f32>().collect::<Vec<_>>();
                (
                    flat(y),
                    flat(x.grad(&grads).unwrap()),
                    flat(conv.weight.grad(&grads).unwrap()),
                )
            };
            let (ours, theirs) = (run(true), run(false));
            // Inference (no autodiff) takes the same forward.
            let plain = Device::flex();
            let conv_plain = conv.clone().valid();
            let x_plain = Tensor::<4>::from_data(x.to_data(), &plain);
            assert!(takes_gemm_path(&conv_plain, &x_plain));
            let inferred = forward(&conv_plain, x_plain)
                .into_data()
                .iter::<f32>()
                .collect::<Vec<_>>();
            assert_eq!(
                inferred, ours.0,
                "inference output differs from training output"
            );
            for (what, a, b) in [
                ("output", &ours.0, &theirs.0),
                ("input gradient", &ours.1, &theirs.1),
                ("weight gradient", &ours.2, &theirs.2),
            ] {
                assert_eq!(a.len(), b.len(), "{what}");
                for (i, (p, q)) in a.iter().zip(b).enumerate() {
                    assert!(
                        (p - q).abs() <= 1e-4 * (1.0 + q.abs()),
                        "kernel {kernel} stride {stride}: {what}[{i}] {p} vs {q}"
                    );
                }
            }
        }
    }
}
