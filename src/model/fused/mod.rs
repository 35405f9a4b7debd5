//! Operations of our own for flex, where burn 0.22's generic ones are slow: BatchNorm in
//! training mode (forward and backward in one pass each, with a following ReLU or residual
//! add + ReLU fused in; [`batch_norm`]), a norm fused into the convolution that reads it
//! ([`norm_conv`]), and the convolution (forward, input and weight gradients; in inference
//! too; [`conv`]). Each convolution takes the path that measured fastest for its shape: GEMM
//! on im2col, Winograd's F(4x4, 3x3) for 3x3 stride-1 layers with enough channels times
//! output width (their weight gradients by F(3x3, 2x2); `winograd`), kernels in AVX-512
//! registers for the narrowest layers and small 1x1 convolutions (`direct`), and under
//! `--precision bf16` AMX tiles ([`amx`]; without AMX the f32 paths).
//! Each is a burn backend extension with a hand-written backward; on any other backend or when
//! switched off, burn's own module forward runs instead, and burn's ops are the reference in
//! the tests.

pub mod amx;
pub mod batch_norm;
pub mod conv;
mod direct;
pub mod norm_conv;
pub mod step_cache;
mod winograd;

use std::sync::atomic::{AtomicBool, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns our operations off (or back on) process-wide: `byol bench train --burn-ops` measures
/// burn's own this way, for a before/after in one process.
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

pub(crate) fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

pub(crate) fn is_flex(device: &burn::tensor::Device) -> bool {
    matches!(
        device.clone().without_autodiff().as_dispatch(),
        burn::backend::DispatchDevice::Flex(_)
    )
}

/// Runs `f` compiled for AVX-512 where the CPU has it, else for AVX2 + FMA (the crate builds
/// for baseline x86-64, whose SSE2 handles four floats at a time), for a loop body inlined
/// into it (mark a large closure or function `#[inline(always)]`, and keep generic helpers
/// such as `std::array::from_fn` out of it: one left out of line is compiled for SSE2, and
/// whether it is depends on the rest of the caller). Results do not depend on
/// the width: the loops keep their own accumulation order, and Rust never fuses a multiply
/// and an add by itself. Used where it measured faster: BatchNorm's per-channel sums and the
/// Winograd transforms (the element-wise passes and the padded copies are bound by memory,
/// and gained nothing).
#[inline(always)]
pub(crate) fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
        fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        match level() {
            // SAFETY: the CPU has every feature `avx512` is compiled for.
            Level::Avx512 => return unsafe { avx512(f) },
            // SAFETY: the CPU has every feature `avx2` is compiled for.
            Level::Avx2 => return unsafe { avx2(f) },
            Level::Baseline => {}
        }
    }
    f()
}

/// The AVX-512 mask (`__mmask16`) of a vector's first `n` lanes, `n` at most 16: the masked
/// loads and stores of a partial vector.
const fn first_lanes(n: usize) -> u16 {
    ((1u32 << n) - 1) as u16
}

/// The widest vector instructions of this CPU that [`wide`] compiles for.
#[derive(Clone, Copy, PartialEq)]
enum Level {
    Avx512,
    Avx2,
    Baseline,
}

fn level() -> Level {
    static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") {
                return Level::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Level::Avx2;
            }
        }
        Level::Baseline
    })
}

/// Transposes a 16 x 16 block in place: the Winograd convolution's layout changes between
/// channel planes and channels-last pixels. With AVX-512, four rounds of two-register
/// permutes (round `k` swaps bit `k` of the row and column indices); with AVX2, four 8 x 8
/// transposes; value by value otherwise.
#[inline(always)]
fn transpose16(block: &mut [[f32; 16]; 16]) {
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: the CPU has AVX-512F.
        Level::Avx512 => return unsafe { transpose16_avx512(block) },
        // SAFETY: the CPU has AVX2.
        Level::Avx2 => return unsafe { transpose16_avx2(block) },
        Level::Baseline => {}
    }
    transpose16_scalar(block);
}

fn transpose16_scalar(block: &mut [[f32; 16]; 16]) {
    let copy = *block;
    for (r, row) in block.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v = copy[c][r];
        }
    }
}

