//! Which instruction set the kernels run on, detected once at run time.

use std::fmt;
use std::sync::OnceLock;

/// A family of kernels. Every family computes the same integer block sums; they differ only in
/// the order float partial sums are added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Plain Rust: the reference, and the fallback on any CPU.
    Scalar,
    /// 256-bit integer dot products (`vpmaddubsw`), FMA and F16C: every x86-64 from the last
    /// decade.
    Avx2,
    /// The AVX2 family with AVX-512 VNNI's fused dot products (`vpdpbusd`, `vpdpwssd`, with
    /// VL) in place of AVX2's two-instruction ones, and AVX-512BW's byte masks to expand the
    /// 5-bit formats' high bits (every CPU with VNNI has BW).
    Avx512,
}

impl Isa {
    /// Every family, fastest last.
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    /// The fastest family this CPU runs (detected once).
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            Self::ALL
                .into_iter()
                .rev()
                .find(|isa| isa.is_available())
                .unwrap_or(Isa::Scalar)
        })
    }

    /// Every family this CPU runs: what tests and benchmarks compare.
    pub fn available() -> Vec<Isa> {
        Self::ALL
            .into_iter()
            .filter(|isa| isa.is_available())
            .collect()
    }

    /// Whether this CPU has the features the family needs.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.is_available()
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512bw")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        })
    }
}
