// A CPU kernel for q4 mode: y[:, col:col+N] = x @ W.T (+ bias), W kept as the GGUF's own codes.
//
// Why not aten._weight_int4pack_mm_for_cpu: it re-expands the 4-bit codes for every block of
// rows (a forward over 8 tokens costs ~2.5x one, which eats speculative decoding's gain), and its
// scale and zero are bfloat16 where the GGUF's are exact float32 products. Here each 16-output x
// group tile of codes is expanded once into bfloat16 vectors and multiplied into up to 8 rows
// held in registers, and scale and zero stay exact (float32, or float16 / the K-quants' two levels
// where those hold them exactly).
//
// Weights: w[n, k] = u[n, k] * s[n, g] + z[n, g], g = k / G, G = 16 or 32, u an unsigned code.
// Per row and group: acc = sum_k x[k] * u[n, k] (bfloat16 products, exact in float32, summed in
// float32 by vdpbf16ps), then y += acc * s + z * sum_k x[k]. Every row runs the same instruction
// sequence whatever the number of rows, so row i of the result does not depend on the others
// (speculative verification over T rows reproduces T one-row forwards bit for bit).
//
// Two builds of this file, chosen by the CPU (models/kernels.py): AVX512-BF16 (vdpbf16ps, 8-row
// tiles) and, for CPUs without it, AVX2 + FMA + F16C: the activations rounded to bfloat16 as
// above but kept as float32 values, the codes widened to float32, exact products summed in
// float32 by FMA over the (output, k-parity) lanes of each k-pair vector, then the two parities
// of each output added once per group. Both read the same packed layout.
//
// Layout (built by models/q4.py): outputs in blocks of 16, then groups, then
//   NIB   (u <= 15): G/4 chunks of 32 bytes; byte e of chunk c holds element e of k-pair vector
//                    2c in its low nibble and of vector 2c+1 in its high nibble;
//   NIB5  (u <= 31): NIB's chunks for the low 4 bits, then G/2 32-bit masks: bit e of mask j is
//                    bit 4 of element e of vector j (5-bit types at 0.625 bytes per weight);
//   NIB6  (u <= 63): as NIB5 with two masks per vector (bits 4 and 5): 0.75 bytes per weight;
//   INT8  (signed):  G/2 vectors of 32 int8 (u - 128; the zero carries the + 128 s).
// Element 2o+p of k-pair vector j is the code of output o at k = 2j + p (vdpbf16ps pairs).
// Scale and zero of group g, per 16 outputs (all exact: the GGUF's own values or products):
//   F32: s, z float32 [N/16, K/G, 16];
//   F16: s, z float16 [N/16, K/G, 16] (formats whose per-block values are float16: Q4_0..Q8_0);
//   K2:  two levels, as K-quants store them: sa float32 [N/16, K/256, 2, 16] (D, M per 256
//        weights) and sb int8 [N/16, K/G, 2, 16] (c, m per group); s = D * c, z = M * m.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace {

enum Mode : int64_t { NIB = 0, NIB5 = 1, NIB6 = 2, INT8 = 3 };
enum Scales : int64_t { F32 = 0, F16 = 1, K2 = 2 };
constexpr int64_t A8 = 8;  // mode flag: 8-bit activations (q4a8)
// accumulators per row: a fixed number (the order of the sums must not depend on the rows)
constexpr int CHAINS = 2;
constexpr int64_t PREFETCH = 4096;  // bytes ahead

// code bytes per 16 outputs x G
template <int MODE, int G>
constexpr int64_t code_bytes = MODE == NIB    ? G * 8
                              : MODE == NIB5 ? G * 10
                              : MODE == NIB6 ? G * 12
                                             : G * 16;

#if defined(__AVX512BF16__)

constexpr int64_t MAX_ROWS = 8;  // rows per register tile
constexpr int64_t CALL_ROWS = MAX_ROWS;
using XT = uint16_t;             // activations as bfloat16 bits

uint16_t bf16_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>(b >> 16);  // small integers are exact in bfloat16
}

struct Tables {
  __m512i nib, lo, hi;
  Tables() {
    alignas(64) uint16_t t[96];
    for (int i = 0; i < 32; ++i) t[i] = bf16_bits(static_cast<float>(i & 15));
    for (int i = 0; i < 64; ++i) t[32 + i] = bf16_bits(static_cast<float>(i));
    nib = _mm512_load_si512(t);
    lo = _mm512_load_si512(t + 32);
    hi = _mm512_load_si512(t + 64);
  }
};

inline __m512 dp(__m512 acc, __m512i w, uint32_t xpair) {
  return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)_mm512_set1_epi32(static_cast<int>(xpair)));
}

// One block of 16 outputs for R rows starting at row r0.
template <int SC>
inline void group_scales(int64_t g, int64_t gps, const uint8_t* sa, const uint8_t* sb, __m512& sv,
                         __m512& zv) {
  if constexpr (SC == F32) {
    sv = _mm512_loadu_ps(reinterpret_cast<const float*>(sa) + g * 16);
    zv = _mm512_loadu_ps(reinterpret_cast<const float*>(sb) + g * 16);
  } else if constexpr (SC == F16) {
    sv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sa + g * 32)));
    zv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + g * 32)));
  } else {
    const float* dm = reinterpret_cast<const float*>(sa) + (g / gps) * 32;
    const uint8_t* cm = sb + g * 32;
    const __m512 c = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cm))));
    const __m512 m = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cm + 16))));
    sv = _mm512_mul_ps(_mm512_loadu_ps(dm), c);
    zv = _mm512_mul_ps(_mm512_loadu_ps(dm + 16), m);
  }
}

