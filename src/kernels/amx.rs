//! Intel AMX (the tile matrix units of Sapphire Rapids and later): detection, the process's
//! permission to use them, and the tile data layouts, checked by a scalar model of the two tile
//! instructions the kernels will issue (`tdpbssd`: int8 × int8 → int32; `tdpbf16ps`: bf16 × bf16
//! → f32).
//!
//! No kernel here executes a tile instruction yet: every machine this project has had since the
//! layouts were written lacked AMX, and a kernel no test has run is not shipped (issue 24). What
//! is here is what the AMX kernels stand on — which CPUs qualify, the Linux permission request,
//! how weights are packed into tiles (partial tiles zero-padded), and the tile loop order —
//! tested through [`tdpbssd_model`] and [`tdpbf16ps_model`], which compute exactly what Intel's
//! pseudo-code for the instructions computes. The AMX path replaces those two calls with
//! `tileloadd` / `tdpbssd` / `tdpbf16ps` / `tilestored` on the same buffers.

use std::sync::OnceLock;

use half::bf16;

/// Tile geometry (the palette-1 maximum every AMX CPU has): 16 rows of 64 bytes.
pub const ROWS: usize = 16;
pub const ROW_BYTES: usize = 64;
/// int8 values in one tile row; a `tdpbssd` step covers this much of the reduction.
pub const K_I8: usize = ROW_BYTES;
/// bf16 values in one tile row.
pub const K_BF16: usize = ROW_BYTES / 2;

/// Whether this process may use AMX, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AmxStatus {
    /// The CPU has no AMX (or this is not x86-64).
    Absent,
    /// `PHI4_ISA` forces an older path.
    Disabled(String),
    /// The CPU has it but the kernel did not enable the tile state (XCR0) or refused this
    /// process the permission (`arch_prctl(ARCH_REQ_XCOMP_PERM)`).
    Refused(String),
    Ready {
        int8: bool,
        bf16: bool,
    },
}

impl AmxStatus {
    /// A line for `phi4 bench` and the server's start-up log.
    pub fn describe(&self) -> String {
        match self {
            AmxStatus::Absent => "AMX: not on this CPU".into(),
            AmxStatus::Disabled(why) => format!("AMX: off ({why})"),
            AmxStatus::Refused(why) => {
                format!("AMX: on the CPU but unusable ({why}); using the vector kernels")
            }
            AmxStatus::Ready { int8, bf16 } => format!(
                "AMX: usable (int8 {}, bf16 {}); the kernels do not use it yet (issue 24)",
                if *int8 { "yes" } else { "no" },
                if *bf16 { "yes" } else { "no" }
            ),
        }
    }
}

/// The CPU's AMX features from CPUID leaf 7: (tile, int8, bf16).
#[cfg(target_arch = "x86_64")]
fn cpuid_amx() -> (bool, bool, bool) {
    let max_leaf = std::arch::x86_64::__cpuid(0).eax;
    if max_leaf < 7 {
        return (false, false, false);
    }
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    (edx >> 24 & 1 == 1, edx >> 25 & 1 == 1, edx >> 22 & 1 == 1)
}

/// XCR0's tile bits (17: XTILECFG, 18: XTILEDATA): the OS saves tile state.
#[cfg(target_arch = "x86_64")]
fn os_enables_tiles() -> bool {
    let osxsave = std::arch::x86_64::__cpuid(1).ecx >> 27 & 1 == 1;
    if !osxsave {
        return false;
    }
    #[target_feature(enable = "xsave")]
    unsafe fn xcr0() -> u64 {
        std::arch::x86_64::_xgetbv(0)
    }
    // SAFETY: XGETBV exists when OSXSAVE (leaf 1, ECX bit 27) says so, checked above.
    let x = unsafe { xcr0() };
    x >> 17 & 3 == 3
}

/// Asks Linux for the tile data state (once per process; threads inherit it).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_permission() -> Result<(), String> {
    const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these codes reads or writes only the u64 we pass.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if r != 0 {
        return Err(format!(
            "the kernel refused ARCH_REQ_XCOMP_PERM: {} (Linux 5.16 or later is needed)",
            std::io::Error::last_os_error()
        ));
    }
    let mut mask: u64 = 0;
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_GET_XCOMP_PERM,
            &mut mask as *mut u64,
        )
    };
    if r != 0 || mask >> XFEATURE_XTILEDATA & 1 == 0 {
        return Err(
            "the permission request succeeded but XTILEDATA is not in the granted set".into(),
        );
    }
    Ok(())
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_permission() -> Result<(), String> {
    Err("only Linux's permission request is implemented".into())
}

/// This process's AMX status, worked out (and permission requested) once.
pub fn status() -> &'static AmxStatus {
    static STATUS: OnceLock<AmxStatus> = OnceLock::new();
    STATUS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let (tile, int8, bf16) = cpuid_amx();
            if !tile {
                return AmxStatus::Absent;
            }
            if let Ok(v) = std::env::var("PHI4_ISA") {
                if matches!(v.as_str(), "avx512" | "avx2" | "scalar") {
                    return AmxStatus::Disabled(format!("PHI4_ISA={v}"));
                }
            }
            if !os_enables_tiles() {
                return AmxStatus::Refused("the OS does not enable the tile state in XCR0".into());
            }
            match request_permission() {
                Ok(()) => AmxStatus::Ready { int8, bf16 },
                Err(e) => AmxStatus::Refused(e),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        AmxStatus::Absent
    })
}

