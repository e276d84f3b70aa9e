//! A quantized weight matrix and the threaded product driver.

use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use candle_core::quantized::GgmlDType;
use half::f16;

use crate::activation::{ActivationRow, ActivationTile, Activations, GROUP, TILE};
use crate::{scalar, Isa, KernelError, BLOCK, SUPERBLOCK};

/// The GGUF block formats these kernels multiply.
// The names are GGUF's (and ggml's, llama.cpp's), which people look for.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// 4-bit values with a scale per block of 32: `w = d * (q - 8)` (18 bytes).
    Q4_0,
    /// 4-bit values with a scale and an offset per block of 32: `w = d * q + m` (20 bytes).
    Q4_1,
    /// 5-bit values (4 low bits, high bits in a 32-bit mask) with a scale per block of 32:
    /// `w = d * (q - 16)` (22 bytes).
    Q5_0,
    /// 5-bit values with a scale and an offset per block of 32: `w = d * q + m` (24 bytes).
    Q5_1,
    /// 8-bit values with a scale per block of 32: `w = d * q` (34 bytes).
    Q8_0,
    /// Superblocks of 256 4-bit values in 8 sub-blocks of 32, each with a 6-bit scale and
    /// minimum: `w = d * sc * q - dmin * m` (144 bytes).
    Q4_K,
    /// Q4_K with a fifth bit per value (176 bytes).
    Q5_K,
    /// Superblocks of 256 6-bit values in 16 sub-blocks of 16, each with an 8-bit signed scale:
    /// `w = d * sc * (q - 32)` (210 bytes).
    Q6_K,
}

impl QuantFormat {
    /// Every format, for tests and benchmarks.
    pub const ALL: [QuantFormat; 8] = [
        QuantFormat::Q4_0,
        QuantFormat::Q4_1,
        QuantFormat::Q5_0,
        QuantFormat::Q5_1,
        QuantFormat::Q8_0,
        QuantFormat::Q4_K,
        QuantFormat::Q5_K,
        QuantFormat::Q6_K,
    ];

    /// Values per block: [`BLOCK`], or [`SUPERBLOCK`] for the K formats. A row's columns must
    /// be a multiple of it.
    pub fn block_values(self) -> usize {
        if self.is_k() {
            SUPERBLOCK
        } else {
            BLOCK
        }
    }

    /// Whether this is a K format (256-value superblocks, Q8_K activations).
    pub fn is_k(self) -> bool {
        matches!(
            self,
            QuantFormat::Q4_K | QuantFormat::Q5_K | QuantFormat::Q6_K
        )
    }

    /// Whether a matrix stored in this format can be held and multiplied in `held`: itself, or
    /// Q5_0 as Q8_0 (each value `q - 16` in a byte of its own). That gives the same integer
    /// sums and float terms, so the same bits, with no high bits to merge per block: faster
    /// decoding for 8 bytes more per 32 values ([`QuantMatrixBuilder::held_as`]).
    pub fn can_be_held_as(self, held: QuantFormat) -> bool {
        self == held || (self, held) == (QuantFormat::Q5_0, QuantFormat::Q8_0)
    }

    /// Bytes per block of [`block_values`](Self::block_values) values, as GGUF lays them out.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantFormat::Q4_0 => 18,
            QuantFormat::Q4_1 => 20,
            QuantFormat::Q5_0 => 22,
            QuantFormat::Q5_1 => 24,
            QuantFormat::Q8_0 => 34,
            QuantFormat::Q4_K => 144,
            QuantFormat::Q5_K => 176,
            QuantFormat::Q6_K => 210,
        }
    }

    /// Bytes of (low) quantized values per block, kept as GGUF packs them.
    fn value_bytes(self) -> usize {
        match self {
            QuantFormat::Q8_0 => 32,
            QuantFormat::Q4_K | QuantFormat::Q5_K | QuantFormat::Q6_K => 128,
            _ => 16,
        }
    }

    /// Bytes of packed high bits per block, kept packed (the kernels expand them): Q5_0's and
    /// Q5_1's 32 bits re-laid in 8 bytes ([`spread_high_bits`]).
    pub(crate) fn high_bytes(self) -> usize {
        match self {
            QuantFormat::Q5_0 | QuantFormat::Q5_1 => 8,
            QuantFormat::Q5_K => 32,
            QuantFormat::Q6_K => 64,
            _ => 0,
        }
    }

    /// Bytes of sub-block scales per block: Q4_K's and Q5_K's 8 scales then 8 minimums, each
    /// unpacked from 6 bits to a byte; Q6_K's 16 signed scales.
    fn scale_bytes(self) -> usize {
        if self.is_k() {
            16
        } else {
            0
        }
    }

    /// Whether blocks carry an offset (`m`, or the K formats' `dmin`).
    fn has_offset(self) -> bool {
        matches!(
            self,
            QuantFormat::Q4_1 | QuantFormat::Q5_1 | QuantFormat::Q4_K | QuantFormat::Q5_K
        )
    }
}

impl QuantFormat {
    /// The GGUF tensor type this format reads (candle's name for it).
    pub fn ggml_dtype(self) -> GgmlDType {
        match self {
            QuantFormat::Q4_0 => GgmlDType::Q4_0,
            QuantFormat::Q4_1 => GgmlDType::Q4_1,
            QuantFormat::Q5_0 => GgmlDType::Q5_0,
            QuantFormat::Q5_1 => GgmlDType::Q5_1,
            QuantFormat::Q8_0 => GgmlDType::Q8_0,
            QuantFormat::Q4_K => GgmlDType::Q4K,
            QuantFormat::Q5_K => GgmlDType::Q5K,
            QuantFormat::Q6_K => GgmlDType::Q6K,
        }
    }

    /// The format for a GGUF tensor type, where these kernels have one.
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.ggml_dtype() == dtype)
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QuantFormat::Q4_0 => "q4_0",
            QuantFormat::Q4_1 => "q4_1",
            QuantFormat::Q5_0 => "q5_0",
            QuantFormat::Q5_1 => "q5_1",
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4_K => "q4_k",
            QuantFormat::Q5_K => "q5_k",
            QuantFormat::Q6_K => "q6_k",
        })
    }
}

