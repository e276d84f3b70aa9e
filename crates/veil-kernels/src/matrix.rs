//! A quantized weight matrix and the threaded product driver.

use std::cell::RefCell;
use std::fmt;
use std::sync::{Mutex, PoisonError};

use half::f16;

use crate::activation::{ActivationRow, ActivationTile, Activations, TILE};
use crate::{scalar, Isa, KernelError, BLOCK};

/// The GGUF block formats these kernels multiply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// 4-bit values with a scale and an offset per block: `w = d * q + m` (20 bytes).
    Q4_1,
    /// 8-bit values with a scale per block: `w = d * q` (34 bytes).
    Q8_0,
}

impl QuantFormat {
    /// Bytes per block of 32 values, as GGUF lays them out.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantFormat::Q4_1 => 20,
            QuantFormat::Q8_0 => 34,
        }
    }

    /// Bytes of quantized values per block (the rest are f16 scale and offset).
    fn value_bytes(self) -> usize {
        match self {
            QuantFormat::Q4_1 => 16,
            QuantFormat::Q8_0 => 32,
        }
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QuantFormat::Q4_1 => "q4_1",
            QuantFormat::Q8_0 => "q8_0",
        })
    }
}

/// A `(rows, cols)` weight matrix in a block format: the rows of a GGUF tensor (the outputs of
/// a linear layer), unpacked at load into values, scales and offsets held apart, so the kernels
/// load eight scales at once and convert no f16 in the hot loop.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    format: QuantFormat,
    rows: usize,
    cols: usize,
    /// Each block's quantized values, blocks in row order.
    qs: Vec<u8>,
    /// Each block's scale.
    d: Vec<f32>,
    /// Each block's offset (Q4_1 only).
    m: Vec<f32>,
    /// Each block's sum of quantized values (Q8_0 only): VNNI multiplies `q · (x + 128)` and
    /// takes `128 · Σq` back off.
    sums: Vec<i32>,
}

/// One row of a [`QuantMatrix`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct WeightRow<'a> {
    pub qs: &'a [u8],
    pub d: &'a [f32],
    pub m: &'a [f32],
    pub sums: &'a [i32],
}

/// After whole tiles of [`TILE`] tokens, this many tokens are multiplied at once against a
/// weight row (then one at a time), so the weight block is unpacked once for all of them.
const SMALL_TILE: usize = 4;

thread_local! {
    /// The quantized activations of the product in progress on this thread, kept between calls
    /// so decoding does not allocate them per token.
    static ACTIVATIONS: RefCell<Activations> = RefCell::new(Activations::default());
}

impl QuantMatrix {
    /// Unpacks a matrix's raw GGUF blocks, checking they fit its shape.
    pub fn new(
        format: QuantFormat,
        rows: usize,
        cols: usize,
        data: &[u8],
    ) -> Result<Self, KernelError> {
        if rows == 0 || cols == 0 || !cols.is_multiple_of(BLOCK) {
            return Err(KernelError::BadMatrix(format!(
                "shape ({rows}, {cols}): both must be positive and the columns a multiple of {BLOCK}"
            )));
        }
        let expected = rows
            .checked_mul(cols / BLOCK)
            .and_then(|blocks| blocks.checked_mul(format.block_bytes()));
        if expected != Some(data.len()) {
            return Err(KernelError::BadMatrix(format!(
                "{} bytes for a ({rows}, {cols}) {format} matrix, expected {expected:?}",
                data.len()
            )));
        }
        let blocks = data.len() / format.block_bytes();
        let mut matrix = Self {
            format,
            rows,
            cols,
            qs: Vec::with_capacity(blocks * format.value_bytes()),
            d: Vec::with_capacity(blocks),
            m: Vec::new(),
            sums: Vec::new(),
        };
        for block in data.chunks_exact(format.block_bytes()) {
            matrix.d.push(f16_at(block, 0));
            match format {
                QuantFormat::Q4_1 => {
                    matrix.m.push(f16_at(block, 2));
                    matrix.qs.extend_from_slice(&block[4..]);
                }
                QuantFormat::Q8_0 => {
                    matrix.qs.extend_from_slice(&block[2..]);
                    matrix
                        .sums
                        .push(block[2..].iter().map(|&q| i32::from(q as i8)).sum());
                }
            }
        }
        Ok(matrix)
    }