/// Weights (`n` rows of `k` values, the layout of our matrices: output rows × inputs) packed
/// for the B operand: for each block of 16 output rows and each `k_tile`-deep slice of the
/// inputs, one 1 KB tile whose row `g` holds, for each of the 16 outputs in turn, the `group`
/// consecutive inputs `group·g ..` of the slice (the "VNNI" order the instructions read).
/// Partial tiles are zero-padded, so every tile product is a full one.
#[derive(Debug, Clone)]
pub struct Packed<T> {
    pub n: usize,
    pub k: usize,
    /// Tiles, column block major: `[n_blocks][k_tiles][ROWS × ROW_BYTES / size_of::<T>()]`.
    pub tiles: Vec<T>,
    pub k_tiles: usize,
}

fn pack<T: Copy + Default>(w: &[T], n: usize, k: usize, group: usize) -> Packed<T> {
    assert_eq!(w.len(), n * k);
    let k_tile = ROWS * group;
    let per_tile = ROWS * ROWS * group;
    let (n_blocks, k_tiles) = (n.div_ceil(ROWS), k.div_ceil(k_tile));
    let mut tiles = vec![T::default(); n_blocks * k_tiles * per_tile];
    for nb in 0..n_blocks {
        for kt in 0..k_tiles {
            let tile = &mut tiles[(nb * k_tiles + kt) * per_tile..][..per_tile];
            for g in 0..ROWS {
                for col in 0..ROWS {
                    for j in 0..group {
                        let (row, kk) = (nb * ROWS + col, kt * k_tile + g * group + j);
                        if row < n && kk < k {
                            tile[g * ROWS * group + col * group + j] = w[row * k + kk];
                        }
                    }
                }
            }
        }
    }
    Packed {
        n,
        k,
        tiles,
        k_tiles,
    }
}

/// int8 weights for `tdpbssd` (groups of 4).
pub fn pack_i8(w: &[i8], n: usize, k: usize) -> Packed<i8> {
    pack(w, n, k, 4)
}

/// bf16 weights for `tdpbf16ps` (groups of 2).
pub fn pack_bf16(w: &[bf16], n: usize, k: usize) -> Packed<bf16> {
    pack(w, n, k, 2)
}

/// What `tdpbssd` computes on full tiles: `c[m][n] += Σ_g Σ_j a[m][4g+j] · b[g][4n+j]`, in
/// wrapping 32-bit arithmetic.
pub fn tdpbssd_model(c: &mut [i32; ROWS * ROWS], a: &[i8], b: &[i8]) {
    for m in 0..ROWS {
        for n in 0..ROWS {
            let mut acc = c[m * ROWS + n];
            for g in 0..ROWS {
                for j in 0..4 {
                    let x = a[m * K_I8 + 4 * g + j] as i32 * b[g * K_I8 + 4 * n + j] as i32;
                    acc = acc.wrapping_add(x);
                }
            }
            c[m * ROWS + n] = acc;
        }
    }
}

/// What `tdpbf16ps` computes: `c[m][n] += Σ_g a[m][2g]·b[g][2n] + a[m][2g+1]·b[g][2n+1]`,
/// products exact in f32, added in turn as Intel's pseudo-code writes it. (The hardware's
/// internal summation order is not specified that tightly: the AMX kernel's own test will
/// compare within a tolerance, not bit for bit.)
pub fn tdpbf16ps_model(c: &mut [f32; ROWS * ROWS], a: &[bf16], b: &[bf16]) {
    for m in 0..ROWS {
        for n in 0..ROWS {
            let mut acc = c[m * ROWS + n];
            for g in 0..ROWS {
                acc += a[m * K_BF16 + 2 * g].to_f32() * b[g * K_BF16 + 2 * n].to_f32();
                acc += a[m * K_BF16 + 2 * g + 1].to_f32() * b[g * K_BF16 + 2 * n + 1].to_f32();
            }
            c[m * ROWS + n] = acc;
        }
    }
}

/// The A operand's tile for rows `m0..m0+16` and inputs `k0..k0+kt` of a row-major `m × k`
/// matrix, zero-padded.
fn a_tile<T: Copy + Default>(
    a: &[T],
    m: usize,
    k: usize,
    m0: usize,
    k0: usize,
    kt: usize,
) -> Vec<T> {
    let mut t = vec![T::default(); ROWS * kt];
    for r in 0..ROWS.min(m.saturating_sub(m0)) {
        let len = kt.min(k - k0);
        t[r * kt..r * kt + len].copy_from_slice(&a[(m0 + r) * k + k0..][..len]);
    }
    t
}

