use super::*;
use burn::module::Module;
use burn::tensor::{Device, Distribution};

/// Under a step's caches, a convolution keeps the per-sample sums of its output for the
/// norm that reads it (the bf16 pair-plane and im2col paths, and the f32 im2col, direct and
/// Winograd ones), and they are the sums of the output it returns; the norm takes them once.
/// Without the caches, or for an input gradient, nothing is kept.
#[test]
fn a_convolution_keeps_its_output_sums_for_the_next_norm() {
    use super::super::batch_norm::flex::sample_sums;
    use super::super::step_cache::{StepCacheScope, take_sums};
    use burn::tensor::Shape;
    use flex::Output;
    let values = |len: usize| super::super::test_values(len, 3);
    let amx = super::super::amx::available();
    // (C_in, C_out, image size, stride, bf16); outputs of one position go several samples
    // to a GEMM.
    for (cin, cout, size, stride, bf16) in [
        (32, 64, 16, 1, true),
        (32, 64, 8, 1, true),
        (32, 64, 2, 2, true),
        (6, 10, 9, 2, false),
        (6, 10, 2, 2, false),
        // The direct kernels (on AVX-512; elsewhere Winograd).
        (8, 16, 16, 1, false),
        // Winograd, point-major and (on AVX-512) tile-major, in blocks of tile rows.
        (6, 10, 9, 1, false),
        (16, 16, 9, 1, false),
    ] {
        if bf16 && !amx {
            continue;
        }
        // More samples than a GEMM takes (7 in the tests).
        let n = 9;
        let x = super::super::tensor(
            values(n * cin * size * size),
            Shape::new([n, cin, size, size]),
        );
        let weight = super::super::tensor(values(cout * cin * 9), Shape::new([cout, cin, 3, 3]));
        let options = ConvOptions::new([stride; 2], [1, 1], [1, 1], 1);
        let convolve = |output| {
            flex::convolve(
                x.clone(),
                weight.clone(),
                options.clone(),
                bf16,
                None,
                output,
            )
        };
        assert!(
            take_sums(&convolve(Output::Normalised)).is_none(),
            "kept without a scope"
        );
        let _scope = StepCacheScope::start();
        let gradient = convolve(Output::Gradient);
        assert!(take_sums(&gradient).is_none(), "kept for a gradient");
        let output = convolve(Output::Normalised);
        let sums = take_sums(&output).expect("sums kept under a scope");
        assert!(take_sums(&output).is_none(), "taken twice");
        let shape = output.layout().shape().clone();
        let positions = shape[2] * shape[3];
        let out = super::super::contiguous_f32(&output);
        let mut expected = vec![[0f32; 3]; n * cout];
        for (sums, sample) in expected
            .chunks_exact_mut(cout)
            .zip(out.chunks_exact(cout * positions))
        {
            sample_sums(sample, positions, sums);
        }
        assert_eq!(sums, expected, "{cin} -> {cout} at {size}, bf16 {bf16}");
    }
}