    /// The block format.
    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The matrix as `rows * cols` floats, row-major: the reference the kernels are tested
    /// against, and what re-quantizing starts from.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        let values = self.qs.chunks_exact(self.format.value_bytes());
        for (b, qs) in values.enumerate() {
            let d = self.d[b];
            match self.format {
                QuantFormat::Q4_1 => {
                    let m = self.m[b];
                    out.extend(qs.iter().map(|q| d * f32::from(q & 0x0F) + m));
                    out.extend(qs.iter().map(|q| d * f32::from(q >> 4) + m));
                }
                QuantFormat::Q8_0 => out.extend(qs.iter().map(|&q| d * f32::from(q as i8))),
            }
        }
        out
    }

    /// `out = x · selfᵀ` for `x` of shape `(tokens, cols)`, `out` of shape `(tokens, rows)`,
    /// on the fastest kernels this CPU has.
    pub fn matmul(&self, x: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
        self.matmul_with(Isa::best(), x, out)
    }

    /// [`matmul`](Self::matmul) on the given kernel family.
    pub fn matmul_with(&self, isa: Isa, x: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
        if !isa.is_available() {
            return Err(KernelError::Unsupported(isa));
        }
        if !x.len().is_multiple_of(self.cols) {
            return Err(KernelError::Shape(format!(
                "{} activations are not whole rows of {}",
                x.len(),
                self.cols
            )));
        }
        let tokens = x.len() / self.cols;
        if out.len() != tokens * self.rows {
            return Err(KernelError::Shape(format!(
                "output holds {} values, {tokens} tokens × {} rows need {}",
                out.len(),
                self.rows,
                tokens * self.rows
            )));
        }
        if tokens == 0 {
            return Ok(());
        }
        let kernel = RowKernel::new(self.format, isa);
        ACTIVATIONS.with(|cell| {
            let mut acts = cell.borrow_mut();
            acts.quantize(x, isa);
            acts.prepare_tiles(self.cols / BLOCK);
            self.multiply(&kernel, &acts, tokens, out);
        });
        Ok(())
    }

    /// Weight row `r`.
    fn row(&self, r: usize) -> WeightRow<'_> {
        let blocks = self.cols / BLOCK;
        let values = blocks * self.format.value_bytes();
        WeightRow {
            qs: &self.qs[r * values..(r + 1) * values],
            d: &self.d[r * blocks..(r + 1) * blocks],
            m: self.m.get(r * blocks..(r + 1) * blocks).unwrap_or_default(),
            sums: self
                .sums
                .get(r * blocks..(r + 1) * blocks)
                .unwrap_or_default(),
        }
    }

    /// Splits the weight rows over candle's barrier pool (persistent threads that spin
    /// briefly between calls, so a decode step's hundreds of small products do not each pay a
    /// thread wake-up; the calling thread takes a share). One token writes its outputs
    /// directly; several tokens are computed weight row by weight row (each weight row unpacked
    /// once for a tile of [`TILE`] tokens) into a transposed buffer, then transposed into `out`.
    fn multiply(&self, kernel: &RowKernel, acts: &Activations, tokens: usize, out: &mut [f32]) {
        let per_token = self.cols / BLOCK;
        let token = |t: usize| acts.row(t * per_token, per_token);
        let rows_of = |first: usize, outs: &mut [f32]| {
            let tiles: Vec<ActivationTile<'_>> = (0..acts.tile_count())
                .map(|i| acts.tile(i, per_token))
                .collect();
            for (i, row_out) in outs.chunks_exact_mut(tokens).enumerate() {
                let w = self.row(first + i);
                let mut t = 0;
                for tile in &tiles {
                    row_out[tile.start..tile.start + TILE].copy_from_slice(&kernel.eight(w, tile));
                    t = tile.start + TILE;
                }
                while t + SMALL_TILE <= tokens {
                    let tile: [ActivationRow<'_>; SMALL_TILE] =
                        std::array::from_fn(|i| token(t + i));
                    row_out[t..t + SMALL_TILE].copy_from_slice(&kernel.dots(w, tile));
                    t += SMALL_TILE;
                }
                for (t, o) in row_out.iter_mut().enumerate().skip(t) {
                    *o = kernel.one(w, token(t));
                }
            }
        };
        if tokens == 1 {
            split_rows(self.rows * per_token, out, 1, rows_of);
            return;
        }
        let mut transposed = vec![0f32; self.rows * tokens];
        let blocks = self.rows * per_token * tokens;
        split_rows(blocks, &mut transposed, tokens, rows_of);
        // Transposed back on the pool as well, each thread writing whole tokens' rows of `out`.
        split_rows(blocks, out, self.rows, |first, outs| {
            for (t, token_out) in outs.chunks_exact_mut(self.rows).enumerate() {
                let column = transposed[first + t..].iter().step_by(tokens);
                for (o, &v) in token_out.iter_mut().zip(column) {
                    *o = v;
                }
            }
        });
    }
}