template <int R, int MODE, int G, int SC>
void tile(const Tables& tb, const XT* xq, const float* xs, int64_t K, const uint8_t* codes,
          const uint8_t* sa, const uint8_t* sb, const float* bias, float* y, int64_t ldy) {
  constexpr int64_t BPG = code_bytes<MODE, G>;
  const auto* xb = reinterpret_cast<const uint32_t*>(xq);  // k-pairs
  const int64_t ng = K / G, kp = K / 2;                   // groups, k-pairs per row
  __m512 tot[R];
  for (int r = 0; r < R; ++r) tot[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const uint8_t* c = codes + g * BPG;
    // the codes stream from memory once per block: ask for them ahead of the multiply
    for (int64_t off = 0; off < BPG; off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(c + PREFETCH + off), _MM_HINT_T0);
    const int64_t p0 = g * (G / 2);
    // A accumulators per row, vector j feeding chain j % A: independent chains of vdpbf16ps in
    // flight. Two, not more: 8 rows x 2 chains + 8 totals fill the registers, and 8-row tiles
    // (one expansion of the codes per 8 rows) beat 4-row tiles with 4 chains (measured)
    constexpr int A = CHAINS;
    __m512 acc[R][A];
    for (int r = 0; r < R; ++r)
      for (int a = 0; a < A; ++a) acc[r][a] = _mm512_setzero_ps();
    if constexpr (MODE == NIB || MODE == NIB5 || MODE == NIB6) {
      // unrolled in full: chain indices must be constants for the accumulators to stay in
      // registers
#pragma GCC unroll 8
      for (int q = 0; q < G / 4; ++q) {
        const __m512i w = _mm512_cvtepu8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * q)));
        __m512i a, b;
        if constexpr (MODE == NIB) {
          a = _mm512_permutexvar_epi16(w, tb.nib);
          b = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), tb.nib);
        } else if constexpr (MODE == NIB6) {
          const uint32_t* hb = reinterpret_cast<const uint32_t*>(c + G * 8) + 4 * q;
          __m512i ia = _mm512_and_si512(w, _mm512_set1_epi16(15));
          __m512i ib = _mm512_srli_epi16(w, 4);
          ia = _mm512_mask_add_epi16(ia, _cvtu32_mask32(hb[0]), ia, _mm512_set1_epi16(16));
          ia = _mm512_mask_add_epi16(ia, _cvtu32_mask32(hb[1]), ia, _mm512_set1_epi16(32));
          ib = _mm512_mask_add_epi16(ib, _cvtu32_mask32(hb[2]), ib, _mm512_set1_epi16(16));
          ib = _mm512_mask_add_epi16(ib, _cvtu32_mask32(hb[3]), ib, _mm512_set1_epi16(32));
          a = _mm512_permutex2var_epi16(tb.lo, ia, tb.hi);
          b = _mm512_permutex2var_epi16(tb.lo, ib, tb.hi);
        } else {
          const uint32_t* hb = reinterpret_cast<const uint32_t*>(c + G * 8) + 2 * q;
          const __m512i sixteen = _mm512_set1_epi16(16);
          __m512i ia = _mm512_and_si512(w, _mm512_set1_epi16(15));
          __m512i ib = _mm512_srli_epi16(w, 4);
          ia = _mm512_mask_add_epi16(ia, _cvtu32_mask32(hb[0]), ia, sixteen);
          ib = _mm512_mask_add_epi16(ib, _cvtu32_mask32(hb[1]), ib, sixteen);
          a = _mm512_permutexvar_epi16(ia, tb.lo);
          b = _mm512_permutexvar_epi16(ib, tb.lo);
        }
        for (int r = 0; r < R; ++r) {
          __m512* ar = acc[r];
          ar[(2 * q) % A] = dp(ar[(2 * q) % A], a, xb[r * kp + p0 + 2 * q]);
          ar[(2 * q + 1) % A] = dp(ar[(2 * q + 1) % A], b, xb[r * kp + p0 + 2 * q + 1]);
        }
      }
    } else {  // INT8
#pragma GCC unroll 16
      for (int j = 0; j < G / 2; ++j) {
        const uint8_t* v = c + 32 * j;
        const __m512 f0 = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v))));
        const __m512 f1 = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + 16))));
        const __m512i w = (__m512i)_mm512_cvtne2ps_pbh(f1, f0);  // low half from f0: 0..15
        for (int r = 0; r < R; ++r) acc[r][j % A] = dp(acc[r][j % A], w, xb[r * kp + p0 + j]);
      }
    }
    __m512 sv, zv;
    group_scales<SC>(g, 256 / G, sa, sb, sv, zv);
    for (int r = 0; r < R; ++r) {
      // a fixed pairwise sum of the chains: the same for every number of rows
      for (int w = A / 2; w >= 1; w /= 2)
        for (int a = 0; a < w; ++a) acc[r][a] = _mm512_add_ps(acc[r][a], acc[r][a + w]);
      tot[r] = _mm512_fmadd_ps(acc[r][0], sv, tot[r]);
      tot[r] = _mm512_fmadd_ps(zv, _mm512_set1_ps(xs[r * ng + g]), tot[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    if (bias) tot[r] = _mm512_add_ps(tot[r], _mm512_loadu_ps(bias));
    _mm512_storeu_ps(y + r * ldy, tot[r]);
  }
}

// x float32 [M, K] -> bfloat16 bits (round to nearest even, as Tensor.to(torch.bfloat16) does
// for finite values) and the float32 sum of each group's rounded values.
void prepare(const float* x, int64_t M, int64_t K, int64_t G, uint16_t* xb, float* xs) {
  const int64_t ng = K / G;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < ng; ++g) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
        const __m512i b = _mm512_castps_si512(_mm512_loadu_ps(x + m * K + k));
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
        const __m512i r = _mm512_srli_epi32(
            _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xb + m * K + k), _mm512_cvtepi32_epi16(r));
        sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(r, 16)));
      }
      xs[m * ng + g] = _mm512_reduce_add_ps(sum);
    }
  }
}

