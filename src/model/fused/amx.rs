//! bfloat16 matrix products on Intel AMX tiles (Sapphire Rapids and later), for the
//! convolutions of `--precision bf16` on the CPU: operands are rounded to bf16 while they are
//! packed into tile layout and products are summed in f32, as PyTorch's autocast does through
//! oneDNN. One tile multiply (`TDPBF16PS`) is a 16 x 16 x 32 product: 16 times the work of an
//! AVX-512 FMA in one instruction.
//!
//! Packed layouts (bf16 kept as `u16`), in blocks of 16 rows or columns and 32 depth values,
//! zero-padded:
//! - [`PackedA`] (`m x k`): per 16-row block, per 32-deep block, a tile of 16 rows of 32 values.
//! - [`PackedB`] (`k x n`): per 16-column block, per 32-deep block, a tile of 16 rows of depth
//!   *pairs*: its row `p` holds `B[2p][c], B[2p + 1][c]` for the 16 columns `c` (the layout
//!   `TDPBF16PS` takes).
//!
//! Row and column blocks are padded to an even count, so that every product runs one 2 x 2-tile
//! kernel (four accumulators, two A and two B tiles: the eight tile registers).
//!
//! A stride-1 convolution whose rows are whole 16-position segments and whose channels come in
//! blocks of 32 packs no input at all ([`convolve_pair_planes`]): with the input in planes of
//! channel pairs, 16 neighbouring positions of 16 channel pairs under one kernel tap are a B
//! tile as they lie in memory, rows a plane apart; its weight gradient likewise
//! ([`add_weight_gradient`]). At a stride the planes are split into the phases of the padded
//! positions, in which a tap's 16 positions are neighbours again (the forward only).

/// Rows of a tile, and columns of an output tile.
const ROWS: usize = 16;
/// bf16 values in a tile row (64 bytes).
const DEPTH: usize = 32;
/// `u16`s per tile (1 KiB).
const TILE: usize = ROWS * DEPTH;
/// Depth blocks per pass over the output (1024 values): shallower passes keep the operand
/// panels in L1 but reload the accumulators more often, and measured slower (16: 0.85x, 8: 0.7x
/// on ResNet-18's shapes); deeper ones gained nothing more.
const DEPTH_BLOCKS_PER_PASS: usize = 32;

/// Whether this CPU has AMX with bf16 and the kernel lets this process use it (Linux hands the
/// tile registers out only on request). Checked once.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            let amx = leaf7.edx & (1 << 22) != 0 && leaf7.edx & (1 << 24) != 0;
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: arch_prctl with these arguments only asks for a permission.
            amx && unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            } == 0
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        false
    })
}

/// `x` rounded to the nearest bfloat16 (ties to even), NaN kept a (quiet) NaN.
#[inline(always)]
fn bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        ((bits >> 16) as u16) | 0x40
    } else {
        rounded
    }
}

/// The blocks a packed operand spans: `outer` row (A) or column (B) blocks, `depth` blocks.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Blocks {
    outer: usize,
    depth: usize,
}

impl Blocks {
    fn new(outer: usize, depth: usize) -> Self {
        Blocks {
            outer: outer.div_ceil(ROWS).next_multiple_of(2),
            depth: depth.div_ceil(DEPTH),
        }
    }

    fn tiles(self) -> usize {
        self.outer * self.depth
    }

    /// The tile of outer block `o`, depth block `d`.
    fn tile(self, o: usize, d: usize) -> std::ops::Range<usize> {
        let at = (o * self.depth + d) * TILE;
        at..at + TILE
    }
}

/// The left operand of [`matmul`], `m x k`, packed.
pub struct PackedA<'a> {
    tiles: &'a [u16],
    blocks: Blocks,
    m: usize,
    k: usize,
}

/// A left operand packed into a buffer of its own, as the weight cache keeps it.
pub struct OwnedA {
    tiles: Vec<u16>,
    m: usize,
    k: usize,
}

impl OwnedA {
    /// The operand that `pack` packs into a fresh buffer.
    pub fn packed(pack: impl for<'a> FnOnce(&'a mut Vec<u16>) -> PackedA<'a>) -> Self {
        let mut tiles = Vec::new();
        let (m, k, len) = {
            let a = pack(&mut tiles);
            (a.m, a.k, a.tiles.len())
        };
        tiles.truncate(len);
        OwnedA { tiles, m, k }
    }

    pub fn view(&self) -> PackedA<'_> {
        PackedA {
            tiles: &self.tiles,
            blocks: Blocks::new(self.m, self.k),
            m: self.m,
            k: self.k,
        }
    }
}

/// The right operand of [`matmul`], `k x n`, packed.
pub struct PackedB<'a> {
    tiles: &'a [u16],
    blocks: Blocks,
    k: usize,
    n: usize,
}

/// `buffer` grown to `len` values (every one is written by the packers).
fn tiles_of(buffer: &mut Vec<u16>, len: usize) -> &mut [u16] {
    if buffer.len() < len {
        buffer.resize(len, 0);
    }
    &mut buffer[..len]
}

/// Packs an `m x k` A into `buffer`, its blocks of 16 rows in parallel: `row(i, values)`
/// writes row `i` into `values` (`k` floats, zero when it is handed over), e.g. gathered from
/// weights in another layout.
pub fn pack_a_rows<'a>(
    buffer: &'a mut Vec<u16>,
    [m, k]: [usize; 2],
    row: impl Fn(usize, &mut [f32]) + Sync,
) -> PackedA<'a> {
    use rayon::prelude::*;
    let blocks = Blocks::new(m, k);
    let tiles = tiles_of(buffer, blocks.tiles() * TILE);
    if blocks.depth > 0 {
        // The tiles of outer block `o` are contiguous, depth block by depth block.
        let block_len = blocks.depth * TILE;
        tiles
            .par_chunks_mut(block_len)
            .enumerate()
            .for_each(|(o, block)| {
                let mut values = vec![0f32; k];
                for r in 0..ROWS {
                    let i = o * ROWS + r;
                    values.fill(0.0);
                    if i < m {
                        row(i, &mut values);
                    }
                    for (d, values) in values.chunks(DEPTH).enumerate() {
                        convert(values, &mut block[d * TILE + r * DEPTH..][..DEPTH]);
                    }
                }
            });
    }
    PackedA {
        tiles,
        blocks,
        m,
        k,
    }
}

