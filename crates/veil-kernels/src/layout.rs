//! Where each value's code sits in a GGUF block, so the values of a block can be moved without
//! quantizing again.
//!
//! Equivariant encryption in a quantized format permutes the input columns of every matrix
//! inside groups of [`SCALE_GROUP`] values. Such a permutation keeps every value under the same
//! scales and offsets, and a kernel's integer block sums do not care about order, so the
//! encrypted model multiplies to the same bits as the plaintext one. Moving the codes (rather
//! than dequantizing, permuting and quantizing again) keeps the stored values exactly; ggml's
//! quantizers search scales with float sums whose result could change with the order.

use crate::{KernelError, QuantFormat};

/// Values that share every scale, offset and activation sum in every format: Q6_K's sub-blocks
/// and Q8_K's activation sums hold 16 values; every other scale covers 32 or 256.
pub const SCALE_GROUP: usize = 16;

/// One piece of a value's code: `width` bits at `shift` in byte `byte` of the block.
#[derive(Debug, Clone, Copy)]
struct Bits {
    byte: usize,
    shift: u8,
    width: u8,
}

const fn bits(byte: usize, shift: u8, width: u8) -> Bits {
    Bits { byte, shift, width }
}

impl QuantFormat {
    /// Values that share one scale: a permutation of a block's values that keeps each inside
    /// its group leaves the block's header valid.
    pub fn scale_group(self) -> usize {
        match self {
            QuantFormat::Q6_K => 16,
            _ => 32,
        }
    }

    /// The code of value `i` of a block: its low bits first, then its high bits if the format
    /// keeps them apart. Layouts as in ggml's `dequantize_row_*`.
    fn code_bits(self, i: usize) -> [Option<Bits>; 2] {
        // Nibbles of 32-value blocks: value i < 16 in the low half of byte i, the rest high.
        let nibble = |base: usize| bits(base + i % 16, if i < 16 { 0 } else { 4 }, 4);
        // Nibbles of K superblocks: 64-value chunks of 32 bytes, low halves then high halves.
        let k_nibble = |base: usize| {
            let (chunk, r) = (i / 64, i % 64);
            bits(base + chunk * 32 + r % 32, if r < 32 { 0 } else { 4 }, 4)
        };
        match self {
            QuantFormat::Q4_0 => [Some(nibble(2)), None],
            QuantFormat::Q4_1 => [Some(nibble(4)), None],
            // The fifth bits: bit i of a little-endian u32 after the header.
            QuantFormat::Q5_0 => [Some(nibble(6)), Some(bits(2 + i / 8, (i % 8) as u8, 1))],
            QuantFormat::Q5_1 => [Some(nibble(8)), Some(bits(4 + i / 8, (i % 8) as u8, 1))],
            QuantFormat::Q8_0 => [Some(bits(2 + i, 0, 8)), None],
            QuantFormat::Q4_K => [Some(k_nibble(16)), None],
            QuantFormat::Q5_K => {
                let (chunk, r) = (i / 64, i % 64);
                let high = bits(16 + r % 32, (2 * chunk + r / 32) as u8, 1);
                [Some(k_nibble(48)), Some(high)]
            }
            QuantFormat::Q6_K => {
                // 128-value halves; in each, four quarters of 32 share 32 bytes of high bits.
                let (half, r) = (i / 128, i % 128);
                let (quarter, l) = (r / 32, r % 32);
                let low_byte = 64 * half + l + if quarter % 2 == 1 { 32 } else { 0 };
                let low = bits(low_byte, if quarter < 2 { 0 } else { 4 }, 4);
                let high = bits(128 + 32 * half + l, 2 * quarter as u8, 2);
                [Some(low), Some(high)]
            }
        }
    }

    fn code(self, block: &[u8], i: usize) -> u8 {
        let mut code = 0u8;
        let mut at = 0;
        for b in self.code_bits(i).into_iter().flatten() {
            let mask = ((1u16 << b.width) - 1) as u8;
            code |= ((block[b.byte] >> b.shift) & mask) << at;
            at += b.width;
        }
        code
    }