// ---- q4a8: the activations as signed bytes (W4A8, AVX512-VNNI) ----
//
// Each row's activations are quantized per 32 inputs: d = max|x| / 127, q = round(x / d) in
// -127..127 (llama.cpp's Q8_0 rule). A group's dot product is then an exact int32 sum of code x
// byte products (vpdpbusd: 64 per instruction, twice vdpbf16ps's 32), and
//   y += (isum * s) * d + z * (d * sum q).
// Integer sums are exact in any order, and the float32 steps run in one fixed sequence per row,
// so row i still does not depend on the other rows.
//
// The same packed layouts: the codes of 16 outputs x 4 consecutive inputs become one 32-bit lane
// per output (bytes k, k+1, k+2, k+3), the unsigned operand of vpdpbusd.

// quad vector q (inputs 4q .. 4q+3 of the group) of a group's codes as 16 lanes of 4 bytes
template <int MODE, int G>
inline __m512i quad(const uint8_t* c, int q) {
  if constexpr (MODE == NIB) {
    // lane o = bytes 2o, 2o+1 of chunk q: low nibbles are inputs 4q, 4q+1, high ones 4q+2, 4q+3
    const __m512i w =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * q)));
    return _mm512_and_si512(_mm512_or_si512(w, _mm512_slli_epi32(w, 12)),
                            _mm512_set1_epi32(0x0F0F0F0F));
  } else if constexpr (MODE == INT8) {
    // k-pair vectors 2q and 2q+1, signed bytes u - 128: the sign bit flipped gives u
    const __m512i a = _mm512_cvtepu16_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * (2 * q))));
    const __m512i b = _mm512_cvtepu16_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * (2 * q + 1))));
    return _mm512_xor_si512(_mm512_or_si512(a, _mm512_slli_epi32(b, 16)),
                            _mm512_set1_epi32(static_cast<int>(0x80808080u)));
  } else {
    // as the bfloat16 path: 16-bit codes of k-pair vectors 2q (ia) and 2q+1 (ib) with their
    // high bits added, then each lane's two 16-bit elements narrowed to bytes
    const __m512i w =
        _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * q)));
    __m512i ia = _mm512_and_si512(w, _mm512_set1_epi16(15));
    __m512i ib = _mm512_srli_epi16(w, 4);
    if constexpr (MODE == NIB6) {
      const uint32_t* hb = reinterpret_cast<const uint32_t*>(c + G * 8) + 4 * q;
      ia = _mm512_mask_add_epi16(ia, _cvtu32_mask32(hb[0]), ia, _mm512_set1_epi16(16));
      ia = _mm512_mask_add_epi16(ia, _cvtu32_mask32(hb[1]), ia, _mm512_set1_epi16(32));
      ib = _mm512_mask_add_epi16(ib, _cvtu32_mask32(hb[2]), ib, _mm512_set1_epi16(16));
      ib = _mm512_mask_add_epi16(ib, _cvtu32_mask32(hb[3]), ib, _mm512_set1_epi16(32));
    } else {
      const uint32_t* hb = reinterpret_cast<const uint32_t*>(c + G * 8) + 2 * q;
      ia = _mm512_mask_add_epi16(ia, _cvtu32_mask32(hb[0]), ia, _mm512_set1_epi16(16));
      ib = _mm512_mask_add_epi16(ib, _cvtu32_mask32(hb[1]), ib, _mm512_set1_epi16(16));
    }
    const __m512i lo = _mm512_and_si512(_mm512_or_si512(ia, _mm512_srli_epi32(ia, 8)),
                                        _mm512_set1_epi32(0xFFFF));
    const __m512i hi = _mm512_slli_epi32(_mm512_or_si512(ib, _mm512_srli_epi32(ib, 8)), 16);
    return _mm512_or_si512(lo, hi);
  }
}

constexpr int64_t A8_ROWS = 12;  // rows per tile: 12 totals + 8 code vectors fit 32 registers

// Rows r = 0..R-1 of one group: tot[r] += (isum * s) * d + z * (d * sum q). The one sequence of
// instructions per row and group on every path (tile_a8, span_a8), so a row's result does not
// depend on the path, the tile or the number of rows.
template <int R, int NQ, int G>
inline void group_a8(const __m512i* w, __m512 sv, __m512 zv, const int32_t* xw, int64_t kq,
                     int64_t g, const float* xd, int64_t nd, const float* xs, int64_t ng,
                     __m512* tot) {
  // independent dot-product chains per row: integer sums, so their number changes nothing
  constexpr int CH = R <= 2 ? 4 : R <= 4 ? 2 : 1;
  const int64_t q0 = g * NQ;
  // unrolled: the totals stay in registers
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    __m512i acc[CH];
    for (int a = 0; a < CH; ++a) acc[a] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int q = 0; q < NQ; ++q)
      acc[q % CH] = _mm512_dpbusd_epi32(acc[q % CH], w[q], _mm512_set1_epi32(xw[r * kq + q0 + q]));
    for (int a = 1; a < CH; ++a) acc[0] = _mm512_add_epi32(acc[0], acc[a]);
    const __m512 prod = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[0]), sv);
    tot[r] = _mm512_fmadd_ps(prod, _mm512_set1_ps(xd[r * nd + g * G / 32]), tot[r]);
    tot[r] = _mm512_fmadd_ps(zv, _mm512_set1_ps(xs[r * ng + g]), tot[r]);
  }
}