/// An `m x k` left operand packed one row at a time, e.g. from rows of an im2col that never
/// exists whole in f32.
pub struct PackingA<'a> {
    tiles: &'a mut [u16],
    blocks: Blocks,
    m: usize,
    k: usize,
    rows_set: usize,
}

impl<'a> PackingA<'a> {
    /// Packing into `buffer`; the padding rows are zeroed here.
    pub fn new(buffer: &'a mut Vec<u16>, [m, k]: [usize; 2]) -> Self {
        let blocks = Blocks::new(m, k);
        let tiles = tiles_of(buffer, blocks.tiles() * TILE);
        for i in m..blocks.outer * ROWS {
            for d in 0..blocks.depth {
                tiles[blocks.tile(i / ROWS, d)][i % ROWS * DEPTH..][..DEPTH].fill(0);
            }
        }
        PackingA {
            tiles,
            blocks,
            m,
            k,
            rows_set: 0,
        }
    }

    /// Sets row `i` (`k` values).
    pub fn row(&mut self, i: usize, values: &[f32]) {
        assert!(
            i < self.m && values.len() == self.k,
            "row {i} of A out of shape"
        );
        for (d, values) in values.chunks(DEPTH).enumerate() {
            let tile = &mut self.tiles[self.blocks.tile(i / ROWS, d)];
            convert(values, &mut tile[i % ROWS * DEPTH..][..DEPTH]);
        }
        self.rows_set += 1;
    }

    /// The operand, once each of its rows is set.
    pub fn finish(self) -> PackedA<'a> {
        assert_eq!(self.rows_set, self.m, "rows of A set");
        PackedA {
            tiles: self.tiles,
            blocks: self.blocks,
            m: self.m,
            k: self.k,
        }
    }
}

/// A `k x n` right operand packed a pair of depth rows at a time, e.g. from rows of an
/// im2col that never exists whole in f32.
pub struct PackingB<'a> {
    tiles: &'a mut [u16],
    blocks: Blocks,
    k: usize,
    n: usize,
    pairs_set: usize,
}

impl<'a> PackingB<'a> {
    /// Packing into `buffer`; the padding depth rows are zeroed here.
    pub fn new(buffer: &'a mut Vec<u16>, [k, n]: [usize; 2]) -> Self {
        let blocks = Blocks::new(n, k);
        let tiles = tiles_of(buffer, blocks.tiles() * TILE);
        for pair in k.div_ceil(2)..blocks.depth * ROWS {
            for o in 0..blocks.outer {
                tiles[blocks.tile(o, pair / ROWS)][pair % ROWS * DEPTH..][..DEPTH].fill(0);
            }
        }
        PackingB {
            tiles,
            blocks,
            k,
            n,
            pairs_set: 0,
        }
    }

    /// Sets depth rows `2 * pair` and `2 * pair + 1` from `values`, already in bf16 and
    /// interleaved (`B[2 * pair][j], B[2 * pair + 1][j]` for each `j`, `2 * n` values).
    pub fn interleaved_pair(&mut self, pair: usize, values: &[u16]) {
        assert!(
            2 * pair < self.k && values.len() == 2 * self.n,
            "interleaved depth rows {} and {} of B out of shape",
            2 * pair,
            2 * pair + 1
        );
        for o in 0..self.blocks.outer {
            let tile = &mut self.tiles[self.blocks.tile(o, pair / ROWS)];
            let out = &mut tile[pair % ROWS * DEPTH..][..DEPTH];
            let at = (o * DEPTH).min(values.len());
            let part = &values[at..(at + DEPTH).min(values.len())];
            if let Ok(full) = <&[u16; DEPTH]>::try_from(part) {
                // A fixed-size copy: vector moves, not a call to `memcpy`.
                *<&mut [u16; DEPTH]>::try_from(out).expect("a tile row") = *full;
                continue;
            }
            out[..part.len()].copy_from_slice(part);
            out[part.len()..].fill(0);
        }
        self.pairs_set += 1;
    }

    /// The operand, once each of its pairs of depth rows is set.
    pub fn finish(self) -> PackedB<'a> {
        assert_eq!(self.pairs_set, self.k.div_ceil(2), "depth rows of B set");
        PackedB {
            tiles: self.tiles,
            blocks: self.blocks,
            k: self.k,
            n: self.n,
        }
    }
}

/// Packs `B[d][j] = src[d * row_stride + j]` (`k x n`, columns contiguous) into `buffer`.
pub fn pack_b_rows<'a>(
    buffer: &'a mut Vec<u16>,
    src: &[f32],
    row_stride: usize,
    [k, n]: [usize; 2],
) -> PackedB<'a> {
    let mut packing = PackingB::new(buffer, [k, n]);
    let mut pair = vec![0u16; 2 * n];
    let row = |d: usize| -> &[f32] {
        if d < k {
            &src[d * row_stride..][..n]
        } else {
            &[]
        }
    };
    for p in 0..k.div_ceil(2) {
        interleave_runs(row(2 * p), row(2 * p + 1), &mut pair);
        packing.interleaved_pair(p, &pair);
    }
    packing.finish()
}

/// Packs a `k x n` B given by columns into `buffer`: column `j`'s depth values are the runs
/// `column_run(j, 0), column_run(j, 1), ...` of `run` values each (the last one may be
/// longer than what is left of `k`), as a weight gradient reads `dy` sample by sample.
pub fn pack_b_cols<'a, 's>(
    buffer: &'a mut Vec<u16>,
    [k, n]: [usize; 2],
    run: usize,
    column_run: impl Fn(usize, usize) -> &'s [f32],
) -> PackedB<'a> {
    let blocks = Blocks::new(n, k);
    let tiles = tiles_of(buffer, blocks.tiles() * TILE);
    // A depth block's values where they span two runs or more.
    let mut gathered = [0f32; DEPTH];
    for o in 0..blocks.outer {
        for d in 0..blocks.depth {
            let (d0, len) = (d * DEPTH, DEPTH.min(k - d * DEPTH));
            let tile = &mut tiles[blocks.tile(o, d)];
            // Each column's 32 depth values are 16 pairs, pair `p` going to tile row `p`.
            let mut column = [0u16; DEPTH];
            for j in 0..ROWS {
                let jj = o * ROWS + j;
                let values = if jj >= n {
                    &[][..]
                } else if d0 % run + len <= run {
                    &column_run(jj, d0 / run)[d0 % run..][..len]
                } else {
                    let mut filled = 0;
                    while filled < len {
                        let at = d0 + filled;
                        let take = (run - at % run).min(len - filled);
                        gathered[filled..filled + take]
                            .copy_from_slice(&column_run(jj, at / run)[at % run..][..take]);
                        filled += take;
                    }
                    &gathered[..len]
                };
                convert(values, &mut column);
                for (p, pair) in column.chunks_exact(2).enumerate() {
                    tile[p * DEPTH + 2 * j..][..2].copy_from_slice(pair);
                }
            }
        }
    }
    PackedB {
        tiles,
        blocks,
        k,
        n,
    }
}