/// Four 8 x 8 transposes (unpack, shuffle, swap of 128-bit halves), the off-diagonal blocks
/// stored in each other's place.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn transpose16_avx2(block: &mut [[f32; 16]; 16]) {
    use std::arch::x86_64::{
        __m256, _mm256_loadu_ps, _mm256_permute2f128_ps, _mm256_shuffle_ps, _mm256_storeu_ps,
        _mm256_unpackhi_ps, _mm256_unpacklo_ps,
    };
    #[inline]
    #[target_feature(enable = "avx2")]
    fn transposed(block: &[[f32; 16]; 16], [r0, c0]: [usize; 2]) -> [__m256; 8] {
        // SAFETY: each load reads 8 floats of a row of 16, from column 0 or 8.
        let r: [__m256; 8] =
            std::array::from_fn(|i| unsafe { _mm256_loadu_ps(block[r0 + i][c0..].as_ptr()) });
        let t: [__m256; 8] = std::array::from_fn(|i| {
            let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
            if i % 2 == 0 {
                _mm256_unpacklo_ps(a, b)
            } else {
                _mm256_unpackhi_ps(a, b)
            }
        });
        // Within each half of four rows: rows 4h + j from `t`'s pairs.
        let u: [__m256; 8] = std::array::from_fn(|i| {
            let (h, j) = (i / 4, i % 4);
            let (a, b) = (t[4 * h + j / 2], t[4 * h + 2 + j / 2]);
            if j % 2 == 0 {
                _mm256_shuffle_ps::<0x44>(a, b)
            } else {
                _mm256_shuffle_ps::<0xEE>(a, b)
            }
        });
        std::array::from_fn(|i| {
            let (a, b) = (u[i % 4], u[4 + i % 4]);
            if i < 4 {
                _mm256_permute2f128_ps::<0x20>(a, b)
            } else {
                _mm256_permute2f128_ps::<0x31>(a, b)
            }
        })
    }
    let blocks = [[0, 0], [0, 8], [8, 0], [8, 8]].map(|at| transposed(block, at));
    for (rows, [r0, c0]) in blocks.iter().zip([[0, 0], [8, 0], [0, 8], [8, 8]]) {
        for (i, row) in rows.iter().enumerate() {
            // SAFETY: as for the loads.
            unsafe { _mm256_storeu_ps(block[r0 + i][c0..].as_mut_ptr(), *row) };
        }
    }
}

/// Lane `c` of the new low row of round `k`: the low row's `c` where bit `k` of `c` is clear,
/// else the high row's `c - 2^k`; of the new high row: the low row's `c + 2^k`, else the high
/// row's `c` (indices of 16 and up pick from the second register).
const fn transpose_picks(k: usize, high: bool) -> [i32; 16] {
    let step = 1 << k;
    let mut lanes = [0; 16];
    let mut c = 0;
    while c < 16 {
        lanes[c] = match (high, c & step != 0) {
            (false, false) => c,
            (false, true) => 16 + c - step,
            (true, false) => c + step,
            (true, true) => 16 + c,
        } as i32;
        c += 1;
    }
    lanes
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose16_avx512(block: &mut [[f32; 16]; 16]) {
    use std::arch::x86_64::{
        __m512, __m512i, _mm512_loadu_ps, _mm512_loadu_si512, _mm512_permutex2var_ps,
        _mm512_storeu_ps,
    };
    const PICKS: [[[i32; 16]; 2]; 4] = {
        let mut picks = [[[0; 16]; 2]; 4];
        let mut k = 0;
        while k < 4 {
            picks[k] = [transpose_picks(k, false), transpose_picks(k, true)];
            k += 1;
        }
        picks
    };
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn round<const K: usize>(rows: &mut [__m512; 16]) {
        // SAFETY: each pick is 16 i32s, one 512-bit load.
        let [low, high] =
            PICKS[K].map(|pick| unsafe { _mm512_loadu_si512(pick.as_ptr() as *const __m512i) });
        let step = 1 << K;
        for base in (0..16).step_by(2 * step) {
            for r in base..base + step {
                let (a, b) = (rows[r], rows[r + step]);
                rows[r] = _mm512_permutex2var_ps(a, low, b);
                rows[r + step] = _mm512_permutex2var_ps(a, high, b);
            }
        }
    }
    // SAFETY: every row is 16 floats, as one 512-bit load or store reads or writes.
    let mut rows: [__m512; 16] =
        std::array::from_fn(|r| unsafe { _mm512_loadu_ps(block[r].as_ptr()) });
    round::<0>(&mut rows);
    round::<1>(&mut rows);
    round::<2>(&mut rows);
    round::<3>(&mut rows);
    for (r, row) in rows.iter().enumerate() {
        // SAFETY: as for the loads.
        unsafe { _mm512_storeu_ps(block[r].as_mut_ptr(), *row) };
    }
}

/// `len` floats written run by run in parallel: `fill(i, slots)` writes run `i` (`run` values;
/// the last run may be shorter). Unlike `vec![0.0; len]` and then the real values, nothing is
/// written twice (a zero-fill is a whole extra pass where the allocator reuses memory).
///
/// # Safety
/// `fill` must write every slot it is given.
unsafe fn written_by_runs(
    len: usize,
    run: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    use rayon::prelude::*;
    let mut values = Vec::with_capacity(len);
    values.spare_capacity_mut()[..len]
        .par_chunks_mut(run.max(1))
        .enumerate()
        .for_each(|(i, slots)| fill(i, slots));
    // SAFETY: the caller's `fill` wrote each of the first `len` values.
    unsafe { values.set_len(len) };
    values
}

/// `len` floats made run by run in parallel: each run of `run` values (the last may be
/// shorter) is zeroed and handed to `fill(i, values)` on the thread that then overwrites it.
/// Unlike `vec![0.0; len]` before parallel work, no serial pass over fresh memory first: the
/// zeros are written in cache, on every thread.
fn filled_by_runs(
    len: usize,
    run: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    // SAFETY: every slot of a run is written (zero) before `fill` sees the run.
    unsafe {
        written_by_runs(len, run, |i, slots| {
            for slot in slots.iter_mut() {
                slot.write(0.0);
            }
            // SAFETY: all of `slots` is initialised just above.
            let values = &mut *(slots as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]);
            fill(i, values);
        })
    }
}