// A group's scale and zero as the multiply uses them: signed-byte codes are multiplied as
// u = stored + 128, so the packed zero (which carries the + 128 s for stored codes) gives it back
template <int MODE, int G, int SC>
inline void scales_a8(int64_t g, const uint8_t* sa, const uint8_t* sb, __m512& sv, __m512& zv) {
  group_scales<SC>(g, 256 / G, sa, sb, sv, zv);
  if constexpr (MODE == INT8) zv = _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), sv, zv);
}

template <int R, int MODE, int G, int SC>
void tile_a8(const int8_t* xq, const float* xd, const float* xs, int64_t K, const uint8_t* codes,
             const uint8_t* sa, const uint8_t* sb, const float* bias, float* y, int64_t ldy) {
  constexpr int64_t BPG = code_bytes<MODE, G>;
  constexpr int NQ = G / 4;
  const auto* xw = reinterpret_cast<const int32_t*>(xq);  // 4 bytes per broadcast
  const int64_t ng = K / G, kq = K / 4, nd = K / 32;
  __m512 tot[R];
  for (int r = 0; r < R; ++r) tot[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const uint8_t* c = codes + g * BPG;
    for (int64_t off = 0; off < BPG; off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(c + PREFETCH + off), _MM_HINT_T0);
    __m512i w[NQ];
#pragma GCC unroll 8
    for (int q = 0; q < NQ; ++q) w[q] = quad<MODE, G>(c, q);
    __m512 sv, zv;
    scales_a8<MODE, G, SC>(g, sa, sb, sv, zv);
    group_a8<R, NQ, G>(w, sv, zv, xw, kq, g, xd, nd, xs, ng, tot);
  }
  for (int r = 0; r < R; ++r) {
    if (bias) tot[r] = _mm512_add_ps(tot[r], _mm512_loadu_ps(bias));
    _mm512_storeu_ps(y + r * ldy, tot[r]);
  }
}

// ---- more rows than one register tile: the weights stream once ----
//
// Above A8_ROWS rows a block of 16 outputs is not multiplied tile after tile (each tile a full
// pass over the block's codes, expanding them again). Instead the block's groups go in spans of
// SPAN_QUADS expanded code vectors (8 KB, in L1): a span is read from memory and expanded once,
// then every row tile runs over it with its totals in registers, parked in `tot` between spans.
// Each row's steps (group_a8) and their order are those of tile_a8, so the result is the same
// bits as a one-row forward.
constexpr int64_t SPAN_QUADS = 128;
constexpr int64_t MAX_A8_ROWS = 64;  // rows per call on this path