/// `out` (32 values) = `values` (at most 32) as bf16, then zeros.
fn convert(values: &[f32], out: &mut [u16]) {
    assert!(values.len() <= DEPTH && out.len() == DEPTH);
    #[cfg(target_arch = "x86_64")]
    if vector_conversions() {
        // SAFETY: the CPU has the features (checked); the lengths are asserted inside.
        return unsafe { simd::convert(values, out) };
    }
    for (o, &v) in out.iter_mut().zip(values) {
        *o = bf16(v);
    }
    out[values.len()..].fill(0);
}

/// `out[2 * j], out[2 * j + 1]` = `first[j], second[j]` in bf16 (zero past the end of
/// `second`) for every value of `first` (`out` holds twice as many): two rows made one row of
/// depth pairs, as a B tile takes them.
pub fn interleave_runs(first: &[f32], second: &[f32], out: &mut [u16]) {
    assert_eq!(
        out.len(),
        2 * first.len(),
        "interleaved run is not two rows long"
    );
    #[cfg(target_arch = "x86_64")]
    if vector_conversions() {
        // SAFETY: the CPU has the features (checked); the lengths are asserted above.
        return unsafe { simd::interleave_runs(first, second, out) };
    }
    for (j, (out, &v)) in out.chunks_exact_mut(2).zip(first).enumerate() {
        out[0] = bf16(v);
        out[1] = second.get(j).map_or(0, |&v| bf16(v));
    }
}

/// Whether the packers convert with AVX-512 (every AMX CPU has it); the scalar loops are the
/// reference they are tested against. (The vector conversion flushes subnormal inputs to zero,
/// as the tile multiply does with subnormal bf16 anyway.)
#[cfg(target_arch = "x86_64")]
fn vector_conversions() -> bool {
    #[cfg(test)]
    if SCALAR_PACKING.get() {
        return false;
    }
    std::arch::is_x86_feature_detected!("avx512bf16")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

#[cfg(test)]
thread_local! {
    static SCALAR_PACKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{DEPTH, ROWS};
    use std::arch::x86_64::*;

    /// The first `len` lanes (at most 16) of a vector, from `values` at `from`.
    #[inline(always)]
    unsafe fn load(values: &[f32], from: usize) -> __m512 {
        let len = values.len().saturating_sub(from).min(16);
        let mask = super::super::first_lanes(len);
        // SAFETY: the mask enables only lanes inside `values`; masked lanes are not read.
        unsafe { _mm512_maskz_loadu_ps(mask, values.as_ptr().wrapping_add(from)) }
    }

    /// As `super::convert`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn convert(values: &[f32], out: &mut [u16]) {
        assert!(values.len() <= DEPTH && out.len() == DEPTH);
        // SAFETY: 64 bytes stored into `out` (32 u16s).
        unsafe {
            let packed = _mm512_cvtne2ps_pbh(load(values, 16), load(values, 0));
            _mm512_storeu_si512(
                out.as_mut_ptr().cast(),
                std::mem::transmute::<__m512bh, __m512i>(packed),
            );
        }
    }

    /// As `super::interleave_runs`, 16 pairs to a vector: the last one's loads and store
    /// masked to what is left.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn interleave_runs(first: &[f32], second: &[f32], out: &mut [u16]) {
        assert_eq!(out.len(), 2 * first.len());
        // Lane 2j takes value j (from `first`), lane 2j + 1 value 16 + j (from `second`).
        let order: [u16; 32] = std::array::from_fn(|i| (i / 2 + i % 2 * 16) as u16);
        // SAFETY: 64 bytes read from `order`; each store writes the pairs that lie in `out`.
        unsafe {
            let order = _mm512_loadu_si512(order.as_ptr().cast());
            for (block, out) in out.chunks_mut(2 * ROWS).enumerate() {
                let at = block * ROWS;
                let packed = _mm512_cvtne2ps_pbh(load(second, at), load(first, at));
                let pairs = _mm512_permutexvar_epi16(
                    order,
                    std::mem::transmute::<__m512bh, __m512i>(packed),
                );
                if out.len() == 2 * ROWS {
                    _mm512_storeu_si512(out.as_mut_ptr().cast(), pairs);
                } else {
                    let mask = ((1u64 << out.len()) - 1) as __mmask32;
                    _mm512_mask_storeu_epi16(out.as_mut_ptr().cast(), mask, pairs);
                }
            }
        }
    }
}