/// `values` as slots of uninitialised memory to copy from, for [`written_by_runs`] fills
/// that copy (an initialised value is a valid `MaybeUninit`).
fn as_slots(values: &[f32]) -> &[std::mem::MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and the slice is only read.
    unsafe { &*(values as *const [f32] as *const [std::mem::MaybeUninit<f32>]) }
}

/// The inverse of [`as_slots`]: slots of a [`written_by_runs`] fill read back as values once
/// written, as a convolution's output sums read each sample.
///
/// # Safety
/// Every slot must have been written.
unsafe fn written(slots: &[std::mem::MaybeUninit<f32>]) -> &[f32] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and every slot is initialised (the
    // caller's promise).
    unsafe { &*(slots as *const [std::mem::MaybeUninit<f32>] as *const [f32]) }
}

/// The values of an f32 flex tensor in row-major order (copied only when it is strided).
pub(crate) fn contiguous_f32(t: &burn_flex::FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    assert_eq!(
        t.dtype(),
        burn::tensor::DType::F32,
        "byol's fused ops are f32 only"
    );
    match t.as_slice::<f32>() {
        Some(slice) => std::borrow::Cow::Borrowed(slice),
        // One copy: the contiguous tensor's buffer becomes the vector.
        None => std::borrow::Cow::Owned(
            t.to_contiguous()
                .into_data()
                .try_into_vec::<f32>()
                .expect("an f32 tensor holds f32 values"),
        ),
    }
}

/// A contiguous f32 flex tensor.
fn tensor(values: Vec<f32>, shape: burn::tensor::Shape) -> burn_flex::FlexTensor {
    burn_flex::FlexTensor::new(
        burn::tensor::Bytes::from_elems(values),
        burn_flex::Layout::contiguous(shape),
        burn::tensor::DType::F32,
    )
}

/// Values in [-1, 1) from a fixed linear congruential sequence, for the tests.
#[cfg(test)]
fn test_values(len: usize, seed: u64) -> Vec<f32> {
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

#[cfg(test)]
mod tests {
    #[test]
    fn transpose16_swaps_rows_and_columns() {
        // Every way this CPU can: AVX-512 (the dispatch), AVX2, and value by value.
        let mut transposes: Vec<fn(&mut [[f32; 16]; 16])> =
            vec![super::transpose16, super::transpose16_scalar];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            transposes.push(|block| unsafe { super::transpose16_avx2(block) });
        }
        for transpose in transposes {
            let mut block: [[f32; 16]; 16] =
                std::array::from_fn(|r| std::array::from_fn(|c| (r * 16 + c) as f32));
            transpose(&mut block);
            for (r, row) in block.iter().enumerate() {
                for (c, &v) in row.iter().enumerate() {
                    assert_eq!(v, (c * 16 + r) as f32, "[{r}][{c}]");
                }
            }
        }
    }
}