template <int R, int NQ, int G, int64_t BPG>
void span_rows_a8(const __m512i* wb, const __m512* szb, int64_t g0, int64_t g1, const int8_t* xq,
                  const float* xd, const float* xs, int64_t K, float* totp, bool first,
                  const uint8_t* next) {
  const auto* xw = reinterpret_cast<const int32_t*>(xq);
  const int64_t ng = K / G, kq = K / 4, nd = K / 32;
  __m512 tot[R];
  for (int r = 0; r < R; ++r) tot[r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(totp + 16 * r);
  for (int64_t g = g0; g < g1; ++g) {
    // the next span's codes, a group's worth per group: they arrive while this one multiplies
    if (next)
      for (int64_t off = 0; off < BPG; off += 64)
        _mm_prefetch(reinterpret_cast<const char*>(next + (g - g0) * BPG + off), _MM_HINT_T0);
    const __m512i* w = wb + (g - g0) * NQ;
    __m512i wr[NQ];
#pragma GCC unroll 8
    for (int q = 0; q < NQ; ++q) wr[q] = _mm512_load_si512(w + q);
    group_a8<R, NQ, G>(wr, szb[2 * (g - g0)], szb[2 * (g - g0) + 1], xw, kq, g, xd, nd, xs, ng,
                       tot);
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(totp + 16 * r, tot[r]);
}

template <int NQ, int G, int64_t BPG>
void span_tile_a8(int64_t R, const __m512i* wb, const __m512* szb, int64_t g0, int64_t g1,
                  const int8_t* xq, const float* xd, const float* xs, int64_t K, float* totp,
                  bool first, const uint8_t* next) {
  switch (R) {
#define VERIDRAFT_ROWS(n) \
  case n:                 \
    return span_rows_a8<n, NQ, G, BPG>(wb, szb, g0, g1, xq, xd, xs, K, totp, first, next);
    VERIDRAFT_ROWS(1) VERIDRAFT_ROWS(2) VERIDRAFT_ROWS(3) VERIDRAFT_ROWS(4)
    VERIDRAFT_ROWS(5) VERIDRAFT_ROWS(6) VERIDRAFT_ROWS(7) VERIDRAFT_ROWS(8)
    VERIDRAFT_ROWS(9) VERIDRAFT_ROWS(10) VERIDRAFT_ROWS(11) VERIDRAFT_ROWS(12)
#undef VERIDRAFT_ROWS
  }
}

template <int MODE, int G, int SC>
void span_a8(int64_t M, const int8_t* xq, const float* xd, const float* xs, int64_t K,
             const uint8_t* codes, const uint8_t* sa, const uint8_t* sb, const float* bias,
             float* y, int64_t ldy) {
  constexpr int64_t BPG = code_bytes<MODE, G>;
  constexpr int NQ = G / 4;
  constexpr int64_t SG = SPAN_QUADS / NQ;  // groups per span
  const int64_t ng = K / G, nd = K / 32;
  alignas(64) __m512i wb[SPAN_QUADS];
  alignas(64) __m512 szb[2 * SG];
  alignas(64) float tot[MAX_A8_ROWS * 16];
  // tiles of near-equal size (16 rows: 8 + 8, not 12 + 4)
  const int64_t nt = (M + A8_ROWS - 1) / A8_ROWS;
  for (int64_t g0 = 0; g0 < ng; g0 += SG) {
    const int64_t g1 = std::min(ng, g0 + SG);
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* c = codes + g * BPG;
      if (g0 == 0)  // later spans were fetched while the one before multiplied
        for (int64_t off = 0; off < BPG; off += 64)
          _mm_prefetch(reinterpret_cast<const char*>(c + PREFETCH + off), _MM_HINT_T0);
#pragma GCC unroll 8
      for (int q = 0; q < NQ; ++q) wb[(g - g0) * NQ + q] = quad<MODE, G>(c, q);
      scales_a8<MODE, G, SC>(g, sa, sb, szb[2 * (g - g0)], szb[2 * (g - g0) + 1]);
    }
    for (int64_t i = 0, r0 = 0; i < nt; ++i) {
      const int64_t r1 = M * (i + 1) / nt;
      // the first tile fetches the next span (past the last: the next block's first)
      span_tile_a8<NQ, G, BPG>(r1 - r0, wb, szb, g0, g1, xq + r0 * K, xd + r0 * nd,
                               xs + r0 * ng, K, tot + 16 * r0, g0 == 0,
                               i == 0 ? codes + g1 * BPG : nullptr);
      r0 = r1;
    }
  }
  for (int64_t r = 0; r < M; ++r) {
    __m512 t = _mm512_load_ps(tot + 16 * r);
    if (bias) t = _mm512_add_ps(t, _mm512_loadu_ps(bias));
    _mm512_storeu_ps(y + r * ldy, t);
  }
}

// x float32 [M, K] -> signed bytes per 32 inputs (xq), their scales d (xd [M, K/32]) and, per
// group of G, d times the sum of the group's bytes (xs [M, K/G]).
void prepare_a8(const float* x, int64_t M, int64_t K, int64_t G, int8_t* xq, float* xd,
                float* xs) {
  const int64_t nd = K / 32, ng = K / G;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nd; ++b) {
      const float* xp = x + m * K + 32 * b;
      const __m512 x0 = _mm512_loadu_ps(xp), x1 = _mm512_loadu_ps(xp + 16);
      const float amax = _mm512_reduce_max_ps(
          _mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
      const float d = amax / 127.0f;
      const __m512 id = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
      // nearest, ties to even (the default rounding mode)
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, id));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, id));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + m * K + 32 * b), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + m * K + 32 * b + 16),
                       _mm512_cvtsepi32_epi8(q1));
      xd[m * nd + b] = d;
      if (G == 32) {
        xs[m * ng + b] = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
      } else {  // G == 16
        xs[m * ng + 2 * b] = d * static_cast<float>(_mm512_reduce_add_epi32(q0));
        xs[m * ng + 2 * b + 1] = d * static_cast<float>(_mm512_reduce_add_epi32(q1));
      }
    }
  }
}

template <int MODE, int G, int SC>
void rows_a8(int64_t R, const int8_t* xq, const float* xd, const float* xs, int64_t K,
             const uint8_t* codes, const uint8_t* sa, const uint8_t* sb, const float* bias,
             float* y, int64_t ldy) {
  if (R > A8_ROWS) return span_a8<MODE, G, SC>(R, xq, xd, xs, K, codes, sa, sb, bias, y, ldy);
  switch (R) {
#define VERIDRAFT_ROWS(n) \
  case n:                 \
    return tile_a8<n, MODE, G, SC>(xq, xd, xs, K, codes, sa, sb, bias, y, ldy);
    VERIDRAFT_ROWS(1) VERIDRAFT_ROWS(2) VERIDRAFT_ROWS(3) VERIDRAFT_ROWS(4)
    VERIDRAFT_ROWS(5) VERIDRAFT_ROWS(6) VERIDRAFT_ROWS(7) VERIDRAFT_ROWS(8)
    VERIDRAFT_ROWS(9) VERIDRAFT_ROWS(10) VERIDRAFT_ROWS(11) VERIDRAFT_ROWS(12)
#undef VERIDRAFT_ROWS
  }
}

using RowsA8Fn = void (*)(int64_t, const int8_t*, const float*, const float*, int64_t,
                          const uint8_t*, const uint8_t*, const uint8_t*, const float*, float*,
                          int64_t);

RowsA8Fn pick_a8(int64_t mode, int64_t group, int64_t scales) {
#define VERIDRAFT_PICK(m, g, sc) \
  if (mode == m && group == g && scales == sc) return rows_a8<m, g, sc>;
  VERIDRAFT_PICK(NIB, 32, F32) VERIDRAFT_PICK(NIB, 32, F16) VERIDRAFT_PICK(NIB, 32, K2)
  VERIDRAFT_PICK(NIB, 16, F32) VERIDRAFT_PICK(NIB, 16, K2)
  VERIDRAFT_PICK(NIB5, 32, F32) VERIDRAFT_PICK(NIB5, 32, F16)
  VERIDRAFT_PICK(NIB6, 16, F32) VERIDRAFT_PICK(NIB6, 16, K2) VERIDRAFT_PICK(NIB6, 32, F32)
  VERIDRAFT_PICK(INT8, 32, F32) VERIDRAFT_PICK(INT8, 32, F16) VERIDRAFT_PICK(INT8, 16, F32)
#undef VERIDRAFT_PICK
  TORCH_CHECK(false, "q4 kernel: no 8-bit-activation variant for layout ", mode, ", group ",
              group, ", scales ", scales);
}