/// `dst[i * dst_row_stride + j] (+)= sum_d A[i][d] * B[d][j]` for the `m x n` of the operands,
/// on AMX tiles on this thread ([`available`] must hold); `accumulate` adds to `dst` instead of
/// overwriting it.
pub fn matmul(dst: &mut [f32], dst_row_stride: usize, a: &PackedA, b: &PackedB, accumulate: bool) {
    assert!(available(), "AMX bf16 tiles are not available");
    assert_eq!(a.k, b.k, "operand depths differ");
    let (m, n) = (a.m, b.n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(n <= dst_row_stride || m == 1, "destination rows overlap");
    assert!(
        dst.len() > (m - 1) * dst_row_stride + n - 1,
        "matmul destination out of bounds"
    );
    if a.k == 0 {
        if !accumulate {
            for row in 0..m {
                dst[row * dst_row_stride..][..n].fill(0.0);
            }
        }
        return;
    }
    let depth = a.blocks.depth;
    configure_tiles();
    // A pass's depth steps: the next packed tile of each operand, consecutive.
    let steps: Vec<[usize; 2]> = (0..DEPTH_BLOCKS_PER_PASS.min(depth))
        .map(|d| [d * TILE * 2; 2])
        .collect();
    for first in (0..depth).step_by(DEPTH_BLOCKS_PER_PASS) {
        let steps = &steps[..DEPTH_BLOCKS_PER_PASS.min(depth - first)];
        let load = accumulate || first > 0;
        // The operand whose block of this depth is larger is read once, the other once per
        // pair of its blocks: from cache.
        let pairs = |outer: usize| (0..outer).step_by(2);
        let a_larger = a.blocks.outer > b.blocks.outer;
        let (outer, inner) = if a_larger {
            (a.blocks.outer, b.blocks.outer)
        } else {
            (b.blocks.outer, a.blocks.outer)
        };
        for first_outer in pairs(outer) {
            for first_inner in pairs(inner) {
                let (ib, jb) = if a_larger {
                    (first_outer, first_inner)
                } else {
                    (first_inner, first_outer)
                };
                let a0 = a.tiles[a.blocks.tile(ib, first)].as_ptr();
                let a1 = a.tiles[a.blocks.tile(ib + 1, first)].as_ptr();
                let b0 = b.tiles[b.blocks.tile(jb, first)].as_ptr();
                let b1 = b.tiles[b.blocks.tile(jb + 1, first)].as_ptr();
                let (i0, j0) = (ib * ROWS, jb * ROWS);
                if i0 + 2 * ROWS <= m && j0 + 2 * ROWS <= n {
                    let c = &mut dst[i0 * dst_row_stride + j0..];
                    // SAFETY: the 32 x 32 block lies in `dst` (checked above: its last row
                    // ends before `m`'s), the operand panels hold a tile per step from
                    // `first` on, and the tiles are configured on this thread.
                    unsafe {
                        gathered_kernel(
                            [a0.cast(), a1.cast()],
                            [b0.cast(), b1.cast()],
                            steps,
                            [DEPTH * 2; 2],
                            (c.as_mut_ptr(), dst_row_stride),
                            load,
                        )
                    };
                    continue;
                }
                // A block at the edge: into a full one, then the part that exists.
                let mut block = Block([0.0; 4 * ROWS * ROWS]);
                // SAFETY: `block` is 32 x 32 with rows of 32; as above for the operands.
                unsafe {
                    gathered_kernel(
                        [a0.cast(), a1.cast()],
                        [b0.cast(), b1.cast()],
                        steps,
                        [DEPTH * 2; 2],
                        (block.0.as_mut_ptr(), 2 * ROWS),
                        false,
                    )
                };
                for i in 0..(m - i0).min(2 * ROWS) {
                    let part = &block.0[i * 2 * ROWS..][..(n - j0).min(2 * ROWS)];
                    let out = &mut dst[(i0 + i) * dst_row_stride + j0..][..part.len()];
                    for (o, &p) in out.iter_mut().zip(part) {
                        *o = if load { *o + p } else { p };
                    }
                }
            }
        }
    }
}

#[repr(align(64))]
struct Block([f32; 4 * ROWS * ROWS]);

/// Loads the tile configuration on this thread (once): all eight tiles 16 rows of 64 bytes.
fn configure_tiles() {
    thread_local! {
        static CONFIGURED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if CONFIGURED.get() {
        return;
    }
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }
    let mut config = Config {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        bytes_per_row: [0; 16],
        rows: [0; 16],
    };
    config.bytes_per_row[..8].fill((DEPTH * 2) as u16);
    config.rows[..8].fill(ROWS as u8);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a valid palette-1 configuration; `available` granted the tile state.
    unsafe {
        std::arch::asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly));
    }
    CONFIGURED.set(true);
}

/// The first floats of the four 16 x 16 quarters of the 32 x 32 block at `c` (rows
/// `c_row_stride` floats apart), in accumulator order: top left, top right, bottom left,
/// bottom right.
///
/// # Safety
/// `c` holds the block.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn corners(c: *mut f32, c_row_stride: usize) -> [*mut f32; 4] {
    // SAFETY: within the block (the caller's contract).
    unsafe {
        let below = c.add(ROWS * c_row_stride);
        [c, c.add(ROWS), below, below.add(ROWS)]
    }
}

/// Starts the four accumulator tiles (0-3): loaded from the 32 x 32 block of floats at `c`
/// (rows `c_row_stride` floats apart, laid out as [`store_accumulators`] writes them) when
/// `load`, zero otherwise.
///
/// # Safety
/// The tiles are configured on this thread and, when `load`, `c` holds the block.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn start_accumulators(c: *mut f32, c_row_stride: usize, load: bool) {
    use std::arch::asm;
    // SAFETY: the caller's contract.
    unsafe {
        if load {
            let [c00, c01, c10, c11] = corners(c, c_row_stride);
            asm!(
                "tileloadd tmm0, [{c00} + {s}*1]",
                "tileloadd tmm1, [{c01} + {s}*1]",
                "tileloadd tmm2, [{c10} + {s}*1]",
                "tileloadd tmm3, [{c11} + {s}*1]",
                c00 = in(reg) c00, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11,
                s = in(reg) c_row_stride * 4,
                options(nostack, readonly),
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
    }
}

/// Stores the four accumulator tiles (0-3) as one 32 x 32 block of floats at `c`, rows
/// `c_row_stride` floats apart: tile 0 top left, 1 top right, 2 bottom left, 3 bottom right.
///
/// # Safety
/// The tiles are configured on this thread and `c` holds the block.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_accumulators(c: *mut f32, c_row_stride: usize) {
    // SAFETY: the caller's contract.
    unsafe {
        let [c00, c01, c10, c11] = corners(c, c_row_stride);
        std::arch::asm!(
            "tilestored [{c00} + {s}*1], tmm0",
            "tilestored [{c01} + {s}*1], tmm1",
            "tilestored [{c10} + {s}*1], tmm2",
            "tilestored [{c11} + {s}*1], tmm3",
            c00 = in(reg) c00, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11,
            s = in(reg) c_row_stride * 4,
            options(nostack),
        );
    }
}