/// A `(rows, cols)` weight matrix in a block format: the rows of a GGUF tensor (the outputs of
/// a linear layer), unpacked at load into values, scales and offsets held apart, so the kernels
/// load eight scales at once and convert no f16 in the hot loop. Values stay packed as GGUF
/// holds them (nibbles, and the 5- and 6-bit formats' high bits), so a matrix takes about the
/// bytes of its file: the kernels expand them.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    format: QuantFormat,
    rows: usize,
    cols: usize,
    /// Each block's quantized values (low bits), blocks in row order.
    qs: Vec<u8>,
    /// Each block's packed high bits (Q5_0, Q5_1, Q5_K, Q6_K).
    qh: Vec<u8>,
    /// Each superblock's sub-block scales (and minimums) (K formats).
    scales: Vec<u8>,
    /// Each block's scale.
    d: Vec<f32>,
    /// Each block's offset (Q4_1, Q5_1) or minimums' scale `dmin` (Q4_K, Q5_K).
    m: Vec<f32>,
}

/// Builds a [`QuantMatrix`] from its GGUF bytes a run of rows at a time, so that a large
/// matrix (Gemma 3's 262,144-row embedding) is never held twice while it loads.
#[derive(Debug)]
pub struct QuantMatrixBuilder {
    matrix: QuantMatrix,
    /// The format of the GGUF bytes pushed; the matrix may hold them in another
    /// ([`QuantFormat::can_be_held_as`]).
    source: QuantFormat,
    filled: usize,
}

impl QuantMatrixBuilder {
    /// An empty `(rows, cols)` matrix in `format`, its storage reserved.
    pub fn new(format: QuantFormat, rows: usize, cols: usize) -> Result<Self, KernelError> {
        Self::held_as(format, format, rows, cols)
    }

    /// An empty `(rows, cols)` matrix read from `format` and held in `held` (see
    /// [`QuantFormat::can_be_held_as`]).
    pub fn held_as(
        format: QuantFormat,
        held: QuantFormat,
        rows: usize,
        cols: usize,
    ) -> Result<Self, KernelError> {
        if !format.can_be_held_as(held) {
            return Err(KernelError::BadMatrix(format!(
                "a {format} matrix cannot be held as {held}"
            )));
        }
        let per_block = format.block_values();
        if rows == 0 || cols == 0 || !cols.is_multiple_of(per_block) {
            let supported = if format.is_k() {
                format!(
                    "{format} packs {SUPERBLOCK}-value superblocks, so it needs columns in \
                     multiples of {SUPERBLOCK} (GGUF files store such rows in q5_0, q8_0 or \
                     another 32-value format instead)"
                )
            } else {
                format!("{format} needs columns in multiples of {BLOCK}")
            };
            return Err(KernelError::BadMatrix(format!(
                "shape ({rows}, {cols}): both must be positive, and {supported}"
            )));
        }
        let too_large = || KernelError::BadMatrix(format!("shape ({rows}, {cols}) is too large"));
        let blocks = rows.checked_mul(cols / per_block).ok_or_else(too_large)?;
        // Reserved up front (and fallibly: the shape may come from a damaged file), so rows
        // pushed later never regrow and copy a large matrix.
        fn reserve<T>(blocks: usize, per_block: usize) -> Option<Vec<T>> {
            let mut v = Vec::new();
            v.try_reserve_exact(blocks.checked_mul(per_block)?).ok()?;
            crate::pages::prefer_huge_pages(&v);
            Some(v)
        }
        let (source, format) = (format, held);
        let offsets = if format.has_offset() { 1 } else { 0 };
        Ok(Self {
            source,
            matrix: QuantMatrix {
                format,
                rows,
                cols,
                qs: reserve(blocks, format.value_bytes()).ok_or_else(too_large)?,
                qh: reserve(blocks, format.high_bytes()).ok_or_else(too_large)?,
                scales: reserve(blocks, format.scale_bytes()).ok_or_else(too_large)?,
                d: reserve(blocks, 1).ok_or_else(too_large)?,
                m: reserve(blocks, offsets).ok_or_else(too_large)?,
            },
            filled: 0,
        })
    }

    /// Bytes of one row as GGUF stores it.
    pub fn row_bytes(&self) -> usize {
        let m = &self.matrix;
        m.cols / self.source.block_values() * self.source.block_bytes()
    }

    /// Rows still to come.
    pub fn rows_left(&self) -> usize {
        self.matrix.rows - self.filled
    }

    /// Appends whole rows, as GGUF stores them.
    pub fn push_rows(&mut self, bytes: &[u8]) -> Result<(), KernelError> {
        let row = self.row_bytes();
        if !bytes.len().is_multiple_of(row) || bytes.len() / row > self.rows_left() {
            return Err(KernelError::BadMatrix(format!(
                "{} bytes are not whole rows of {row} bytes within the {} rows left",
                bytes.len(),
                self.rows_left()
            )));
        }
        for block in bytes.chunks_exact(self.source.block_bytes()) {
            self.matrix.push_block(self.source, block);
        }
        let rows = bytes.len() / row;
        if self.matrix.format == QuantFormat::Q4_1 {
            let row_bytes = self.matrix.cols / BLOCK * 16;
            let start = self.filled * row_bytes;
            for row_qs in
                self.matrix.qs[start..start + rows * row_bytes].chunks_exact_mut(row_bytes)
            {
                interleave_q4_1_row(row_qs);
            }
        }
        self.filled += rows;
        Ok(())
    }

    /// The matrix, once every row is in.
    pub fn finish(self) -> Result<QuantMatrix, KernelError> {
        if self.rows_left() > 0 {
            return Err(KernelError::BadMatrix(format!(
                "{} of {} rows are missing",
                self.rows_left(),
                self.matrix.rows
            )));
        }
        Ok(self.matrix)
    }
}

/// One row of a [`QuantMatrix`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct WeightRow<'a> {
    pub qs: &'a [u8],
    pub qh: &'a [u8],
    pub scales: &'a [u8],
    pub d: &'a [f32],
    pub m: &'a [f32],
}