/// Below this many block products a product runs on the calling thread alone: handing work to
/// the pool would cost more than it saves.
const SERIAL_BLOCKS: usize = 2048;

/// Calls `work(first_row, outputs)` on consecutive runs of rows (`per_row` outputs each)
/// covering `out`, one run per thread of the pool.
fn split_rows(
    blocks: usize,
    out: &mut [f32],
    per_row: usize,
    work: impl Fn(usize, &mut [f32]) + Sync,
) {
    let pool = candle_core::utils::barrier_pool();
    let parts = pool.n_workers() + 1;
    if parts == 1 || blocks < SERIAL_BLOCKS {
        work(0, out);
        return;
    }
    let rows = out.len() / per_row;
    let rows_per_part = rows.div_ceil(parts);
    // Each part takes its own slice; the locks are never contended, they only hand the
    // disjoint slices across threads safely.
    let slices: Vec<Mutex<&mut [f32]>> = out
        .chunks_mut(rows_per_part * per_row)
        .map(Mutex::new)
        .collect();
    pool.execute(|part| {
        if let Some(slice) = slices.get(part) {
            let mut slice = slice.lock().unwrap_or_else(PoisonError::into_inner);
            work(part * rows_per_part, &mut slice);
        }
    });
}

/// The dot-product kernels for one format on one instruction set.
struct RowKernel {
    format: QuantFormat,
    isa: Isa,
}

impl RowKernel {
    fn new(format: QuantFormat, isa: Isa) -> Self {
        Self { format, isa }
    }

    /// One weight row times one token's activations.
    #[inline]
    fn one(&self, w: WeightRow<'_>, a: ActivationRow<'_>) -> f32 {
        self.dots(w, [a])[0]
    }

    /// One weight row times a tile of eight tokens' activations.
    #[inline]
    fn eight(&self, w: WeightRow<'_>, tile: &ActivationTile<'_>) -> [f32; TILE] {
        // SAFETY: as in `dots`.
        match (self.isa, self.format) {
            (Isa::Scalar, _) => self.dots(w, tile.rows),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, QuantFormat::Q4_1) => unsafe { crate::x86::tile_q4_1_avx2(w, tile) },
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, QuantFormat::Q8_0) => unsafe { crate::x86::tile_q8_0_avx2(w, tile) },
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, QuantFormat::Q4_1) => unsafe { crate::x86::tile_q4_1_avx512(w, tile) },
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, QuantFormat::Q8_0) => unsafe { crate::x86::tile_q8_0_vnni(w, tile) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("only the scalar kernels exist off x86-64"),
        }
    }

    /// One weight row times `R` tokens' activations.
    #[inline]
    fn dots<const R: usize>(&self, w: WeightRow<'_>, a: [ActivationRow<'_>; R]) -> [f32; R] {
        // SAFETY: `matmul_with` checked the CPU has the features of `self.isa`; the slices hold
        // whole blocks of the same count (the matrix and the activations were checked).
        match (self.isa, self.format) {
            (Isa::Scalar, QuantFormat::Q4_1) => scalar::dot_q4_1(w, a),
            (Isa::Scalar, QuantFormat::Q8_0) => scalar::dot_q8_0(w, a),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, QuantFormat::Q4_1) => unsafe { crate::x86::dot_q4_1_avx2(w, a) },
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, QuantFormat::Q8_0) => unsafe { crate::x86::dot_q8_0_avx2(w, a) },
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, QuantFormat::Q4_1) => unsafe { crate::x86::dot_q4_1_avx512(w, a) },
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, QuantFormat::Q8_0) => unsafe { crate::x86::dot_q8_0_avx512(w, a) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("only the scalar kernels exist off x86-64"),
        }
    }
}

/// The f16 at `offset` in a block.
fn f16_at(block: &[u8], offset: usize) -> f32 {
    f16::from_le_bytes([block[offset], block[offset + 1]]).to_f32()
}