    fn set_code(self, block: &mut [u8], i: usize, code: u8) {
        let mut at = 0;
        for b in self.code_bits(i).into_iter().flatten() {
            let mask = ((1u16 << b.width) - 1) as u8;
            let piece = (code >> at) & mask;
            block[b.byte] = (block[b.byte] & !(mask << b.shift)) | (piece << b.shift);
            at += b.width;
        }
    }

    /// Rewrites one block so that its value `i` is the old block's value `from[i]`. Each
    /// `from[i]` must lie in `i`'s [`scale_group`](Self::scale_group), so the scales stay right.
    pub fn permute_block(self, block: &[u8], from: &[usize]) -> Result<Vec<u8>, KernelError> {
        let (n, group) = (self.block_values(), self.scale_group());
        if block.len() != self.block_bytes() || from.len() != n {
            return Err(KernelError::BadMatrix(format!(
                "a {self:?} block is {} bytes of {n} values, got {} bytes and {} positions",
                self.block_bytes(),
                block.len(),
                from.len()
            )));
        }
        if let Some(i) = (0..n).find(|&i| from[i] >= n || from[i] / group != i / group) {
            return Err(KernelError::BadMatrix(format!(
                "value {} cannot move to {i}: {self:?} keeps a scale per {group} values",
                from[i]
            )));
        }
        let mut out = block.to_vec();
        for (i, &j) in from.iter().enumerate() {
            self.set_code(&mut out, i, self.code(block, j));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::QuantMatrix;

    /// Random bytes with valid (finite, small) f16 scales where each format keeps them.
    fn random_block(format: QuantFormat, seed: u64) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut block: Vec<u8> = (0..format.block_bytes())
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect();
        let one = half::f16::from_f32(0.5).to_le_bytes();
        let scale_at: &[usize] = match format {
            QuantFormat::Q4_1 | QuantFormat::Q5_1 | QuantFormat::Q4_K | QuantFormat::Q5_K => {
                &[0, 2]
            }
            QuantFormat::Q6_K => &[208],
            _ => &[0],
        };
        for &at in scale_at {
            block[at..at + 2].copy_from_slice(&one);
        }
        block
    }

    /// A permutation inside each group of 16, different per group.
    fn local_permutation(n: usize, seed: usize) -> Vec<usize> {
        (0..n)
            .map(|i| {
                let (g, r) = (i / SCALE_GROUP, i % SCALE_GROUP);
                g * SCALE_GROUP + (r * 5 + g + seed) % SCALE_GROUP
            })
            .collect()
    }

    #[test]
    fn moved_codes_dequantize_to_moved_values() {
        for format in QuantFormat::ALL {
            for seed in 0..8 {
                let n = format.block_values();
                let block = random_block(format, seed as u64 + 1);
                let from = local_permutation(n, seed);
                let moved = format.permute_block(&block, &from).unwrap();
                let before = QuantMatrix::new(format, 1, n, &block).unwrap().dequantize();
                let after = QuantMatrix::new(format, 1, n, &moved).unwrap().dequantize();
                for i in 0..n {
                    assert_eq!(
                        after[i].to_bits(),
                        before[from[i]].to_bits(),
                        "{format:?} value {i}"
                    );
                }
                // Every code is read and written: undoing the move gives the block back.
                let mut back = vec![0; n];
                for (i, &j) in from.iter().enumerate() {
                    back[j] = i;
                }
                assert_eq!(format.permute_block(&moved, &back).unwrap(), block);
            }
        }
    }

    #[test]
    fn refuses_moves_across_scales_and_bad_sizes() {
        for format in QuantFormat::ALL {
            let n = format.block_values();
            let block = random_block(format, 3);
            if format.scale_group() < n {
                let mut from: Vec<usize> = (0..n).collect();
                from.swap(0, format.scale_group());
                assert!(format.permute_block(&block, &from).is_err(), "{format:?}");
            }
            let id: Vec<usize> = (0..n).collect();
            assert!(format.permute_block(&block[1..], &id).is_err());
            assert!(format.permute_block(&block, &id[1..]).is_err());
            let mut out_of_range = id.clone();
            out_of_range[0] = n;
            assert!(format.permute_block(&block, &out_of_range).is_err());
        }
    }
}