/// `a` (`m × k` int8, row-major) times the packed weights' transpose: `m × n` int32, tile by
/// tile in the order the AMX kernel runs them (per 16 rows of `a`, per 16 outputs, the
/// reduction accumulated in one C tile).
pub fn matmul_i8(a: &[i8], m: usize, w: &Packed<i8>) -> Vec<i32> {
    tiled(a, m, w, K_I8, tdpbssd_model)
}

/// [`matmul_i8`] for bf16 operands, f32 results.
pub fn matmul_bf16(a: &[bf16], m: usize, w: &Packed<bf16>) -> Vec<f32> {
    tiled(a, m, w, K_BF16, tdpbf16ps_model)
}

fn tiled<T: Copy + Default, C: Copy + Default>(
    a: &[T],
    m: usize,
    w: &Packed<T>,
    kt: usize,
    mut step: impl FnMut(&mut [C; ROWS * ROWS], &[T], &[T]),
) -> Vec<C> {
    let (n, k) = (w.n, w.k);
    assert_eq!(a.len(), m * k);
    let per_tile = ROWS * kt;
    let mut out = vec![C::default(); m * n];
    for m0 in (0..m).step_by(ROWS) {
        let a_tiles: Vec<Vec<T>> = (0..w.k_tiles)
            .map(|t| a_tile(a, m, k, m0, t * kt, kt))
            .collect();
        for nb in 0..n.div_ceil(ROWS) {
            let mut c = [C::default(); ROWS * ROWS];
            for (t, at) in a_tiles.iter().enumerate() {
                step(
                    &mut c,
                    at,
                    &w.tiles[(nb * w.k_tiles + t) * per_tile..][..per_tile],
                );
            }
            for r in 0..ROWS.min(m - m0) {
                for col in 0..ROWS.min(n - nb * ROWS) {
                    out[(m0 + r) * n + nb * ROWS + col] = c[r * ROWS + col];
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// int8 codes over the whole range, from the kernels' test data in [-0.5, 0.5).
    fn codes(len: usize, seed: u64) -> Vec<i8> {
        crate::kernels::test_data(len, seed)
            .into_iter()
            .map(|v| (v * 256.0).floor() as i8)
            .collect()
    }

    #[test]
    fn int8_tiles_reproduce_the_plain_product_for_odd_shapes_and_extreme_codes() {
        for &(m, n, k) in &[
            (1, 1, 4),
            (3, 17, 64),
            (16, 16, 64),
            (17, 15, 100),
            (33, 40, 192),
            (5, 33, 257),
        ] {
            let a = codes(m * k, 1 + m as u64);
            let mut w = codes(n * k, 7 + n as u64);
            // The extremes of the int8 range, where a wrong sign extension shows.
            w[0] = -128;
            if w.len() > 1 {
                w[1] = 127;
            }
            let got = matmul_i8(&a, m, &pack_i8(&w, n, k));
            for i in 0..m {
                for j in 0..n {
                    let want: i32 = (0..k)
                        .map(|t| a[i * k + t] as i32 * w[j * k + t] as i32)
                        .sum();
                    assert_eq!(got[i * n + j], want, "m {m} n {n} k {k} at ({i}, {j})");
                }
            }
        }
    }

    #[test]
    fn bf16_tiles_reproduce_the_plain_product_for_odd_shapes() {
        for &(m, n, k) in &[
            (1, 1, 2),
            (2, 17, 32),
            (16, 16, 64),
            (19, 31, 70),
            (40, 3, 130),
        ] {
            let to_bf16 = |v: Vec<f32>| v.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
            let a = to_bf16(crate::kernels::test_data(m * k, 3));
            let w = to_bf16(crate::kernels::test_data(n * k, 4));
            let got = matmul_bf16(&a, m, &pack_bf16(&w, n, k));
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|t| a[i * k + t].to_f64() * w[j * k + t].to_f64())
                        .sum();
                    // bf16 products are exact in f32; only the f32 additions round.
                    let tol = 1e-6 * k as f64;
                    assert!(
                        (got[i * n + j] as f64 - want).abs() < tol,
                        "m {m} n {n} k {k}"
                    );
                }
            }
        }
    }

    #[test]
    fn packing_puts_each_weight_where_the_instruction_reads_it() {
        // 2 outputs × 8 inputs: one tile, row g = inputs 4g..4g+4 of output 0, then of output 1.
        let w: Vec<i8> = (0..16).collect();
        let p = pack_i8(&w, 2, 8);
        assert_eq!((p.k_tiles, p.tiles.len()), (1, ROWS * ROW_BYTES));
        assert_eq!(&p.tiles[..8], &[0, 1, 2, 3, 8, 9, 10, 11]);
        assert_eq!(&p.tiles[64..72], &[4, 5, 6, 7, 12, 13, 14, 15]);
        assert!(p.tiles[8..64].iter().all(|&v| v == 0));
    }

    #[test]
    fn status_is_decided_and_described() {
        let s = status();
        let line = s.describe();
        assert!(line.starts_with("AMX: "), "{line}");
        // The same answer every time (worked out once per process).
        assert_eq!(status(), s);
        println!("{line}");
    }
}