/// Whether [`convolve_pair_planes`] takes a stride-1 convolution of these sizes: whole
/// 32-channel depth blocks in and 32-channel row pairs out, rows of whole 16-position
/// segments, and an even number of segments per sample.
pub fn pair_planes_apply(cin: usize, cout: usize, [ho, wo]: [usize; 2]) -> bool {
    cin > 0
        && cin.is_multiple_of(DEPTH)
        && cout.is_multiple_of(2 * ROWS)
        && wo.is_multiple_of(ROWS)
        && (ho * wo / ROWS).is_multiple_of(2)
}

/// `values` in bf16 into `out` (as long), rounded to nearest even.
pub fn to_bf16(values: &[f32], out: &mut [u16]) {
    assert_eq!(values.len(), out.len(), "bf16 conversion lengths differ");
    let whole = values.len() / DEPTH * DEPTH;
    for (o, v) in out[..whole]
        .chunks_exact_mut(DEPTH)
        .zip(values.chunks_exact(DEPTH))
    {
        convert(v, o);
    }
    for (o, &v) in out[whole..].iter_mut().zip(&values[whole..]) {
        *o = bf16(v);
    }
}

/// One sample of a convolution read straight from its input, in bf16 planes of channel pairs,
/// padded and split into the `stride x stride` phases of the padded positions (`[C_in / 2,
/// stride, stride, hq, wq, 2]`: phase `(a, b)` holds padded position `(s y + a, s x + b)` at
/// `(y, x)` for `s = stride`; one phase, the padded plane, at stride 1), into `out` (`[C_out,
/// ho * wo]`, f32, each 32 x 32 block of products stored where it lands: rows are output
/// channels).
/// Kernel tap `(i, j)` of output position `(y, x)` reads phase `(i % stride, j % stride)` at
/// `(y + i / stride, x + j / stride)`, so the 16 output positions of a row segment under one
/// tap make a B tile whose rows (16 channel pairs, `stride^2` phase planes apart) are loaded
/// where they lie; `weights` is A, `[C_out, taps * C_in]` with the depth tap-major (`(i * kw +
/// j) * C_in + c`). Sizes as [`pair_planes_apply`].
#[allow(clippy::too_many_arguments)]
pub fn convolve_pair_planes(
    input: &[u16],
    [hq, wq, cin]: [usize; 3],
    stride: usize,
    [kh, kw]: [usize; 2],
    [ho, wo]: [usize; 2],
    weights: &PackedA,
    out: &mut [f32],
) {
    assert!(available(), "AMX bf16 tiles are not available");
    let cout = weights.m;
    assert!(pair_planes_apply(cin, cout, [ho, wo]), "unsupported sizes");
    assert_eq!(
        weights.k,
        kh * kw * cin,
        "weights' depth is not taps x C_in"
    );
    assert!(
        stride > 0 && hq >= ho + (kh - 1) / stride && wq >= wo + (kw - 1) / stride,
        "padded input too small"
    );
    let (phase, phases) = (hq * wq * 2, stride * stride);
    assert_eq!(
        input.len(),
        cin / 2 * phases * phase,
        "input is not [C_in / 2, stride, stride, hq, wq, 2]"
    );
    assert_eq!(out.len(), cout * ho * wo, "output is not [C_out, ho * wo]");
    // Per depth step (a tap and 32 channels): the byte offsets of its A tiles in the packed
    // panels and of its B rows from a segment's first position.
    let blocks = cin / DEPTH;
    let steps: Vec<[usize; 2]> = (0..kh * kw * blocks)
        .map(|d| {
            let (tap, block) = (d / blocks, d % blocks);
            let (i, j) = (tap / kw, tap % kw);
            let phase_at = (i % stride * stride + j % stride) * phase;
            let at = block * ROWS * phases * phase + phase_at + (i / stride * wq + j / stride) * 2;
            [d * TILE * 2, at * 2]
        })
        .collect();
    let segment = |q: usize| {
        let (y, x) = (q * ROWS / wo, q * ROWS % wo);
        // SAFETY: in bounds: `(y, x)` is an output position, every offset reads a tap of it.
        (unsafe { input.as_ptr().add((y * wq + x) * 2) }, y * wo + x)
    };
    configure_tiles();
    let positions = ho * wo;
    for ib in (0..weights.blocks.outer).step_by(2) {
        let a0 = weights.tiles[weights.blocks.tile(ib, 0)].as_ptr();
        let a1 = weights.tiles[weights.blocks.tile(ib + 1, 0)].as_ptr();
        for q in (0..positions / ROWS).step_by(2) {
            let ((b0, first), (b1, _)) = (segment(q), segment(q + 1));
            let c = &mut out[ib * ROWS * positions + first..];
            // SAFETY: the offsets stay in `input` and the panels (asserted sizes); the 32 x 32
            // block (two segments, adjacent in the output, of 32 output channels) lies in
            // `out`; the tiles are configured here.
            unsafe {
                gathered_kernel(
                    [a0.cast(), a1.cast()],
                    [b0.cast(), b1.cast()],
                    &steps,
                    [DEPTH * 2, phases * phase * 2],
                    (c.as_mut_ptr(), positions),
                    false,
                )
            };
        }
    }
}

