use super::statistics;

/// The backward's sums in AVX-512 registers against the scalar loop, for each ReLU
/// mask: runs of 1 to 100 values (partial last vectors), zeros, negative and NaN
/// outputs (a NaN output lets its gradient through), gradients that are NaN where the
/// mask stops them (they must not leak into the sums).
#[cfg(target_arch = "x86_64")]
#[test]
fn vector_gradient_sums_match_the_scalar_ones() {
    use super::{ChannelNorm, Relu, avx512, gradient_sums, scalar_gradient_sums};
    if super::super::super::level() != super::super::super::Level::Avx512 {
        eprintln!("no AVX-512 on this CPU: the vector sums are not exercised here");
        return;
    }
    let norm = ChannelNorm::new([&[0.3], &[2.0]], [&[1.5], &[-0.2]], 1e-5, true);
    let passes = norm.passes(0);
    for len in [1usize, 7, 15, 16, 17, 33, 100] {
        let value = |i: usize, seed: usize| ((i * 37 + seed * 11) % 23) as f32 / 5.0 - 2.2;
        let xs: Vec<f32> = (0..len).map(|i| value(i, 1)).collect();
        let ys: Vec<f32> = (0..len)
            .map(|i| match i % 5 {
                0 => 0.0,
                1 => f32::NAN,
                _ => value(i, 2),
            })
            .collect();
        for relu in [Relu::None, Relu::Output(&ys), Relu::Input(&norm)] {
            // NaN gradients wherever this mask stops them.
            let dy: Vec<f32> = (0..len)
                .map(|i| {
                    let stopped = match &relu {
                        Relu::None => false,
                        Relu::Output(ys) => ys[i] <= 0.0,
                        Relu::Input(_) => !passes(xs[i]),
                    };
                    if stopped { f32::NAN } else { value(i, 3) }
                })
                .collect();
            let scalar = scalar_gradient_sums(&xs, &dy, &relu, [0, 0], 0.1);
            let vector = gradient_sums(&xs, &dy, &relu, [0, 0], 0.1);
            let mask = avx512::Mask::of(&relu, [0, 0], len);
            // SAFETY: the CPU has AVX-512F (checked above).
            let direct = unsafe { avx512::gradient_sums(&xs, &dy, mask, 0.1) };
            assert_eq!(vector, direct);
            for (v, s) in vector.iter().zip(scalar) {
                assert!(
                    v.is_finite() && (v - s).abs() <= 1e-5 * (1.0 + s.abs()),
                    "{len}: {v} vs {s}"
                );
            }
        }
    }
}

/// The one-pass mean and variance against the two-pass definition in f64, where the
/// mean is large against the spread (where `E[x^2] - E[x]^2` in f32 would return
/// noise) and each channel's first value lies several deviations from its mean; runs
/// of 37 values (the general sums) and of 16 and 64 (on AVX-512, in vectors).
#[test]
fn one_pass_statistics_match_the_two_pass_definition() {
    for s in [37, 16, 64] {
        let (n, c) = (5, 3);
        let mut state = 7u64;
        let mut uniform = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f64 / (1u64 << 24) as f64 - 0.5
        };
        let (means, spreads) = ([1000.0, -3.0, 0.0], [0.01, 2.0, 1e-3]);
        let mut xs: Vec<f32> = (0..n * c * s)
            .map(|i| {
                let ch = i / s % c;
                (means[ch] + spreads[ch] * uniform()) as f32
            })
            .collect();
        // First values 5 (uniform) deviations off.
        for ch in 0..c {
            xs[ch * s] = (means[ch] + spreads[ch] * 1.5) as f32;
        }
        let [mean, variance] = statistics(&xs, (n, c, s));
        for ch in 0..c {
            let values: Vec<f64> = (0..n)
                .flat_map(|b| xs[(b * c + ch) * s..][..s].iter().map(|&v| f64::from(v)))
                .collect();
            let m = values.iter().sum::<f64>() / values.len() as f64;
            let v = values.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / values.len() as f64;
            assert!(
                (f64::from(mean[ch]) - m).abs() <= 1e-6 * m.abs().max(spreads[ch]),
                "runs of {s}, channel {ch}: mean {} vs {m}",
                mean[ch]
            );
            assert!(
                (f64::from(variance[ch]) - v).abs() <= 1e-4 * v,
                "runs of {s}, channel {ch}: variance {} vs {v}",
                variance[ch]
            );
        }
    }
}
