"""A faster int4 decode kernel for AVX2 CPUs, on the weights exactly as Int4Linear packs them (no second copy).

torch's `_weight_int4pack_mm_for_cpu` on AVX2 turns every 4-bit weight into a float (convert, scale, add the zero)
before its multiply-add: measured ~7 G weights/s per core, so a decode step is compute-bound at ~35-45% of this
machine's read bandwidth (bench/int4_decode.py). This kernel does what llama.cpp does on AVX2 instead: activations
quantized to int8 per 32 columns, 4-bit weights multiplied in integers (`vpmaddubsw`), one float scale per 32x32
tile; the zero point as scale-free sums of the quantized activations (so their rounding cancels as in a
dequantized product). Error vs the exact product ~0.5% relative (the bf16 kernel: ~0.25%), well inside int4's own.

It reads torch's AVX2 packed layout (blocks of 32 rows, each [K, 16] bytes: row j in the low nibble, row j + 16 in
the high one; probed by quant_kernels) and the layer's (scale, zero) bf16 pairs. It is compiled with the system C
compiler at first use into a per-user cache; anything missing (not x86-64 Linux, no AVX2/FMA, no compiler, another
packed layout, VLMKIT_INT4_KERNEL=torch) and callers keep torch's kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..hardware import cpu_flags
from . import quant_kernels

SERIAL_WORK = 1 << 18  # multiply-adds below which the kernel runs on one thread
MAX_ROWS = 16  # beyond a few rows the weights are reused from cache: torch's kernels and the prefill path win

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>

static void quantize_rows(const float* x, long M, long K, long group, int8_t* xq, float* dx, float* xs) {
  for (long m = 0; m < M; m++) {
    const float* xr = x + m * K;
    for (long b = 0; b < K / 32; b++) {
      float amax = 0.f;
      for (int j = 0; j < 32; j++) { float a = fabsf(xr[b * 32 + j]); amax = a > amax ? a : amax; }
      float inv = amax > 0.f ? 127.f / amax : 0.f;
      int t = 0;
      for (int j = 0; j < 32; j++) {
        int q = (int)lrintf(xr[b * 32 + j] * inv);
        xq[m * K + b * 32 + j] = (int8_t)q;
        t += q;
      }
      dx[m * (K / 32) + b] = amax / 127.f;
      if (b % (group / 32) == 0) xs[m * (K / group) + b / (group / 32)] = 0.f;
      xs[m * (K / group) + b / (group / 32)] += t * (amax / 127.f);
    }
  }
}

static inline __attribute__((always_inline)) void block_rows(
    const uint8_t* B, const uint16_t* sz, long N, long nb, long K, long group,
    const int8_t* xq, const float* dx, const float* xs, float* y, long m0, const int MT) {
  const long KB = K / 32, G = K / group, per_group = group / 32;
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i pairs = _mm256_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15,
                                         0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  __m256 acc[MT][4];
  for (int t = 0; t < MT; t++) for (int i = 0; i < 4; i++) acc[t][i] = _mm256_setzero_ps();
  for (long g = 0; g < G; g++) {
    const uint16_t* s = sz + (g * N + nb * 32) * 2;  /* (scale, zero) bf16 pairs of the block's 32 rows */
    __m256 sc[4], ze[4];
    for (int i = 0; i < 4; i++) {
      __m256i v = _mm256_loadu_si256((const __m256i*)(s + 16 * i));
      sc[i] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      ze[i] = _mm256_fmadd_ps(sc[i], _mm256_set1_ps(-8.f),
                              _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000))));
    }
    for (long kb = g * per_group; kb < (g + 1) * per_group; kb++) {
      __m256i i32[MT][4];
      for (int t = 0; t < MT; t++) for (int i = 0; i < 4; i++) i32[t][i] = _mm256_setzero_si256();
      for (int half = 0; half < 2; half++) {
        __m256i a0[MT], a1[MT];  /* int16 sums of rows 0..15 and 16..31 (8 pairs: |sum| <= 30480) */
        for (int t = 0; t < MT; t++) { a0[t] = _mm256_setzero_si256(); a1[t] = _mm256_setzero_si256(); }
        const long k0 = kb * 32 + half * 16;
        for (long k = k0; k < k0 + 16; k += 2) {
          __m256i v = _mm256_loadu_si256((const __m256i*)(B + k * 16));  /* the rows at k | at k + 1 */
          __m256i lo = _mm256_and_si256(v, low);
          __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
          lo = _mm256_shuffle_epi8(_mm256_permute4x64_epi64(lo, 0xD8), pairs);  /* (k, k + 1) of each row */
          hi = _mm256_shuffle_epi8(_mm256_permute4x64_epi64(hi, 0xD8), pairs);
          for (int t = 0; t < MT; t++) {
            __m256i xp = _mm256_set1_epi16(*(const int16_t*)(xq + (m0 + t) * K + k));
            a0[t] = _mm256_add_epi16(a0[t], _mm256_maddubs_epi16(lo, xp));
            a1[t] = _mm256_add_epi16(a1[t], _mm256_maddubs_epi16(hi, xp));
          }
        }
        for (int t = 0; t < MT; t++) {
          i32[t][0] = _mm256_add_epi32(i32[t][0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(a0[t])));
          i32[t][1] = _mm256_add_epi32(i32[t][1], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(a0[t], 1)));
          i32[t][2] = _mm256_add_epi32(i32[t][2], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(a1[t])));
          i32[t][3] = _mm256_add_epi32(i32[t][3], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(a1[t], 1)));
        }
      }
      for (int t = 0; t < MT; t++) {
        const __m256 d = _mm256_set1_ps(dx[(m0 + t) * KB + kb]);
        for (int i = 0; i < 4; i++)
          acc[t][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32[t][i]), _mm256_mul_ps(sc[i], d), acc[t][i]);
      }
    }
    for (int t = 0; t < MT; t++) {
      const __m256 sum = _mm256_set1_ps(xs[(m0 + t) * G + g]);
      for (int i = 0; i < 4; i++) acc[t][i] = _mm256_fmadd_ps(ze[i], sum, acc[t][i]);
    }
  }
  for (int t = 0; t < MT; t++)
    for (int i = 0; i < 4; i++) _mm256_storeu_ps(y + (m0 + t) * N + nb * 32 + 8 * i, acc[t][i]);
}

int vlmkit_int4_gemm(const float* x, long M, long K, const uint8_t* packed, const uint16_t* sz, long N, long group,
                     float* y, int threads) {
  if (N % 32 || K % 32 || group % 32 || K % group || M < 1) return 1;
  int8_t* xq = (int8_t*)malloc(M * K + 2);
  float* dx = (float*)malloc(sizeof(float) * M * (K / 32));
  float* xs = (float*)malloc(sizeof(float) * M * (K / group));
  if (!xq || !dx || !xs) { free(xq); free(dx); free(xs); return 2; }
  quantize_rows(x, M, K, group, xq, dx, xs);
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (long nb = 0; nb < N / 32; nb++) {
    const uint8_t* B = packed + nb * K * 16;
    long m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) block_rows(B, sz, N, nb, K, group, xq, dx, xs, y, m0, 4);
    for (; m0 + 2 <= M; m0 += 2) block_rows(B, sz, N, nb, K, group, xq, dx, xs, y, m0, 2);
    for (; m0 < M; m0++) block_rows(B, sz, N, nb, K, group, xq, dx, xs, y, m0, 1);
  }
  free(xq); free(dx); free(xs);
  return 0;
}
"""

FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
_STATE: dict = {}


def _cache_dir() -> Path:
    root = os.environ.get("VLMKIT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                          os.path.expanduser("~/.cache"), "vlmkit")
    return Path(root) / "kernels"


def _build() -> Optional[ctypes.CDLL]:
    if os.environ.get("VLMKIT_INT4_KERNEL", "").lower() == "torch":
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if not {"avx2", "fma"} <= cpu_flags() or quant_kernels._block_rows() != 32:  # 32: torch's AVX2 layout
        return None
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        return None
    digest = hashlib.sha256((SOURCE + " ".join(FLAGS)).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"int4_avx2_{digest}.so"
    try:
        if not lib.exists():
            lib.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:  # compiled aside, renamed: no half-written .so
                src, out = Path(tmp) / "int4.c", Path(tmp) / "int4.so"
                src.write_text(SOURCE)
                subprocess.run([cc, *FLAGS, str(src), "-o", str(out)], check=True, capture_output=True, timeout=120)
                os.replace(out, lib)
        dll = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError):
        return None
    fn = dll.vlmkit_int4_gemm
    fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long,
                   ctypes.c_long, ctypes.c_void_p, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def available() -> bool:
    """Whether the kernel runs here (compiled at the first call; the answer is kept)."""
    if "fn" not in _STATE:
        _STATE["fn"] = _build()
    return _STATE["fn"] is not None


def gemm(x2: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
         n: int) -> Optional[torch.Tensor]:
    """x2 [M, K] @ W.T as float32 [M, n] for an int4 weight in torch's packed form, or None where this kernel does
    not apply (then the caller runs torch's). Every layout fact is checked here: the C code trusts its pointers."""
    m, k = x2.shape
    if not (1 <= m <= MAX_ROWS and x2.device.type == "cpu" and n % 32 == 0 and k % group_size == 0
            and group_size % 32 == 0 and packed.dtype == torch.uint8 and packed.is_contiguous()
            and packed.numel() == n * k // 2 and scales_and_zeros.dtype == torch.bfloat16
            and scales_and_zeros.is_contiguous() and scales_and_zeros.shape == (k // group_size, n, 2)):
        return None
    if not available():
        return None
    x = x2 if x2.dtype == torch.float32 and x2.is_contiguous() else x2.float().contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    # small products on one thread: waking a second one costs more than they take (a scheduler quantum when
    # another process holds the core)
    threads = 1 if m * n * k < SERIAL_WORK else torch.get_num_threads()
    rc = _STATE["fn"](x.data_ptr(), m, k, packed.data_ptr(), scales_and_zeros.data_ptr(), n, group_size,
                      y.data_ptr(), threads)
    if rc != 0:
        raise RuntimeError(f"the int4 kernel refused a {m}x{k} @ {n}x{k} (group {group_size}) product: code {rc}")
    return y