/// `C (+)= [A0; A1] x [B0 B1]` for one 32 x 32 block of floats at `c` (rows `c_row_stride`
/// apart; added to when `load`), summed over `steps`: step `[a, b]` loads A0 and A1 from
/// `a0 + a`, `a1 + a` and B0 and B1 from `b0 + b`, `b1 + b` (byte offsets; tile rows
/// `strides` bytes apart), wherever the operands lie.
///
/// # Safety
/// The tiles are configured on this thread; every tile a step names lies in memory; `c`
/// holds the 32 x 32 block.
#[cfg(target_arch = "x86_64")]
unsafe fn gathered_kernel(
    [a0, a1]: [*const u8; 2],
    [b0, b1]: [*const u8; 2],
    steps: &[[usize; 2]],
    [a_stride, b_stride]: [usize; 2],
    (c, c_row_stride): (*mut f32, usize),
    load: bool,
) {
    use std::arch::asm;
    if steps.is_empty() {
        return;
    }
    // SAFETY: the caller's contract.
    unsafe {
        start_accumulators(c, c_row_stride, load);
        asm!(
            "2:",
            "mov {oa}, [{step}]",
            "mov {ob}, [{step} + 8]",
            "lea {t}, [{a0} + {oa}]",
            "tileloadd tmm4, [{t} + {sa}*1]",
            "lea {t}, [{b0} + {ob}]",
            "tileloadd tmm6, [{t} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "lea {t}, [{b1} + {ob}]",
            "tileloadd tmm7, [{t} + {sb}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "lea {t}, [{a1} + {oa}]",
            "tileloadd tmm5, [{t} + {sa}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {step}, 16",
            "dec {count}",
            "jnz 2b",
            a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1,
            step = inout(reg) steps.as_ptr() => _,
            oa = out(reg) _, ob = out(reg) _, t = out(reg) _,
            sa = in(reg) a_stride, sb = in(reg) b_stride,
            count = inout(reg) steps.len() => _,
            options(nostack, readonly),
        );
        store_accumulators(c, c_row_stride);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn gathered_kernel(
    _: [*const u8; 2],
    _: [*const u8; 2],
    _: &[[usize; 2]],
    _: [usize; 2],
    _: (*mut f32, usize),
    _: bool,
) {
    unreachable!("AMX is x86-64 only and `available` says so")
}

/// Whether [`add_weight_gradient`] takes a weight gradient with these channels.
pub fn weight_gradient_applies(cin: usize, cout: usize) -> bool {
    cin > 0 && cin.is_multiple_of(2 * ROWS) && cout > 0 && cout.is_multiple_of(2 * ROWS)
}

/// The operands of a stride-1 weight gradient laid out for [`add_weight_gradient`], per
/// sample: its input as bf16 planes (`[C_in, plane]`, each the padded image row after row,
/// `width` values a row, zeros after it) and its output gradient over the same flat positions
/// `y * width + x` (zero where `x` is past the output's width), in bf16 with positions in
/// pairs, `[flat / 2, C_out, 2]`.
pub struct FlatGradient<'a> {
    pub inputs: &'a [u16],
    pub grads: &'a [u16],
    pub plane: usize,
    pub flat: usize,
    pub width: usize,
    pub samples: usize,
}

/// `sum[(c * taps + tap) * C_out + co] += sum over samples and flat positions p of
/// x[c][p + offset(tap)] * dy[p][co]` (`taps` = `kh * kw`, tap `(i, j)` at offset `i * width +
/// j`), on AMX tiles: A tiles are 16 input channels' planes at 32 flat positions, B tiles 32
/// positions' (16 pairs') gradients of 16 output channels, both loaded where they lie, and each
/// 32 x 32 block of the sum stays in the tiles over all positions. No im2col: the taps are
/// offsets into the same planes.
pub fn add_weight_gradient(
    operands: &FlatGradient,
    [cin, cout]: [usize; 2],
    [kh, kw]: [usize; 2],
    sum: &mut [f32],
) {
    assert!(available(), "AMX bf16 tiles are not available");
    let FlatGradient {
        inputs,
        grads,
        plane,
        flat,
        width,
        samples,
    } = *operands;
    assert!(weight_gradient_applies(cin, cout), "unsupported channels");
    assert!(
        flat.is_multiple_of(DEPTH),
        "flat positions are not whole depth blocks"
    );
    assert!(
        plane >= flat + (kh - 1) * width + kw - 1,
        "planes too short for every tap"
    );
    assert_eq!(
        inputs.len(),
        samples * cin * plane,
        "inputs are not [S, C_in, plane]"
    );
    assert_eq!(
        grads.len(),
        samples * flat * cout,
        "gradients are not [S, flat, C_out]"
    );
    let taps = kh * kw;
    assert_eq!(
        sum.len(),
        cin * taps * cout,
        "sum is not [C_in * taps, C_out]"
    );
    // Per depth step (32 flat positions of one sample): the byte offsets of its A rows and of
    // its B rows.
    let steps: Vec<[usize; 2]> = (0..samples)
        .flat_map(|s| {
            (0..flat / DEPTH).map(move |block| {
                let a = (s * cin * plane + block * DEPTH) * 2;
                let b = (s * flat + block * DEPTH) * cout * 2;
                [a, b]
            })
        })
        .collect();
    configure_tiles();
    let (a_stride, b_stride) = (plane * 2, cout * 4);
    for tap in 0..taps {
        let offset = tap / kw * width + tap % kw;
        for c0 in (0..cin).step_by(2 * ROWS) {
            // SAFETY: in bounds (asserted sizes): channel `c0 + 16` and this tap's offset.
            let a0 = unsafe { inputs.as_ptr().add(c0 * plane + offset) };
            let a1 = unsafe { a0.add(ROWS * plane) };
            for co in (0..cout).step_by(2 * ROWS) {
                // SAFETY: a pair's values of output channel `co + 16`.
                let b0 = unsafe { grads.as_ptr().add(co * 2) };
                let b1 = unsafe { b0.add(ROWS * 2) };
                let c = &mut sum[(c0 * taps + tap) * cout + co..];
                // SAFETY: every step's tiles lie in the operands (asserted sizes; a plane
                // holds every tap's reads), the 32 x 32 block lies in `sum` (rows `taps *
                // C_out` apart), and the tiles are configured here.
                unsafe {
                    gathered_kernel(
                        [a0.cast(), a1.cast()],
                        [b0.cast(), b1.cast()],
                        &steps,
                        [a_stride, b_stride],
                        (c.as_mut_ptr(), taps * cout),
                        true,
                    )
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packs `A[i][d] = src[i * row_stride + d]` (`m x k`, depth contiguous) into `buffer`.
    fn pack_a<'a>(
        buffer: &'a mut Vec<u16>,
        src: &[f32],
        row_stride: usize,
        [m, k]: [usize; 2],
    ) -> PackedA<'a> {
        pack_a_rows(buffer, [m, k], |i, row| {
            row.copy_from_slice(&src[i * row_stride..][..k]);
        })
    }

    fn f32_of(b: u16) -> f32 {
        f32::from_bits((b as u32) << 16)
    }

    /// A deterministic spread of values, a few of them tiny or large.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    /// The pair-plane convolution against the sums it stands for, on bf16-exact values (so that
    /// only the order of the f32 additions differs): segments paired within a row (32 wide)
    /// and across rows (16 wide), 3x3 and 1x1 kernels, several output row pairs; at stride 2
    /// from the four phase planes of the padded input.
    #[test]
    fn convolves_pair_planes() {
        if !available() {
            eprintln!("no AMX on this CPU: the pair-plane convolution is not exercised here");
            return;
        }
        for (cin, cout, [ho, wo], k, stride) in [
            (32, 64, [16usize, 16], 3usize, 1usize),
            (64, 32, [3, 32], 3, 1),
            (32, 96, [2, 16], 1, 1),
            (32, 64, [4, 16], 3, 2),
            (64, 32, [2, 32], 3, 2),
        ] {
            // The padded input, `stride` phases of `[hq, wq]` each way.
            let (hq, wq) = (
                (ho - 1) + (k - 1) / stride + 1,
                (wo - 1) + (k - 1) / stride + 1,
            );
            let (hp, wp) = (stride * hq, stride * wq);
            assert!(hp >= (ho - 1) * stride + k && wp >= (wo - 1) * stride + k);
            let exact = |v: Vec<f32>| v.into_iter().map(|x| f32_of(bf16(x))).collect::<Vec<_>>();
            // `[C_in, hp, wp]`, padding included (its values are read like any others).
            let input = exact(values(cin * hp * wp, 11));
            let weight = exact(values(cout * cin * k * k, 12));
            let taps = k * k;
            let (phase, phases) = (hq * wq * 2, stride * stride);
            let mut pairs = vec![0u16; cin / 2 * phases * phase];
            for c in 0..cin {
                for (py, px) in (0..hp).flat_map(|py| (0..wp).map(move |px| (py, px))) {
                    let plane = (c / 2 * stride + py % stride) * stride + px % stride;
                    let at = plane * phase + (py / stride * wq + px / stride) * 2 + c % 2;
                    pairs[at] = bf16(input[(c * hp + py) * wp + px]);
                }
            }
            let mut buffer = Vec::new();
            let a = pack_a_rows(&mut buffer, [cout, taps * cin], |co, row| {
                for c in 0..cin {
                    for t in 0..taps {
                        row[t * cin + c] = weight[(co * cin + c) * taps + t];
                    }
                }
            });
            let mut out = vec![f32::NAN; cout * ho * wo];
            let sizes = [hq, wq, cin];
            convolve_pair_planes(&pairs, sizes, stride, [k, k], [ho, wo], &a, &mut out);
            for co in 0..cout {
                for y in 0..ho {
                    for x in 0..wo {
                        let mut sum = 0f64;
                        for t in 0..taps {
                            let (i, j) = (t / k, t % k);
                            let (py, px) = (stride * y + i, stride * x + j);
                            for c in 0..cin {
                                sum += input[(c * hp + py) * wp + px] as f64
                                    * weight[(co * cin + c) * taps + t] as f64;
                            }
                        }
                        let got = out[(co * ho + y) * wo + x] as f64;
                        assert!(
                            (got - sum).abs() <= 1e-5 * (1.0 + sum.abs()),
                            "{cin} -> {cout}, {ho}x{wo}, k {k}, stride {stride}: [{co}, {y}, \
                             {x}] {got} vs {sum}"
                        );
                    }
                }
            }
        }
    }

    /// The flat weight gradient against the sums it stands for, on bf16-exact values: 3x3 with
    /// padding (rows of 8, 16 and 5 wide, so flat positions past each row's end and a last
    /// partial block), and 1x1; several samples, channel pairs and output column pairs.
    #[test]
    fn sums_weight_gradients_over_flat_positions() {
        if !available() {
            eprintln!("no AMX on this CPU: the flat weight gradient is not exercised here");
            return;
        }
        for (samples, cin, cout, [h, w], k) in [
            (2, 32, 64, [8usize, 8], 3usize),
            (3, 64, 32, [4, 16], 3),
            (1, 32, 32, [5, 5], 3),
            (2, 32, 32, [6, 6], 1),
        ] {
            let pad = k / 2;
            let (width, ho, wo) = (w + 2 * pad, h, w);
            let flat = (ho * width).next_multiple_of(DEPTH);
            let plane = (flat + (k - 1) * width + k - 1).next_multiple_of(DEPTH);
            let exact = |v: Vec<f32>| v.into_iter().map(|x| f32_of(bf16(x))).collect::<Vec<_>>();
            let x = exact(values(samples * cin * h * w, 21));
            let dy = exact(values(samples * cout * ho * wo, 22));
            let mut inputs = vec![0u16; samples * cin * plane];
            for (s, c, y, xx) in positions_of(samples, cin, h, w) {
                inputs[(s * cin + c) * plane + (y + pad) * width + xx + pad] =
                    bf16(x[((s * cin + c) * h + y) * w + xx]);
            }
            let mut grads = vec![0u16; samples * flat * cout];
            for (s, co, y, xx) in positions_of(samples, cout, ho, wo) {
                let f = y * width + xx;
                grads[((s * flat / 2 + f / 2) * cout + co) * 2 + f % 2] =
                    bf16(dy[((s * cout + co) * ho + y) * wo + xx]);
            }
            let operands = FlatGradient {
                inputs: &inputs,
                grads: &grads,
                plane,
                flat,
                width,
                samples,
            };
            let taps = k * k;
            let before = values(cin * taps * cout, 23);
            let mut sum = before.clone();
            add_weight_gradient(&operands, [cin, cout], [k, k], &mut sum);
            for c in 0..cin {
                for tap in 0..taps {
                    let (i, j) = (tap / k, tap % k);
                    for co in 0..cout {
                        let mut expected = before[(c * taps + tap) * cout + co] as f64;
                        for (s, _, y, xx) in positions_of(samples, 1, ho, wo) {
                            let (yi, xj) = (
                                (y + i) as isize - pad as isize,
                                (xx + j) as isize - pad as isize,
                            );
                            if yi < 0 || xj < 0 || yi >= h as isize || xj >= w as isize {
                                continue;
                            }
                            expected += x[((s * cin + c) * h + yi as usize) * w + xj as usize]
                                as f64
                                * dy[((s * cout + co) * ho + y) * wo + xx] as f64;
                        }
                        let got = sum[(c * taps + tap) * cout + co] as f64;
                        assert!(
                            (got - expected).abs() <= 1e-5 * (1.0 + expected.abs()),
                            "{cin} -> {cout}, {h}x{w}, k {k}: [{c}, {tap}, {co}] {got} vs {expected}"
                        );
                    }
                }
            }
        }
    }

    /// Every `(sample, channel, y, x)` of `[samples, channels, h, w]`, in order.
    fn positions_of(
        samples: usize,
        channels: usize,
        h: usize,
        w: usize,
    ) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        (0..samples).flat_map(move |s| {
            (0..channels)
                .flat_map(move |c| (0..h).flat_map(move |y| (0..w).map(move |x| (s, c, y, x))))
        })
    }

    #[test]
    fn rounds_to_nearest_even_bfloat16() {
        assert_eq!(bf16(1.0), 0x3f80);
        assert_eq!(bf16(-2.5), 0xc020);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even (1.0).
        assert_eq!(bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to 1 + 2^-6.
        assert_eq!(bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16(1.0 + 1.1 / 256.0), 0x3f81);
        assert_eq!(bf16(f32::MAX), 0x7f80, "overflow rounds to infinity");
        assert_eq!(bf16(f32::INFINITY), 0x7f80);
        assert!(f32_of(bf16(f32::NAN)).is_nan());
        assert!(f32_of(bf16(-f32::NAN)).is_nan());
        for v in values(1000, 3) {
            let r = f32_of(bf16(v));
            assert!((r - v).abs() <= v.abs() / 256.0, "{v} -> {r}");
        }
    }

    /// Every packed value sits where the tile layout says, as the bf16 of its source, and the
    /// padding is zero: each shape leaves partial blocks of rows, columns or depth. Both with
    /// the AVX-512 conversions (where the CPU has them) and the scalar ones.
    #[test]
    fn packs_operands_in_tile_layout() {
        for scalar in [false, true] {
            SCALAR_PACKING.set(scalar);
            packs_in_tile_layout();
        }
        SCALAR_PACKING.set(false);
    }

    fn packs_in_tile_layout() {
        for [m, n, k] in [
            [1, 1, 1],
            [16, 16, 32],
            [17, 33, 33],
            [40, 5, 70],
            [3, 50, 31],
        ] {
            let a_src = values(m * (k + 3), 1);
            let mut buffer = Vec::new();
            let a = pack_a(&mut buffer, &a_src, k + 3, [m, k]);
            assert_eq!(a.tiles.len() % (2 * TILE), 0);
            for (at, &v) in a.tiles.iter().enumerate() {
                let (tile, within) = (at / TILE, at % TILE);
                let (o, d) = (tile / a.blocks.depth, tile % a.blocks.depth);
                let (i, kk) = (o * ROWS + within / DEPTH, d * DEPTH + within % DEPTH);
                let expected = if i < m && kk < k {
                    bf16(a_src[i * (k + 3) + kk])
                } else {
                    0
                };
                assert_eq!(v, expected, "A [{m}, {k}] at ({i}, {kk})");
            }
            let b_src = values(k * (n + 2), 2);
            let by_rows = pack_b_rows(&mut buffer, &b_src, n + 2, [k, n])
                .tiles
                .to_vec();
            // The same matrix stored by columns packs to the same tiles.
            let mut transposed = vec![0.0; n * (k + 1)];
            for d in 0..k {
                for j in 0..n {
                    transposed[j * (k + 1) + d] = b_src[d * (n + 2) + j];
                }
            }
            // Also in runs of 7, which split depth blocks of 32.
            let b = pack_b_cols(&mut buffer, [k, n], 7, |j, r| {
                &transposed[j * (k + 1) + 7 * r..][..7.min(k + 1 - 7 * r)]
            })
            .tiles
            .to_vec();
            assert_eq!(
                b, by_rows,
                "B [{k}, {n}] by rows vs by columns in runs of 7"
            );
            let b = pack_b_cols(&mut buffer, [k, n], k, |j, _| {
                &transposed[j * (k + 1)..][..k]
            });
            assert_eq!(b.tiles, &by_rows[..], "B [{k}, {n}] by rows vs by columns");
            for (at, &v) in b.tiles.iter().enumerate() {
                let (tile, within) = (at / TILE, at % TILE);
                let (o, d) = (tile / b.blocks.depth, tile % b.blocks.depth);
                let (p, j, half) = (within / DEPTH, within % DEPTH / 2, within % 2);
                let (kk, jj) = (d * DEPTH + 2 * p + half, o * ROWS + j);
                let expected = if kk < k && jj < n {
                    bf16(b_src[kk * (n + 2) + jj])
                } else {
                    0
                };
                assert_eq!(v, expected, "B [{k}, {n}] at ({kk}, {jj})");
            }
        }
    }

    /// On a CPU with AMX: products against f64 sums of the same bf16 values, overwriting and
    /// accumulating, with depths that span several passes and shapes with edge blocks.
    #[test]
    fn multiplies_on_amx_tiles() {
        if !available() {
            eprintln!("no AMX on this CPU: the tile product is not exercised here");
            return;
        }
        for [m, n, k] in [
            [32, 32, 32],
            [64, 96, 600],
            [17, 45, 27],
            [1, 1, 1],
            [100, 31, 1100],
        ] {
            let stride = n + 5;
            let (a_src, b_src) = (values(m * k, 4), values(k * n, 5));
            let before = values(m * stride, 6);
            let (mut a_buffer, mut b_buffer) = (Vec::new(), Vec::new());
            let a = pack_a(&mut a_buffer, &a_src, k, [m, k]);
            let b = pack_b_rows(&mut b_buffer, &b_src, n, [k, n]);
            for accumulate in [false, true] {
                let mut dst = before.clone();
                matmul(&mut dst, stride, &a, &b, accumulate);
                for i in 0..m {
                    for j in 0..stride {
                        let got = dst[i * stride + j];
                        if j >= n {
                            assert_eq!(got, before[i * stride + j], "outside the product");
                            continue;
                        }
                        let (mut sum, mut scale) = (0f64, 0f64);
                        for d in 0..k {
                            let p = f32_of(bf16(a_src[i * k + d])) as f64
                                * f32_of(bf16(b_src[d * n + j])) as f64;
                            sum += p;
                            scale += p.abs();
                        }
                        if accumulate {
                            sum += before[i * stride + j] as f64;
                        }
                        assert!(
                            (got as f64 - sum).abs() <= 1e-5 * (scale + 1.0),
                            "[{m}, {n}, {k}] accumulate {accumulate} ({i}, {j}): {got} vs {sum}"
                        );
                    }
                }
            }
        }
    }
}