impl<'a> WeightRow<'a> {
    /// The first row of a run of rows (`units` blocks each, in `format`) and the rest of the
    /// run: walking a thread's rows this way slices by pointer steps, not by index arithmetic
    /// per row (a decode step's products are short, so that cost showed).
    #[inline]
    pub(crate) fn split_first(self, units: usize, format: QuantFormat) -> (Self, Self) {
        fn split<T>(s: &[T], n: usize) -> (&[T], &[T]) {
            s.split_at(n.min(s.len()))
        }
        let (qs, qs_rest) = split(self.qs, units * format.value_bytes());
        let (qh, qh_rest) = split(self.qh, units * format.high_bytes());
        let (scales, scales_rest) = split(self.scales, units * format.scale_bytes());
        let (d, d_rest) = split(self.d, units);
        let (m, m_rest) = split(self.m, units);
        (
            Self {
                qs,
                qh,
                scales,
                d,
                m,
            },
            Self {
                qs: qs_rest,
                qh: qh_rest,
                scales: scales_rest,
                d: d_rest,
                m: m_rest,
            },
        )
    }
}

/// After whole tiles of [`TILE`] tokens, this many tokens are multiplied at once against a
/// weight row (then the last one to three together), so the weight block is unpacked once for
/// all of them.
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
        let expected = rows
            .checked_mul(cols / format.block_values())
            .and_then(|blocks| blocks.checked_mul(format.block_bytes()));
        if cols.is_multiple_of(format.block_values()) && expected != Some(data.len()) {
            return Err(KernelError::BadMatrix(format!(
                "{} bytes for a ({rows}, {cols}) {format} matrix, expected {expected:?}",
                data.len()
            )));
        }
        let mut builder = QuantMatrixBuilder::new(format, rows, cols)?;
        builder.push_rows(data)?;
        builder.finish()
    }

    /// Unpacks one GGUF block of `source` (of exactly `block_bytes` bytes).
    fn push_block(&mut self, source: QuantFormat, block: &[u8]) {
        match source {
            QuantFormat::Q4_0 => {
                self.d.push(f16_at(block, 0));
                self.qs.extend_from_slice(&block[2..18]);
            }
            QuantFormat::Q4_1 => {
                self.d.push(f16_at(block, 0));
                self.m.push(f16_at(block, 2));
                self.qs.extend_from_slice(&block[4..20]);
            }
            QuantFormat::Q5_0 if self.format == QuantFormat::Q8_0 => {
                // Held as Q8_0: each value `q - 16` in a byte of its own.
                self.d.push(f16_at(block, 0));
                let high = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                let low = &block[6..22];
                self.qs.extend((0..BLOCK).map(|i| {
                    let nibble = if i < 16 {
                        low[i] & 0x0F
                    } else {
                        low[i - 16] >> 4
                    };
                    let bit = ((high >> i) & 1) as u8;
                    ((nibble | (bit << 4)) as i8 - 16) as u8
                }));
            }
            QuantFormat::Q5_0 => {
                self.d.push(f16_at(block, 0));
                self.qh.extend_from_slice(&spread_high_bits(&block[2..6]));
                self.qs.extend_from_slice(&block[6..22]);
            }
            QuantFormat::Q5_1 => {
                self.d.push(f16_at(block, 0));
                self.m.push(f16_at(block, 2));
                self.qh.extend_from_slice(&spread_high_bits(&block[4..8]));
                self.qs.extend_from_slice(&block[8..24]);
            }
            QuantFormat::Q8_0 => {
                self.d.push(f16_at(block, 0));
                self.qs.extend_from_slice(&block[2..34]);
            }
            QuantFormat::Q4_K | QuantFormat::Q5_K => {
                self.d.push(f16_at(block, 0));
                self.m.push(f16_at(block, 2));
                let packed = &block[4..16];
                let (scales, mins): (Vec<u8>, Vec<u8>) =
                    (0..8).map(|j| scale_min_k4(j, packed)).unzip();
                self.scales.extend(scales);
                self.scales.extend(mins);
                if self.format == QuantFormat::Q5_K {
                    self.qh.extend_from_slice(&block[16..48]);
                    self.qs.extend_from_slice(&block[48..176]);
                } else {
                    self.qs.extend_from_slice(&block[16..144]);
                }
            }
            QuantFormat::Q6_K => {
                self.qs.extend_from_slice(&block[..128]);
                self.qh.extend_from_slice(&block[128..192]);
                self.scales.extend_from_slice(&block[192..208]);
                self.d.push(f16_at(block, 208));
            }
        }
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
    /// against, and what re-quantizing starts from. Each value is computed with ggml's (and
    /// candle's) float operations, so it has their bits.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        self.dequantize_blocks(0..self.d.len(), &mut out);
        out
    }

    /// Row `r` as floats, with the bits of [`dequantize`](Self::dequantize): what an
    /// embedding lookup reads from a head matrix it shares (tied embeddings), so the table is
    /// held once.
    pub fn dequantize_row(&self, r: usize) -> Result<Vec<f32>, KernelError> {
        if r >= self.rows {
            return Err(KernelError::Shape(format!(
                "row {r} of a matrix of {} rows",
                self.rows
            )));
        }
        let per_row = self.cols / self.format.block_values();
        let mut out = Vec::with_capacity(self.cols);
        self.dequantize_blocks(r * per_row..(r + 1) * per_row, &mut out);
        Ok(out)
    }

    /// Appends the values of blocks `blocks` to `out`.
    fn dequantize_blocks(&self, blocks: std::ops::Range<usize>, out: &mut Vec<f32>) {
        let format = self.format;
        let per_row = self.cols / format.block_values();
        for b in blocks {
            let q4_1: [u8; 16];
            let qs = if format == QuantFormat::Q4_1 {
                let row = &self.qs[b / per_row * per_row * 16..(b / per_row + 1) * per_row * 16];
                q4_1 = q4_1_block_bytes(row, per_row, b % per_row);
                &q4_1[..]
            } else {
                &self.qs[b * format.value_bytes()..(b + 1) * format.value_bytes()]
            };
            let qh = &self.qh[b * format.high_bytes()..(b + 1) * format.high_bytes()];
            let scales = &self.scales[b * format.scale_bytes()..(b + 1) * format.scale_bytes()];
            let (d, m) = (self.d[b], self.m.get(b).copied().unwrap_or(0.0));
            match format {
                QuantFormat::Q4_0 | QuantFormat::Q5_0 => {
                    let offset = if format == QuantFormat::Q4_0 { 8 } else { 16 };
                    out.extend((0..BLOCK).map(|i| (block_value(qs, qh, i) - offset) as f32 * d));
                }
                QuantFormat::Q4_1 | QuantFormat::Q5_1 => {
                    out.extend((0..BLOCK).map(|i| block_value(qs, qh, i) as f32 * d + m));
                }
                QuantFormat::Q8_0 => out.extend(qs.iter().map(|&q| d * f32::from(q as i8))),
                QuantFormat::Q4_K | QuantFormat::Q5_K => {
                    for i in 0..SUPERBLOCK {
                        let sub = i / 32;
                        let scale = d * f32::from(scales[sub]);
                        let min = m * f32::from(scales[8 + sub]);
                        out.push(scale * k_value(format, qs, qh, i) as f32 - min);
                    }
                }
                QuantFormat::Q6_K => {
                    for i in 0..SUPERBLOCK {
                        let scale = d * f32::from(scales[i / 16] as i8);
                        out.push(scale * (k_value(format, qs, qh, i) - 32) as f32);
                    }
                }
            }
        }
    }

    /// `out = x · selfᵀ` for `x` of shape `(tokens, cols)`, `out` of shape `(tokens, rows)`,
    /// on the fastest kernels this CPU has.
    pub fn matmul(&self, x: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
        self.matmul_with(Isa::best(), x, out)
    }

    /// [`matmul`](Self::matmul) on the given kernel family.
    pub fn matmul_with(&self, isa: Isa, x: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
        Self::matmul_shared(isa, &[self], x, &mut [out])
    }

    /// `outs[i] = x · matrices[i]ᵀ` for matrices of one width that take the same
    /// activations (a block's query, key and value projections; an FFN's gate and up): the
    /// activations are quantized once, and for one token every matrix's rows go through the
    /// pool in one pass, so a decode step pays one hand-over to the pool's threads instead of
    /// one per matrix. Each row goes through the same kernel as in a product of its matrix
    /// alone, so the outputs are the same bits as separate products.
    ///
    /// The matrices may differ in format (a Q4_K_M file's value projection is often Q6_K or
    /// Q8_0 beside Q5_0 queries), but either all or none must be K formats, which take
    /// activations quantized by superblock.
    pub fn matmul_shared(
        isa: Isa,
        matrices: &[&QuantMatrix],
        x: &[f32],
        outs: &mut [&mut [f32]],
    ) -> Result<(), KernelError> {
        if !isa.is_available() {
            return Err(KernelError::Unsupported(isa));
        }
        let Some(first) = matrices.first() else {
            return Err(KernelError::Shape("no matrices to multiply".into()));
        };
        let cols = first.cols;
        if matrices
            .iter()
            .any(|m| m.cols != cols || m.format.is_k() != first.format.is_k())
        {
            return Err(KernelError::Shape(
                "matrices sharing activations need one width, and all or none in K formats".into(),
            ));
        }
        if !x.len().is_multiple_of(cols) {
            return Err(KernelError::Shape(format!(
                "{} activations are not whole rows of {cols}",
                x.len()
            )));
        }
        let tokens = x.len() / cols;
        if outs.len() != matrices.len() {
            return Err(KernelError::Shape(format!(
                "{} outputs for {} matrices",
                outs.len(),
                matrices.len()
            )));
        }
        for (m, out) in matrices.iter().zip(outs.iter()) {
            if out.len() != tokens * m.rows {
                return Err(KernelError::Shape(format!(
                    "output holds {} values, {tokens} tokens × {} rows need {}",
                    out.len(),
                    m.rows,
                    tokens * m.rows
                )));
            }
        }
        if tokens == 0 {
            return Ok(());
        }
        ACTIVATIONS.with(|cell| {
            let mut acts = cell.borrow_mut();
            if first.format.is_k() {
                acts.quantize_superblocks(x, isa);
            } else {
                acts.quantize(x, isa);
                if tokens < TILE {
                    acts.prepare_words(first.units());
                }
            }
            if tokens == 1 {
                Self::one_token_shared(isa, matrices, &acts, outs);
                return;
            }
            // The tiles are laid out once for all the matrices that take them the same way
            // (they share their columns; only Q8_0 on AVX-512 wants them shifted).
            let mut laid_out = None;
            for (m, out) in matrices.iter().zip(outs.iter_mut()) {
                let shifted = m.format == QuantFormat::Q8_0 && isa == Isa::Avx512;
                if laid_out != Some(shifted) {
                    acts.prepare_tiles(m.units(), shifted);
                    laid_out = Some(shifted);
                }
                m.multiply(&RowKernel::new(m.format, isa), &acts, tokens, out);
            }
        });
        Ok(())
    }

    /// One token through several matrices' rows, split over the pool as one run of rows: the
    /// rows of all the matrices laid end to end are cut into a few chunks per thread, which
    /// the threads take in turn (as in [`deal_row_chunks`]).
    fn one_token_shared(
        isa: Isa,
        matrices: &[&QuantMatrix],
        acts: &Activations,
        outs: &mut [&mut [f32]],
    ) {
        let rows: usize = matrices.iter().map(|m| m.rows).sum();
        let work = rows * (matrices[0].cols / BLOCK);
        let pool = candle_core::utils::barrier_pool();
        let parts = crate::threads::parts(pool.n_workers() + 1);
        let chunks = if work < SERIAL_BLOCKS || parts == 1 {
            1
        } else {
            parts * CHUNKS_PER_THREAD
        };
        let per_chunk = rows.div_ceil(chunks);
        // Each chunk's pieces: (matrix, first row, outputs), cut from the outputs in order.
        let mut dealt: Vec<Vec<(usize, usize, &mut [f32])>> =
            (0..chunks).map(|_| Vec::new()).collect();
        let mut laid = 0;
        for (i, out) in outs.iter_mut().enumerate() {
            let mut rest: &mut [f32] = out;
            let mut first = 0;
            while !rest.is_empty() {
                let chunk = laid / per_chunk;
                let take = (per_chunk - laid % per_chunk).min(rest.len());
                let (piece, tail) = rest.split_at_mut(take);
                dealt[chunk].push((i, first, piece));
                (rest, first, laid) = (tail, first + take, laid + take);
            }
        }
        let run = |pieces: &mut Vec<(usize, usize, &mut [f32])>| {
            for (i, first, out) in pieces.iter_mut() {
                let m = matrices[*i];
                m.one_token_rows(&RowKernel::new(m.format, isa), acts, *first, out);
            }
        };
        if chunks == 1 {
            dealt.iter_mut().for_each(run);
            return;
        }
        // Each chunk is taken once; the locks only hand the disjoint slices across.
        let dealt: Vec<Mutex<Vec<_>>> = dealt.into_iter().map(Mutex::new).collect();
        let next = AtomicUsize::new(0);
        pool.execute(|_| {
            while let Some(pieces) = dealt.get(next.fetch_add(1, Ordering::Relaxed)) {
                run(&mut pieces.lock().unwrap_or_else(PoisonError::into_inner));
            }
        });
    }

    /// Rows `first..first + outs.len()` times one token (the activations' first), into `outs`:
    /// one kernel call for the whole run where the family has one.
    fn one_token_rows(
        &self,
        kernel: &RowKernel,
        acts: &Activations,
        first: usize,
        outs: &mut [f32],
    ) {
        let per_token = self.units();
        let mut w = self.rows_from(first, outs.len());
        let a = acts.row(0, per_token);
        if !kernel.rows(w, per_token, [a], outs) {
            for o in outs.iter_mut() {
                let (row, rest) = w.split_first(per_token, self.format);
                *o = kernel.one(row, a);
                w = rest;
            }
        }
    }

    /// Blocks (or superblocks, for the K formats) per row.
    fn units(&self) -> usize {
        self.cols / self.format.block_values()
    }

    /// Weight row `r`.
    fn row(&self, r: usize) -> WeightRow<'_> {
        self.rows_from(r, 1)
    }

    /// Weight rows `first..first + count`, as one run of blocks.
    fn rows_from(&self, first: usize, count: usize) -> WeightRow<'_> {
        let blocks = first * self.units()..(first + count) * self.units();
        let bytes = |per_block: usize| blocks.start * per_block..blocks.end * per_block;
        WeightRow {
            qs: &self.qs[bytes(self.format.value_bytes())],
            qh: &self.qh[bytes(self.format.high_bytes())],
            scales: &self.scales[bytes(self.format.scale_bytes())],
            d: &self.d[blocks.clone()],
            m: self.m.get(blocks).unwrap_or_default(),
        }
    }

    /// Two or more tokens, the weight rows split over candle's barrier pool (persistent
    /// threads that spin briefly between calls, so a decode step's hundreds of small products
    /// do not each pay a thread wake-up; the calling thread takes a share): computed weight
    /// row by weight row (each weight row unpacked once for a tile of [`TILE`] tokens), each
    /// row's outputs written into its column of `out`. One token goes through
    /// [`one_token_shared`](Self::one_token_shared).
    fn multiply(&self, kernel: &RowKernel, acts: &Activations, tokens: usize, out: &mut [f32]) {
        let per_token = self.units();
        // The work of a product, in 32-value block products, for the choice of threads.
        let work = self.rows * (self.cols / BLOCK);
        let token = |t: usize| acts.row(t * per_token, per_token);
        let out = TokenColumns::new(out, tokens, self.rows);
        if tokens < TILE {
            // Up to seven tokens (a few decode steps batched): a thread's run of rows in one
            // kernel call, as for one token.
            deal_row_chunks(work * tokens, self.rows, |rows| {
                let few = |t: usize| token(t);
                match tokens {
                    2 => self.few_tokens::<2>(kernel, std::array::from_fn(few), rows, &out),
                    3 => self.few_tokens::<3>(kernel, std::array::from_fn(few), rows, &out),
                    4 => self.few_tokens::<4>(kernel, std::array::from_fn(few), rows, &out),
                    5 => self.few_tokens::<5>(kernel, std::array::from_fn(few), rows, &out),
                    6 => self.few_tokens::<6>(kernel, std::array::from_fn(few), rows, &out),
                    _ => self.few_tokens::<7>(kernel, std::array::from_fn(few), rows, &out),
                }
            });
            return;
        }
        deal_row_chunks(work * tokens, self.rows, |rows| {
            let tiles: Vec<ActivationTile<'_>> = (0..acts.tile_count())
                .map(|i| acts.tile(i, per_token))
                .collect();
            let mut row_out = vec![0f32; tokens];
            let mut pair_out = vec![0f32; tokens];
            let mut unpacked = vec![0u8; 2 * self.cols];
            let mut offsets = vec![0i32; 2 * (self.cols / BLOCK)];
            let mut r = rows.start;
            while r < rows.end {
                let w = self.row(r);
                let pair = (r + 1 < rows.end).then(|| [w, self.row(r + 1)]);
                let out_pair = [&mut row_out[..], &mut pair_out[..]];
                if pair.is_some_and(|pair| kernel.tile_pair(pair, &tiles, &mut offsets, out_pair)) {
                    self.finish_row(kernel, r, &tiles, &token, &mut row_out, &out);
                    self.finish_row(kernel, r + 1, &tiles, &token, &mut pair_out, &out);
                    r += 2;
                    continue;
                }
                kernel.tiles(w, &tiles, &mut unpacked, &mut row_out);
                self.finish_row(kernel, r, &tiles, &token, &mut row_out, &out);
                r += 1;
            }
        });
    }

    /// Row `r`'s tokens past the tiles (none when there are tiles: the last overlaps), in
    /// four-token calls and one last call for the rest, then its column of `out`.
    fn finish_row<'a>(
        &self,
        kernel: &RowKernel,
        r: usize,
        tiles: &[ActivationTile<'_>],
        token: &impl Fn(usize) -> ActivationRow<'a>,
        row_out: &mut [f32],
        out: &TokenColumns<'_>,
    ) {
        let w = self.row(r);
        let tokens = row_out.len();
        let mut t = if tiles.is_empty() { 0 } else { tokens };
        while t + SMALL_TILE <= tokens {
            let tile: [ActivationRow<'_>; SMALL_TILE] = std::array::from_fn(|i| token(t + i));
            row_out[t..t + SMALL_TILE].copy_from_slice(&kernel.dots(w, tile));
            t += SMALL_TILE;
        }
        // The last one to three tokens in one call too: the weight row is read once for all
        // of them (one call per token read it up to three times, which made a batch of two
        // decode steps slower than two steps alone).
        match tokens - t {
            3 => row_out[t..]
                .copy_from_slice(&kernel.dots(w, [token(t), token(t + 1), token(t + 2)])),
            2 => row_out[t..].copy_from_slice(&kernel.dots(w, [token(t), token(t + 1)])),
            1 => row_out[t] = kernel.one(w, token(t)),
            _ => {}
        }
        // SAFETY: this thread's range of weight rows is its own (`deal_row_chunks`).
        unsafe { out.write_column(r, row_out) };
    }

    /// Weight rows `rows` times `R` tokens (a few decode steps batched, `R` < [`TILE`]), into their columns
    /// of `out`: one kernel call for the whole run of rows where the family has one, else a
    /// call per row for all `R` tokens at once.
    fn few_tokens<const R: usize>(
        &self,
        kernel: &RowKernel,
        tokens: [ActivationRow<'_>; R],
        rows: std::ops::Range<usize>,
        out: &TokenColumns<'_>,
    ) {
        let mut values = vec![0f32; rows.len() * R];
        let run = self.rows_from(rows.start, rows.len());
        if !kernel.rows(run, self.units(), tokens, &mut values) {
            for (r, o) in rows.clone().zip(values.chunks_exact_mut(R)) {
                o.copy_from_slice(&kernel.dots(self.row(r), tokens));
            }
        }
        for (r, row) in rows.zip(values.chunks_exact(R)) {
            // SAFETY: the caller's range of weight rows is this thread's own
            // (`deal_row_chunks`).
            unsafe { out.write_column(r, row) };
        }
    }
}

/// The output of a product, `(tokens, rows)`, shared by the pool's threads, each writing the
/// columns (weight rows) of its own range of rows: disjoint writes that `chunks_mut` cannot
/// hand out, as each token's outputs are one row of `out`. (Writing a buffer by weight row and
/// transposing it afterwards cost a second pass over the pool per product.)
struct TokenColumns<'a> {
    out: *mut f32,
    tokens: usize,
    rows: usize,
    _borrow: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: threads write through `write_column` only, each to its own columns.
unsafe impl Sync for TokenColumns<'_> {}

impl<'a> TokenColumns<'a> {
    fn new(out: &'a mut [f32], tokens: usize, rows: usize) -> Self {
        assert_eq!(out.len(), tokens * rows, "output shape");
        Self {
            out: out.as_mut_ptr(),
            tokens,
            rows,
            _borrow: std::marker::PhantomData,
        }
    }

    /// Writes column `r`: `values[t]` to `out[t][r]` for every token.
    ///
    /// # Safety
    /// No other thread may write column `r` at the same time.
    unsafe fn write_column(&self, r: usize, values: &[f32]) {
        assert!(
            r < self.rows && values.len() == self.tokens,
            "column in range"
        );
        for (t, &v) in values.iter().enumerate() {
            // SAFETY: `t < tokens`, `r < rows`: inside the borrowed `out`.
            unsafe { *self.out.add(t * self.rows + r) = v };
        }
    }
}

/// Calls `work(rows)` on consecutive ranges covering `0..rows`, a few per thread of the pool,
/// which the threads take in turn as each finishes its last: a prompt's products are long
/// enough that a thread slowed by the host (a shared core, a busy sibling) would otherwise
/// keep the other spinning at the barrier. Chunks hold an even number of rows, so the two-row
/// kernels keep their pairs. Products of less than [`SERIAL_BLOCKS`] run on the calling thread
/// alone.
fn deal_row_chunks(blocks: usize, rows: usize, work: impl Fn(std::ops::Range<usize>) + Sync) {
    let pool = candle_core::utils::barrier_pool();
    let parts = crate::threads::parts(pool.n_workers() + 1);
    if parts == 1 || blocks < SERIAL_BLOCKS {
        work(0..rows);
        return;
    }
    let chunk = rows.div_ceil(parts * CHUNKS_PER_THREAD).next_multiple_of(2);
    let next = AtomicUsize::new(0);
    pool.execute(|_| loop {
        let start = next.fetch_add(chunk, Ordering::Relaxed);
        if start >= rows {
            break;
        }
        work(start..(start + chunk).min(rows));
    });
}

/// Chunks of rows per thread in [`deal_row_chunks`]: enough to even out a slowed thread,
/// few enough that taking one costs nothing next to its rows.
const CHUNKS_PER_THREAD: usize = 8;

/// Below this many block products a product runs on the calling thread alone: handing work to
/// the pool would cost more than it saves.
const SERIAL_BLOCKS: usize = 2048;

/// A tile kernel of `veil_kernels::x86` (row, tiles, unpacked-row room, outputs).
#[cfg(target_arch = "x86_64")]
type TileKernel = unsafe fn(WeightRow<'_>, &[ActivationTile<'_>], &mut [u8], &mut [f32]);

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

    /// Consecutive weight rows (`w`, `units` blocks each) times `R` tokens, into `out` (`R`
    /// values per row, row-major), where the family has such a kernel; false otherwise.
    #[inline]
    fn rows<const R: usize>(
        &self,
        w: WeightRow<'_>,
        units: usize,
        a: [ActivationRow<'_>; R],
        out: &mut [f32],
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::x86;
            use QuantFormat as F;
            // SAFETY: as in `dots`; `w` holds `out.len()` rows of `units` blocks.
            unsafe {
                match (self.isa, self.format) {
                    (Isa::Avx2, F::Q4_K) if R == 1 => x86::avx2::rows_q4_k(w, units, a[0], out),
                    (Isa::Avx2, F::Q5_K) if R == 1 => x86::avx2::rows_q5_k(w, units, a[0], out),
                    (Isa::Avx2, F::Q6_K) if R == 1 => x86::avx2::rows_q6_k(w, units, a[0], out),
                    (Isa::Avx512, F::Q4_K) if R == 1 => x86::vnni::rows_q4_k(w, units, a[0], out),
                    (Isa::Avx512, F::Q5_K) if R == 1 => x86::vnni::rows_q5_k(w, units, a[0], out),
                    (Isa::Avx512, F::Q6_K) if R == 1 => x86::vnni::rows_q6_k(w, units, a[0], out),
                    (Isa::Avx2, F::Q4_1) => x86::rows_q4_1_avx2(w, units, a, out),
                    (Isa::Avx2, F::Q8_0) => x86::rows_q8_0_avx2(w, units, a, out),
                    (Isa::Avx512, F::Q4_1) => x86::rows_q4_1_avx512(w, units, a, out),
                    (Isa::Avx512, F::Q8_0) => x86::rows_q8_0_avx512(w, units, a, out),
                    (Isa::Avx2, F::Q4_0) => x86::avx2::rows_q4_0(w, units, a, out),
                    (Isa::Avx2, F::Q5_0) => x86::avx2::rows_q5_0(w, units, a, out),
                    (Isa::Avx2, F::Q5_1) => x86::avx2::rows_q5_1(w, units, a, out),
                    (Isa::Avx512, F::Q4_0) => x86::vnni::rows_q4_0(w, units, a, out),
                    (Isa::Avx512, F::Q5_0) => x86::vnni::rows_q5_0(w, units, a, out),
                    (Isa::Avx512, F::Q5_1) => x86::vnni::rows_q5_1(w, units, a, out),
                    _ => return false,
                }
            }
            true
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (w, units, a, out);
            false
        }
    }

    /// One weight row times every tile, each tile's outputs into `out` at its tokens;
    /// `unpacked` is room for the row's values (two bytes per column).
    #[inline]
    fn tiles(
        &self,
        w: WeightRow<'_>,
        tiles: &[ActivationTile<'_>],
        unpacked: &mut [u8],
        out: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::x86::{avx2, vnni};
            use QuantFormat as F;
            // SAFETY: as in `dots`.
            unsafe {
                let kernel = match (self.isa, self.format) {
                    (Isa::Scalar, _) => None,
                    (Isa::Avx2, F::Q4_0) => Some(avx2::tiles_q4_0 as TileKernel),
                    (Isa::Avx2, F::Q4_1) => Some(avx2::tiles_q4_1 as TileKernel),
                    (Isa::Avx2, F::Q5_0) => Some(avx2::tiles_q5_0 as TileKernel),
                    (Isa::Avx2, F::Q5_1) => Some(avx2::tiles_q5_1 as TileKernel),
                    (Isa::Avx2, F::Q8_0) => Some(avx2::tiles_q8_0 as TileKernel),
                    (Isa::Avx2, F::Q4_K) => Some(avx2::tiles_q4_k as TileKernel),
                    (Isa::Avx2, F::Q5_K) => Some(avx2::tiles_q5_k as TileKernel),
                    (Isa::Avx2, F::Q6_K) => Some(avx2::tiles_q6_k as TileKernel),
                    (Isa::Avx512, F::Q4_0) => Some(vnni::tiles_q4_0 as TileKernel),
                    (Isa::Avx512, F::Q4_1) => Some(vnni::tiles_q4_1 as TileKernel),
                    (Isa::Avx512, F::Q5_0) => Some(vnni::tiles_q5_0 as TileKernel),
                    (Isa::Avx512, F::Q5_1) => Some(vnni::tiles_q5_1 as TileKernel),
                    (Isa::Avx512, F::Q8_0) => Some(vnni::tiles_q8_0 as TileKernel),
                    (Isa::Avx512, F::Q4_K) => Some(vnni::tiles_q4_k as TileKernel),
                    (Isa::Avx512, F::Q5_K) => Some(vnni::tiles_q5_k as TileKernel),
                    (Isa::Avx512, F::Q6_K) => Some(vnni::tiles_q6_k as TileKernel),
                };
                if let Some(kernel) = kernel {
                    kernel(w, tiles, unpacked, out);
                    return;
                }
            }
        }
        let _ = unpacked;
        for tile in tiles {
            out[tile.start..tile.start + TILE].copy_from_slice(&self.dots(w, tile.rows));
        }
    }

    /// Two weight rows times every tile, as [`RowKernel::tiles`] on each (the same bits),
    /// where the family has such a kernel (Q8_0 on AVX-512); false otherwise. `offsets` is
    /// room for two `i32` per block.
    #[inline]
    fn tile_pair(
        &self,
        w: [WeightRow<'_>; 2],
        tiles: &[ActivationTile<'_>],
        offsets: &mut [i32],
        out: [&mut [f32]; 2],
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if (self.isa, self.format) == (Isa::Avx512, QuantFormat::Q8_0) {
            // SAFETY: `matmul_with` checked the CPU has AVX-512 VNNI; both rows and the tiles
            // hold the matrix's blocks.
            unsafe { crate::x86::tiles_q8_0_pair_vnni(w, tiles, offsets, out) };
            return true;
        }
        let _ = (w, tiles, offsets, out);
        false
    }

    /// One weight row times `R` tokens' activations.
    #[inline]
    fn dots<const R: usize>(&self, w: WeightRow<'_>, a: [ActivationRow<'_>; R]) -> [f32; R] {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::x86;
            use QuantFormat as F;
            // SAFETY: `matmul_with` checked the CPU has the features of `self.isa`; the slices
            // hold whole blocks of the same count (the matrix and the activations were
            // checked).
            unsafe {
                match (self.isa, self.format) {
                    (Isa::Scalar, _) => {}
                    (Isa::Avx2, F::Q4_1) => return x86::dot_q4_1_avx2(w, a),
                    (Isa::Avx2, F::Q8_0) => return x86::dot_q8_0_avx2(w, a),
                    (Isa::Avx512, F::Q4_1) => return x86::dot_q4_1_avx512(w, a),
                    (Isa::Avx512, F::Q8_0) => return x86::dot_q8_0_avx512(w, a),
                    (Isa::Avx2, F::Q4_0) => return x86::avx2::dot_q4_0(w, a),
                    (Isa::Avx2, F::Q5_0) => return x86::avx2::dot_q5_0(w, a),
                    (Isa::Avx2, F::Q5_1) => return x86::avx2::dot_q5_1(w, a),
                    (Isa::Avx2, F::Q4_K) => return x86::avx2::dot_q4_k(w, a),
                    (Isa::Avx2, F::Q5_K) => return x86::avx2::dot_q5_k(w, a),
                    (Isa::Avx2, F::Q6_K) => return x86::avx2::dot_q6_k(w, a),
                    (Isa::Avx512, F::Q4_0) => return x86::vnni::dot_q4_0(w, a),
                    (Isa::Avx512, F::Q5_0) => return x86::vnni::dot_q5_0(w, a),
                    (Isa::Avx512, F::Q5_1) => return x86::vnni::dot_q5_1(w, a),
                    (Isa::Avx512, F::Q4_K) => return x86::vnni::dot_q4_k(w, a),
                    (Isa::Avx512, F::Q5_K) => return x86::vnni::dot_q5_k(w, a),
                    (Isa::Avx512, F::Q6_K) => return x86::vnni::dot_q6_k(w, a),
                }
            }
        }
        match self.format {
            QuantFormat::Q4_0 => scalar::dot_q4_0(w, a),
            QuantFormat::Q4_1 => scalar::dot_q4_1(w, a),
            QuantFormat::Q5_0 => scalar::dot_q5_0(w, a),
            QuantFormat::Q5_1 => scalar::dot_q5_1(w, a),
            QuantFormat::Q8_0 => scalar::dot_q8_0(w, a),
            QuantFormat::Q4_K | QuantFormat::Q5_K => scalar::dot_q45_k(w, a, self.format),
            QuantFormat::Q6_K => scalar::dot_q6_k(w, a),
        }
    }
}