#define VERIDRAFT_HAS_A8 1

#else  // AVX2 + FMA + F16C

// 2 rows per tile: 4 accumulators of 8 lanes per row (one per quarter of a k-pair vector), the
// codes and the broadcast activations fill the 16 registers (4-row tiles spill, and were slower)
constexpr int64_t MAX_ROWS = 2;
constexpr int64_t CALL_ROWS = 16;  // rows per call: above MAX_ROWS, `wide`
using XT = float;  // activations rounded to bfloat16, kept as float32 values
struct Tables {};

template <int SC>
inline void group_scales(int64_t g, int64_t gps, const uint8_t* sa, const uint8_t* sb,
                         __m256 sv[2], __m256 zv[2]) {
  for (int h = 0; h < 2; ++h) {
    if constexpr (SC == F32) {
      sv[h] = _mm256_loadu_ps(reinterpret_cast<const float*>(sa) + g * 16 + 8 * h);
      zv[h] = _mm256_loadu_ps(reinterpret_cast<const float*>(sb) + g * 16 + 8 * h);
    } else if constexpr (SC == F16) {
      const auto* s16 = reinterpret_cast<const __m128i*>(sa + g * 32 + 16 * h);
      const auto* z16 = reinterpret_cast<const __m128i*>(sb + g * 32 + 16 * h);
      sv[h] = _mm256_cvtph_ps(_mm_loadu_si128(s16));
      zv[h] = _mm256_cvtph_ps(_mm_loadu_si128(z16));
    } else {
      const float* dm = reinterpret_cast<const float*>(sa) + (g / gps) * 32;
      const uint8_t* cm = sb + g * 32;
      const __m256 c = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(cm + 8 * h))));
      const __m256 m = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(cm + 16 + 8 * h))));
      sv[h] = _mm256_mul_ps(_mm256_loadu_ps(dm + 8 * h), c);
      zv[h] = _mm256_mul_ps(_mm256_loadu_ps(dm + 16 + 8 * h), m);
    }
  }
}

// Quarter i (elements 8i..8i+7) of k-pair vector j of a group's codes, as float32.
template <int MODE, int G>
inline __m256 quarter(const uint8_t* c, int j, int i) {
  __m256i u;
  if constexpr (MODE == INT8) {
    u = _mm256_cvtepi8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 32 * j + 8 * i)));
  } else {
    u = _mm256_cvtepu8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 32 * (j / 2) + 8 * i)));
    // the byte's low nibble for even j, its high nibble (the byte shifted: no mask) for odd j
    u = j & 1 ? _mm256_srli_epi32(u, 4) : _mm256_and_si256(u, _mm256_set1_epi32(15));
    if constexpr (MODE == NIB5 || MODE == NIB6) {
      // bit e of a mask is bit 4 (5) of element e: select this quarter's 8 bits, one per lane
      constexpr int NM = MODE == NIB5 ? 1 : 2;
      const uint32_t* hb = reinterpret_cast<const uint32_t*>(c + G * 8) + NM * j;
      const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
      for (int b = 0; b < NM; ++b) {
        const __m256i bits = _mm256_set1_epi32(static_cast<int>((hb[b] >> (8 * i)) & 255));
        const __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(bits, lane), lane);
        u = _mm256_add_epi32(u, _mm256_and_si256(on, _mm256_set1_epi32(16 << b)));
      }
    }
  }
  return _mm256_cvtepi32_ps(u);
}

// The rows' FMAs over one group: w from the codes (BUF false) or from the group's widened codes
// in buf. acc lane 2o + p of quarter i: output 4i + o at the k of parity p.
template <int R, bool BUF, int MODE, int G>
inline void group_rows(const uint8_t* c, const __m256* buf, const float* x0, int64_t K,
                       __m256 (*acc)[4]) {
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_setzero_ps();
  // unrolled in full: the accumulators stay in registers only with constant indices, and
  // constant j drops the branch on its parity
#pragma GCC unroll 16
  for (int j = 0; j < G / 2; ++j) {
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m256 w = BUF ? buf[4 * j + i] : quarter<MODE, G>(c, j, i);
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r) {
        // x[k], x[k+1] of this k-pair in every lane pair
        const __m256 xp = _mm256_castpd_ps(
            _mm256_broadcast_sd(reinterpret_cast<const double*>(x0 + r * K + 2 * j)));
        acc[r][i] = _mm256_fmadd_ps(w, xp, acc[r][i]);
      }
    }
  }
}

// A row's group end, the same instructions on every path: the two parities of each output
// added, then tot += sum * s + z * (sum of the group's x).
inline void finish(const __m256* acc, const __m256* sv, const __m256* zv, float xsum,
                   __m256* tot) {
  const __m256 xsv = _mm256_set1_ps(xsum);
  for (int h = 0; h < 2; ++h) {
    // outputs 8h..8h+7: hadd gives [0 1 4 5 | 2 3 6 7], reordered
    const __m256 pairs = _mm256_hadd_ps(acc[2 * h], acc[2 * h + 1]);
    const __m256 sum = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(pairs), 0xD8));
    tot[h] = _mm256_fmadd_ps(sum, sv[h], tot[h]);
    tot[h] = _mm256_fmadd_ps(zv[h], xsv, tot[h]);
  }
}