/// Output and gradients (input and weight) against burn's own `Conv2d`, for the stride-1
/// case that takes the convolution path and a strided one that keeps burn's backward.
#[test]
fn matches_burns_convolution_forward_and_backward() {
    let device = Device::flex().autodiff();
    device.seed(5);
    // 9x9 images span several tiles of output rows, 3x3 ones (and 5x5 with stride 2) end
    // in a partial tile (at stride 1, partial Winograd tiles too, and an im2col weight
    // gradient); 2x2 ones with stride 2 (one output position each) go several to a tile.
    for (kernel, stride, pad, size, [cin, cout]) in [
        (3, 1, 1, 9, [4, 6]),
        (1, 1, 0, 9, [4, 6]),
        (3, 2, 1, 9, [4, 6]),
        (1, 2, 0, 9, [4, 6]),
        (7, 2, 3, 9, [4, 6]),
        (3, 2, 1, 2, [4, 6]),
        (3, 1, 1, 3, [4, 6]),
        (3, 2, 1, 5, [4, 6]),
        // Output rows of 8 and 4: the fixed-size row copies (and Winograd at stride 1,
        // over several tile rows; at 2x2, one tile per sample, several samples per GEMM).
        (3, 1, 1, 8, [4, 6]),
        (3, 1, 1, 2, [4, 6]),
        (3, 2, 1, 8, [4, 6]),
        // 20 output channels: a Winograd weight gradient large enough that the threads
        // split its points rather than its samples.
        (3, 1, 1, 8, [4, 20]),
        // 16 to 64 channels: on AVX-512, 16 and 32 take the narrow kernels (the Winograd
        // transforms in registers and `winograd::point_products` in the forward and,
        // channels swapped, the input gradient; `winograd::gradient_products` in the
        // weight gradient), 32 to 64 gemm's.
        (3, 1, 1, 8, [16, 16]),
        (3, 1, 1, 8, [16, 32]),
        (3, 1, 1, 4, [32, 64]),
        // On AVX-512, rows of 16 and 32 with up to 16 channels on one side take the direct
        // kernels: one vector a row (blocks of 6, 3 and 1 rows; the input gradient too, channels
        // swapped) and two (blocks of 3 and 1; the stem's 3 input channels, whose input
        // gradient of 3 channels takes Winograd).
        (3, 1, 1, 16, [8, 16]),
        (3, 1, 1, 32, [3, 8]),
        // At stride 2 too, the forward and weight gradient, from the phase-split padding
        // (the input gradient by col2im).
        (3, 2, 1, 32, [8, 16]),
        // On AVX-512, 1x1 convolutions of whole vectors of positions take the pointwise
        // kernel (the input gradient too, channels swapped): planes of one vector (groups of
        // four blocks of 4 output channels at 16, of one block at 8), of four (runs of 3
        // and 1) and of nine (runs of 6 and 3), at stride 1 and of a stride-2 subsample.
        (1, 1, 0, 4, [8, 16]),
        (1, 2, 0, 8, [16, 8]),
        (1, 1, 0, 8, [16, 8]),
        (1, 1, 0, 12, [4, 12]),
        (1, 2, 0, 8, [6, 16]),
    ] {
        let conv = test_conv([cin, cout], kernel, stride, pad, &device);
        let x = Tensor::<4>::random(
            [3, cin, size, size],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        assert!(gemm_path(&conv, &x).is_some());
        let run = |ours: bool| {
            let x = x.clone().detach().require_grad();
            let y = if ours {
                forward(&conv, x.clone())
            } else {
                conv.forward(x.clone())
            };
            let weights = Tensor::<4>::ones(y.dims(), &device).mul_scalar(0.5) + y.clone().detach();
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
        assert!(gemm_path(&conv_plain, &x_plain).is_some());
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

/// Under a bf16 autocast scope the convolution takes bf16 GEMMs on AMX tiles where the CPU
/// has them: output and both gradients within bf16 rounding of burn's f32 convolution, for
/// stride-1 layers (their input gradient on the same GEMMs) and strided ones (theirs by
/// col2im), with depths beyond one tile. Narrow 3x3 stride-1 layers take f32 Winograd
/// instead (`BF16_WINOGRAD_MAX_CHANNELS`), their weight gradient up to 64 channels: those
/// results stay within f32 rounding. Without AMX every result takes our f32 path.
#[test]
fn bf16_convolution_stays_within_bf16_rounding_of_f32() {
    use crate::model::precision::{Precision, autocast};
    let device = Device::flex().autodiff();
    device.seed(9);
    // An odd channel count (3, as a stem) leaves the last channel pair half empty; the
    // strided 3x3 and 1x1 (a downsample) take the col2im input gradient.
    // Which of output, weight gradient and input gradient stay in f32 (Winograd).
    let has_amx = super::super::amx::available();
    let (amx, narrow, weight_grad_only) = if has_amx {
        ([false; 3], [true; 3], [false, true, false])
    } else {
        ([true; 3], [true; 3], [true; 3])
    };
    for (cin, cout, kernel, stride, size, in_f32) in [
        (40, 72, 3, 1, 9, amx),
        (24, 40, 3, 2, 7, amx),
        (3, 72, 3, 1, 8, amx),
        (36, 24, 1, 2, 8, amx),
        (16, 16, 3, 1, 8, narrow),
        (40, 36, 3, 1, 8, weight_grad_only),
        // Rows of 16 and 32-channel blocks: the forward and input gradient convolve planes
        // of channel pairs on AMX (`amx::convolve_pair_planes`), no im2col, and the weight
        // gradient sums flat positions on AMX (`flat_weight_grad`).
        (32, 64, 3, 1, 16, amx),
        // Rows of 8 (flat positions past each row's end), the rest by im2col.
        (96, 64, 3, 1, 8, amx),
        // Stride 2 with output rows of 16: the forward from the phase planes of channel
        // pairs (`pair_planes_convolve`), the gradients by im2col and col2im.
        (32, 64, 3, 2, 32, amx),
    ] {
        let pad = kernel / 2;
        let conv = test_conv([cin, cout], kernel, stride, pad, &device);
        let x = Tensor::<4>::random(
            [5, cin, size, size],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let side = (size + 2 * pad - kernel) / stride + 1;
        let weights = Tensor::<4>::random(
            [5, cout, side, side],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let run = |bf16: bool| {
            let x = x.clone().detach().require_grad();
            let y = if bf16 {
                let _bf16 = autocast(Precision::Bf16);
                let path = gemm_path(&conv, &x).map(|(_, bf16)| bf16);
                assert_eq!(path, Some(has_amx));
                forward(&conv, x.clone())
            } else {
                conv.forward(x.clone())
            };
            let grads = (y.clone() * weights.clone()).sum().backward();
            [
                y,
                x.grad(&grads).unwrap(),
                conv.weight.grad(&grads).unwrap(),
            ]
            .map(|t| t.into_data().iter::<f32>().collect::<Vec<_>>())
        };
        let (low, exact) = (run(true), run(false));
        {
            // With the weights' packings and flipped kernels kept: the same, made once
            // and then reused.
            let _kept = super::super::step_cache::StepCacheScope::start();
            assert_eq!(
                run(true),
                low,
                "{cin} -> {cout} stride {stride}, first kept"
            );
            assert_eq!(run(true), low, "{cin} -> {cout} stride {stride}, reused");
        }
        for ((what, low, exact), in_f32) in [
            ("output", &low[0], &exact[0]),
            ("weight gradient", &low[2], &exact[2]),
            ("input gradient", &low[1], &exact[1]),
        ]
        .into_iter()
        .zip(in_f32)
        {
            let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
            let error = low
                .iter()
                .zip(exact)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            let case = format!("{cin} -> {cout} stride {stride} {what}");
            if in_f32 {
                // Winograd's F(4x4, 3x3) alone rounds to about 1e-5 of the scale (2.2e-5
                // at 96 -> 64 in some draws: the tests share the device's generator).
                assert!(error < 1e-4 * scale, "{case}: error {error} vs {scale}");
            } else {
                assert!(error > 1e-5 * scale, "{case}: bf16 must round something");
                assert!(error < 2e-2 * scale, "{case}: error {error} vs {scale}");
            }
        }
    }
}