/// Q5_0's and Q5_1's 32 high bits (GGUF's little-endian mask: bit `i` is bit 4 of value `i`)
/// laid out in 8 bytes: bit 4 of value `8t + k` in bit `4 + t` of byte `k`. Broadcast to the
/// four 64-bit quarters of a vector and shifted right by 0, 1, 2 and 3, every byte then holds
/// its value's bit 4 in place: two shifts-and-masks per block instead of a byte shuffle and a
/// compare (AVX2 kernels ran Q5_0 at 0.70× llama.cpp's decode with those). It costs 4 bytes a
/// block more than GGUF's mask.
/// Lays a Q4_1 row's whole groups of eight blocks out for one-token products with one lane
/// per block: within a group's 128 bytes, the 4-byte word `k` of block `i` (its values
/// `4k..4k + 4` in the low nibbles and `16 + 4k..20 + 4k` in the high ones) moves to
/// `32k + 4i`, so one 32-byte load holds the same word of all eight blocks. Blocks past the
/// last whole group keep GGUF's order. Only the order of bytes changes, so the integer sums,
/// and so the bits, do not; the lanes need no horizontal reduction (the prompt tiles and the
/// reference read blocks back with [`q4_1_block_bytes`]).
fn interleave_q4_1_row(row: &mut [u8]) {
    for group in row.chunks_exact_mut(GROUP * 16) {
        let old: [u8; GROUP * 16] = std::array::from_fn(|i| group[i]);
        for i in 0..GROUP {
            for k in 0..4 {
                let from = 16 * i + 4 * k;
                group[32 * k + 4 * i..32 * k + 4 * i + 4].copy_from_slice(&old[from..from + 4]);
            }
        }
    }
}