inline void store(const __m256* tot, const float* bias, float* y) {
  for (int h = 0; h < 2; ++h)
    _mm256_storeu_ps(y + 8 * h,
                     bias ? _mm256_add_ps(tot[h], _mm256_loadu_ps(bias + 8 * h)) : tot[h]);
}

inline void prefetch_group(const uint8_t* c, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(c + PREFETCH + off), _MM_HINT_T0);
}

// Up to MAX_ROWS rows, the codes widened in registers as they are used.
template <int R, int MODE, int G, int SC>
void tile(const Tables&, const XT* xf, const float* xs, int64_t K, const uint8_t* codes,
          const uint8_t* sa, const uint8_t* sb, const float* bias, float* y, int64_t ldy) {
  constexpr int64_t BPG = code_bytes<MODE, G>;
  const int64_t ng = K / G;
  __m256 tot[R][2];
  for (int r = 0; r < R; ++r) tot[r][0] = tot[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const uint8_t* c = codes + g * BPG;
    prefetch_group(c, BPG);
    __m256 acc[R][4];
    group_rows<R, false, MODE, G>(c, nullptr, xf + g * G, K, acc);
    __m256 sv[2], zv[2];
    group_scales<SC>(g, 256 / G, sa, sb, sv, zv);
    for (int r = 0; r < R; ++r) finish(acc[r], sv, zv, xs[r * ng + g], tot[r]);
  }
  for (int r = 0; r < R; ++r) store(tot[r], bias, y + r * ldy);
}

// More rows (up to CALL_ROWS): each group's codes widened once into buf (2 KB, stays in L1) and
// read back by every pair of rows, instead of widened again per pair. Each row's sums run in the
// same order as in tile, so its result does not depend on the path.
template <int MODE, int G, int SC>
void wide(int64_t R, const XT* xf, const float* xs, int64_t K, const uint8_t* codes,
          const uint8_t* sa, const uint8_t* sb, const float* bias, float* y, int64_t ldy) {
  constexpr int64_t BPG = code_bytes<MODE, G>;
  const int64_t ng = K / G;
  alignas(32) __m256 buf[2 * G];
  __m256 tot[CALL_ROWS][2];
  for (int64_t r = 0; r < R; ++r) tot[r][0] = tot[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const uint8_t* c = codes + g * BPG;
    prefetch_group(c, BPG);
#pragma GCC unroll 16
    for (int j = 0; j < G / 2; ++j)
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) buf[4 * j + i] = quarter<MODE, G>(c, j, i);
    __m256 sv[2], zv[2];
    group_scales<SC>(g, 256 / G, sa, sb, sv, zv);
    const float* x0 = xf + g * G;
    int64_t r = 0;
    for (; r + 2 <= R; r += 2) {
      __m256 acc[2][4];
      group_rows<2, true, MODE, G>(nullptr, buf, x0 + r * K, K, acc);
      for (int q = 0; q < 2; ++q) finish(acc[q], sv, zv, xs[(r + q) * ng + g], tot[r + q]);
    }
    if (r < R) {
      __m256 acc[1][4];
      group_rows<1, true, MODE, G>(nullptr, buf, x0 + r * K, K, acc);
      finish(acc[0], sv, zv, xs[r * ng + g], tot[r]);
    }
  }
  for (int64_t r = 0; r < R; ++r) store(tot[r], bias, y + r * ldy);
}

// x float32 [M, K] -> float32 values rounded to bfloat16 (nearest even, as the AVX512 build)
// and the float32 sum of each group's rounded values, in a fixed order.
void prepare(const float* x, int64_t M, int64_t K, int64_t G, float* xf, float* xs) {
  const int64_t ng = K / G;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < ng; ++g) {
      float sum = 0.f;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) {
        uint32_t b;
        std::memcpy(&b, x + m * K + k, 4);
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000u;
        float v;
        std::memcpy(&v, &b, 4);
        xf[m * K + k] = v;
        sum += v;
      }
      xs[m * ng + g] = sum;
    }
  }
}

#endif

template <int MODE, int G, int SC>
void rows(int64_t R, const Tables& tb, const XT* xb, const float* xs, int64_t K,
          const uint8_t* codes, const uint8_t* sa, const uint8_t* sb, const float* bias, float* y,
          int64_t ldy) {
#if !defined(__AVX512BF16__)
  if (R > MAX_ROWS) return wide<MODE, G, SC>(R, xb, xs, K, codes, sa, sb, bias, y, ldy);
#endif
  switch (R) {
#define VERIDRAFT_ROWS(n)                                                    \
  case n:                                                                    \
    if constexpr (n <= MAX_ROWS)                                             \
      return tile<n, MODE, G, SC>(tb, xb, xs, K, codes, sa, sb, bias, y, ldy); \
    break;
    VERIDRAFT_ROWS(1) VERIDRAFT_ROWS(2) VERIDRAFT_ROWS(3) VERIDRAFT_ROWS(4)
    VERIDRAFT_ROWS(5) VERIDRAFT_ROWS(6) VERIDRAFT_ROWS(7) VERIDRAFT_ROWS(8)

#undef VERIDRAFT_ROWS
  }
}

using RowsFn = void (*)(int64_t, const Tables&, const XT*, const float*, int64_t,
                        const uint8_t*, const uint8_t*, const uint8_t*, const float*, float*,
                        int64_t);