/// Block `b`'s 16 bytes of nibbles in GGUF's order, from a Q4_1 row of `blocks` blocks laid
/// out by [`interleave_q4_1_row`].
pub(crate) fn q4_1_block_bytes(row: &[u8], blocks: usize, b: usize) -> [u8; 16] {
    if b < blocks / GROUP * GROUP {
        let (group, i) = (b / GROUP * GROUP * 16, b % GROUP);
        std::array::from_fn(|t| row[group + 32 * (t / 4) + 4 * i + t % 4])
    } else {
        std::array::from_fn(|t| row[16 * b + t])
    }
}

fn spread_high_bits(mask: &[u8]) -> [u8; 8] {
    let mask = u32::from_le_bytes([mask[0], mask[1], mask[2], mask[3]]);
    std::array::from_fn(|k| {
        (0..4).fold(0u8, |byte, t| {
            byte | (((mask >> (8 * t + k)) & 1) as u8) << (4 + t)
        })
    })
}

/// Value `i` (0..32) of a 32-value block: the low nibbles hold values 0..16 and the high ones
/// 16..32; `qh`, where the format has it, holds bit 4 of value `i` as [`spread_high_bits`]
/// lays it out.
pub(crate) fn block_value(qs: &[u8], qh: &[u8], i: usize) -> i32 {
    let low = i32::from(if i < 16 {
        qs[i] & 0x0F
    } else {
        qs[i - 16] >> 4
    });
    match qh {
        [] => low,
        spread => {
            let high = spread[i % 8] >> (4 + i / 8) & 1;
            low | i32::from(high) << 4
        }
    }
}

/// Value `i` (0..256) of a K-format superblock, unsigned (Q6_K's before taking 32 off):
/// - Q4_K / Q5_K: 64 values per 32 bytes of `qs`, low nibbles first; Q5_K's bit 4 of value
///   `i` is bit `i / 32` of `qh[i % 32]`.
/// - Q6_K: each half of 128 values takes 64 bytes of `qs` (values 0..32 and 32..64 from the
///   low nibbles of its two 32-byte runs, 64..96 and 96..128 from the high nibbles) and 32
///   bytes of `qh` (two bits per value, the quarter choosing the pair).
pub(crate) fn k_value(format: QuantFormat, qs: &[u8], qh: &[u8], i: usize) -> i32 {
    match format {
        QuantFormat::Q6_K => {
            let (half, r) = (i / 128, i % 128);
            let (quarter, l) = (r / 32, r % 32);
            let byte = qs[64 * half + 32 * (quarter & 1) + l];
            let low = if quarter < 2 { byte & 0x0F } else { byte >> 4 };
            let high = (qh[32 * half + l] >> (2 * quarter)) & 3;
            i32::from(low | high << 4)
        }
        _ => {
            let (chunk, r) = (i / 64, i % 64);
            let byte = qs[32 * chunk + r % 32];
            let low = if r < 32 { byte & 0x0F } else { byte >> 4 };
            let high = match qh.get(r % 32) {
                Some(h) => (h >> (i / 32)) & 1,
                None => 0,
            };
            i32::from(low | high << 4)
        }
    }
}

/// Scale and minimum `j` (0..8) of Q4_K's and Q5_K's 12 bytes of packed 6-bit values: the first
/// four in the low 6 bits of bytes 0..4 and 4..8, the last four from the nibbles of bytes
/// 8..12 with their top two bits in the spare bits of the first eight bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The f16 at `offset` in a block.
fn f16_at(block: &[u8], offset: usize) -> f32 {
    f16::from_le_bytes([block[offset], block[offset + 1]]).to_f32()
}