// The variants the GGUF block types need (models/q4.py picks one per fused part).
RowsFn pick(int64_t mode, int64_t group, int64_t scales) {
#define VERIDRAFT_PICK(m, g, sc) \
  if (mode == m && group == g && scales == sc) return rows<m, g, sc>;
  VERIDRAFT_PICK(NIB, 32, F32) VERIDRAFT_PICK(NIB, 32, F16) VERIDRAFT_PICK(NIB, 32, K2)
  VERIDRAFT_PICK(NIB, 16, F32) VERIDRAFT_PICK(NIB, 16, K2)
  VERIDRAFT_PICK(NIB5, 32, F32) VERIDRAFT_PICK(NIB5, 32, F16)
  VERIDRAFT_PICK(NIB6, 16, F32) VERIDRAFT_PICK(NIB6, 16, K2) VERIDRAFT_PICK(NIB6, 32, F32)
  VERIDRAFT_PICK(INT8, 32, F32) VERIDRAFT_PICK(INT8, 32, F16) VERIDRAFT_PICK(INT8, 16, F32)
#undef VERIDRAFT_PICK
  TORCH_CHECK(false, "q4 kernel: no variant for layout ", mode, ", group ", group, ", scales ",
              scales);
}

void q4_linear(const at::Tensor& x, at::Tensor& y, int64_t col, const at::Tensor& codes,
               const at::Tensor& sa, const at::Tensor& sb, const c10::optional<at::Tensor>& bias,
               int64_t mode, int64_t group, int64_t scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "q4 kernel: x must be contiguous float32 [M, K]");
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == at::kFloat && y.stride(1) == 1,
              "q4 kernel: y must be float32 [M, *] with unit column stride");
  const int64_t M = x.size(0), K = x.size(1), nb = codes.size(0), N = nb * 16;
  TORCH_CHECK(K % 32 == 0 && K % group == 0 && codes.size(1) * group == K,
              "q4 kernel: K does not match the codes");
  TORCH_CHECK(scales != K2 || K % 256 == 0, "q4 kernel: two-level scales need K % 256 == 0");
  TORCH_CHECK(codes.is_contiguous() && sa.is_contiguous() && sb.is_contiguous() &&
                  sa.size(0) == nb && sb.size(0) == nb,
              "q4 kernel: codes and scales must be contiguous, one block per 16 outputs");
  TORCH_CHECK(y.size(0) == M && col + N <= y.size(1), "q4 kernel: y is too small");
  if (M == 0) return;
  const bool a8 = mode & A8;
  mode &= ~A8;
  if (a8) {
#if defined(VERIDRAFT_HAS_A8)
    const RowsA8Fn fa = pick_a8(mode, group, scales);
    const int64_t ng = K / group, bpb = codes.size(1) * codes.size(2);
    std::vector<int8_t> xq(M * K);
    std::vector<float> xd(M * (K / 32)), xs(M * ng);
    prepare_a8(x.data_ptr<float>(), M, K, group, xq.data(), xd.data(), xs.data());
    const uint8_t* cp = codes.data_ptr<uint8_t>();
    const auto* sap = static_cast<const uint8_t*>(sa.data_ptr());
    const auto* sbp = static_cast<const uint8_t*>(sb.data_ptr());
    const int64_t sas = sa.nbytes() / nb, sbs = sb.nbytes() / nb;
    const float* bp = bias && bias->defined() ? bias->data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>() + col;
    const int64_t ldy = y.stride(0), nd = K / 32;
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t r0 = 0; r0 < M; r0 += MAX_A8_ROWS)
          fa(std::min<int64_t>(MAX_A8_ROWS, M - r0), xq.data() + r0 * K, xd.data() + r0 * nd,
             xs.data() + r0 * ng, K, cp + b * bpb, sap + b * sas, sbp + b * sbs,
             bp ? bp + b * 16 : nullptr, yp + r0 * ldy + b * 16, ldy);
    });
    return;
#else
    TORCH_CHECK(false, "q4 kernel: 8-bit activations need the AVX512 build");
#endif
  }
  static const Tables tb;
  const RowsFn fn = pick(mode, group, scales);
  const int64_t ng = K / group, bpb = codes.size(1) * codes.size(2);
  std::vector<XT> xb(M * K);
  std::vector<float> xs(M * ng);
  prepare(x.data_ptr<float>(), M, K, group, xb.data(), xs.data());
  const XT* xp = xb.data();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const auto* sap = static_cast<const uint8_t*>(sa.data_ptr());
  const auto* sbp = static_cast<const uint8_t*>(sb.data_ptr());
  const int64_t sas = sa.nbytes() / nb, sbs = sb.nbytes() / nb;  // bytes per block of outputs
  const float* bp = bias && bias->defined() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>() + col;
  const int64_t ldy = y.stride(0);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t r0 = 0; r0 < M; r0 += CALL_ROWS) {
        fn(std::min(CALL_ROWS, M - r0), tb, xp + r0 * K, xs.data() + r0 * ng, K,
           cp + b * bpb, sap + b * sas, sbp + b * sbs, bp ? bp + b * 16 : nullptr,
           yp + r0 * ldy + b * 16, ldy);
      }
    }
  });
}

}  // namespace

#ifndef VERIDRAFT_NO_MODULE  // fused.cpp compiles this file into its own library
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // without the GIL, as torch's own operators run: other Python threads go on meanwhile
  m.def("q4_linear", &q4_linear, "y[:, col:col+N] = x @ W.T (+ bias) from packed codes",
        py::call_guard<py::gil_scoped_release>());
}
#endif
