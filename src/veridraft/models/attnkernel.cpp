// Attention of a few query rows over a long KV cache: veridraft's decode and verification path.
//
// A decode step reads every cached key and value once: at long contexts those bytes, not the
// weights, are the step. This kernel reads each cached row once per KV head for all the query
// heads of its GQA group, in float32 or bfloat16 (half the bytes), split into blocks of BLOCK
// keys that run in parallel and are merged by their log-sum-exp in a fixed order.
//
// Row-invariance, by construction: a query row's output depends only on its own query, the
// sequence of keys it reads and their values. Its keys are split into blocks at fixed offsets
// of that sequence (0, BLOCK, 2 BLOCK, ...), each block is reduced with the same arithmetic
// whoever else shares the call, and the blocks are merged in order. So row i of a verification
// forward over T rows is bitwise the row of a one-token forward at its position, whatever T,
// the thread count or the other rows; a token-tree node whose keys are its prefix and then its
// ancestors reads the same sequence as the chain of its path.
//
// A row's key sequence: the contiguous cached positions [lo, hi), then ext[h, t, :] (explicit
// positions, per KV head h; entries < 0 are skipped: they mask a key and only pad the end of a
// tree row or drop a viewed key out of a sliding window).
//
// Arithmetic. A float32 cache is reduced with float32 FMAs. A bfloat16 cache (the bf16, q4 and
// q4a8 modes) is reduced with vdpbf16ps, 32 exact bfloat16 products per instruction summed in
// float32, twice an FMA's work: the query is rounded to bfloat16 for q . k (the keys already
// are), and each weight e^(s - max) to bfloat16 for the sum of values (the values already are;
// the weights' sum is taken of the rounded weights, so they still add up to one). Past one or
// two rows a verification forward at a long context is bound by this arithmetic, not by the
// cache's bytes, so the rounding halves its cost; the error it adds is that of the bfloat16
// cache itself (docs/precision.md).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t BLOCK = 128;  // keys per block: ~30 blocks per KV head at 4k, enough to split

// Lanes of 16-wide chunk c that hold one of the hd head dims (the last chunk may be partial).
inline __mmask16 tail(int64_t hd, int c) {
    const int64_t n = hd - 16 * c;
    return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

inline __m512 widen_bf16(const void* p, __mmask16 m) {
    __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// e^x for x <= 0: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor polynomial to r^7 (relative
// error ~5e-9 before float32 rounding), then 2^n by vscalefps. Inputs below -87 are clamped
// (e^-87 ~ 1e-38, nothing a softmax sum notices); masked keys are zeroed by the caller.
inline __m512 exp_neg(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

struct Rows {
    const float* q;  // [n_h, T, hd] through its strides
    int64_t q_head, q_row;
    const void* k;
    const void* v;  // [n_kv, max_len, hd] contiguous
    bool bf16;
    int64_t max_len, n_kv, group, T, hd;  // hd <= HD (the padded head dim of the template)
    const int64_t* lo;
    const int64_t* hi;
    const int64_t* ext;  // [n_kv?, T?, E] through strides (0 for a broadcast dimension)
    int64_t ext_h, ext_t, n_ext;
    float scale, softcap;
};

// 16 scores to dst: scaled, soft-capped (Gemma's tanh cap; the same arithmetic in both cache
// types' paths), -inf where the key is not live (masked, or past the row's keys).
inline void store_scores(float* dst, __m512 x, __mmask16 live, const Rows& R) {
    x = _mm512_mul_ps(x, _mm512_set1_ps(R.scale));
    if (R.softcap > 0) {
        alignas(64) float tmp[16];
        _mm512_store_ps(tmp, x);
        for (int e = 0; e < 16; ++e) tmp[e] = std::tanh(tmp[e] / R.softcap) * R.softcap;
        x = _mm512_load_ps(tmp);
    }
    const __m512 neg = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    _mm512_store_ps(dst, _mm512_mask_blend_ps(live, neg, x));
}

// Lane i of the result = the sum of d[i]'s lanes (a fixed tree: the same for every call).
inline __m512 hsum16(const __m512 d[16]) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; ++i)  // per 128-bit lane: d[2i] and d[2i+1], pairs of elements added
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(d[2 * i], d[2 * i + 1]),
                             _mm512_unpackhi_ps(d[2 * i], d[2 * i + 1]));
    for (int i = 0; i < 4; ++i)  // per 128-bit lane: keys 4i .. 4i+3, one partial sum each
        b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; ++i)  // the four 128-bit lanes' partials added, two at a time
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88),
                         _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

template <int HD>
struct Scratch {
    alignas(64) float kb[BLOCK * HD];   // keys, row-major
    alignas(64) float vb[BLOCK * HD];   // values, row-major
    alignas(64) float s[4 * BLOCK];     // one pass's scores, then weights
    bool live[BLOCK];
    // which contiguous run the buffers hold (lo = -1: none, or gathered), of which block
    int64_t lo = -1, n = 0, b = -1;
};

// Position of key s of row t's sequence (< 0: masked).
inline int64_t key_pos(const Rows& R, int64_t t, int64_t h, int64_t s) {
    const int64_t contiguous = R.hi[t] - R.lo[t];
    return s < contiguous ? R.lo[t] + s : R.ext[h * R.ext_h + t * R.ext_t + (s - contiguous)];
}

// Widen keys [j0, j0 + nk) of row t's sequence (KV head h) into the scratch as float32 rows.
// Masked keys and the padding to 16 are zero rows.
template <int HD>
void fill(const Rows& R, int64_t t, int64_t h, int64_t j0, int64_t nk, Scratch<HD>& S) {
    constexpr int C = HD / 16;
    const size_t esize = R.bf16 ? 2 : 4;
    const int64_t hd = R.hd;
    const char* kbase = static_cast<const char*>(R.k) + h * R.max_len * hd * esize;
    const char* vbase = static_cast<const char*>(R.v) + h * R.max_len * hd * esize;
    const int64_t contiguous = R.hi[t] - R.lo[t];
    const int64_t nk16 = (nk + 15) / 16 * 16;
    for (int64_t j = 0; j < nk16; ++j) {
        const int64_t sq = j0 + j;
        int64_t pos = -1;
        if (j < nk) pos = sq < contiguous ? R.lo[t] + sq : R.ext[h * R.ext_h + t * R.ext_t + (sq - contiguous)];
        S.live[j] = pos >= 0;
        float* krow = S.kb + j * HD;
        float* vrow = S.vb + j * HD;
        if (pos < 0) {
            for (int c = 0; c < C; ++c) {
                _mm512_store_ps(krow + c * 16, _mm512_setzero_ps());
                _mm512_store_ps(vrow + c * 16, _mm512_setzero_ps());
            }
        } else if (R.bf16) {
            const char* kp = kbase + pos * hd * 2;
            const char* vp = vbase + pos * hd * 2;
            // the next block's rows (contiguous runs): in cache by the time this one is reduced
            if (pos + BLOCK < R.max_len)
                for (int64_t c = 0; c < hd * 2; c += 64) {
                    _mm_prefetch(kp + BLOCK * hd * 2 + c, _MM_HINT_T1);
                    _mm_prefetch(vp + BLOCK * hd * 2 + c, _MM_HINT_T1);
                }
            for (int c = 0; c < C; ++c) {
                _mm512_store_ps(krow + c * 16, widen_bf16(kp + c * 32, tail(hd, c)));
                _mm512_store_ps(vrow + c * 16, widen_bf16(vp + c * 32, tail(hd, c)));
            }
        } else {
            const float* kp = reinterpret_cast<const float*>(kbase) + pos * hd;
            const float* vp = reinterpret_cast<const float*>(vbase) + pos * hd;
            if (pos + BLOCK < R.max_len)
                for (int64_t c = 0; c < hd; c += 16) {
                    _mm_prefetch(reinterpret_cast<const char*>(kp + BLOCK * hd + c), _MM_HINT_T1);
                    _mm_prefetch(reinterpret_cast<const char*>(vp + BLOCK * hd + c), _MM_HINT_T1);
                }
            for (int c = 0; c < C; ++c) {
                _mm512_store_ps(krow + c * 16, _mm512_maskz_loadu_ps(tail(hd, c), kp + c * 16));
                _mm512_store_ps(vrow + c * 16, _mm512_maskz_loadu_ps(tail(hd, c), vp + c * 16));
            }
        }
    }
}

// Query heads a0 .. a0 + NA of KV head h's group, row t, over the nk keys in the scratch: each
// head's block maximum, sum of weights and weighted sum of values. NA is a template parameter so
// that the accumulators live in registers.
template <int HD, int NA>
void heads(const Rows& R, int64_t t, int64_t h, int64_t a0, int64_t nk, Scratch<HD>& S,
           float* m_out, float* l_out, float* acc_out, int64_t part_stride, int64_t acc_stride) {
    constexpr int C = HD / 16;
    const int64_t nk16 = (nk + 15) / 16 * 16;
    const float NEG = -std::numeric_limits<float>::infinity();
    const float* qp[NA];
    for (int a = 0; a < NA; ++a) qp[a] = R.q + (h * R.group + a0 + a) * R.q_head + t * R.q_row;
    // scores: s[a][j] = q[a] . k[j], as 16 lanes of products summed over the head dim in
    // order, then the lanes summed by hsum16's fixed tree; 16 keys per vector
    for (int a = 0; a < NA; ++a) {
        __m512 qv[C];
        for (int c = 0; c < C; ++c) qv[c] = _mm512_maskz_loadu_ps(tail(R.hd, c), qp[a] + c * 16);
        for (int64_t j = 0; j < nk16; j += 16) {
            __m512 d[16];
            for (int i = 0; i < 16; ++i) {
                const float* kr = S.kb + (j + i) * HD;
                d[i] = _mm512_mul_ps(qv[0], _mm512_load_ps(kr));
                for (int c = 1; c < C; ++c) d[i] = _mm512_fmadd_ps(qv[c], _mm512_load_ps(kr + c * 16), d[i]);
            }
            __mmask16 live = 0;
            for (int e = 0; e < 16; ++e)  // keys past nk belong to a longer row's fill
                if (j + e < nk && S.live[j + e]) live |= static_cast<__mmask16>(1u << e);
            store_scores(S.s + a * BLOCK + j, hsum16(d), live, R);
        }
    }
    // weights e^(s - max), exactly zero where masked
    for (int a = 0; a < NA; ++a) {
        float* s = S.s + a * BLOCK;
        __m512 vm = _mm512_set1_ps(NEG);
        for (int64_t j = 0; j < nk16; j += 16) vm = _mm512_max_ps(vm, _mm512_load_ps(s + j));
        const float mx = _mm512_reduce_max_ps(vm);
        __m512 lsum = _mm512_setzero_ps();
        if (mx != NEG) {
            const __m512 vmx = _mm512_set1_ps(mx);
            for (int64_t j = 0; j < nk16; j += 16) {
                const __m512 x = _mm512_load_ps(s + j);
                const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(NEG), _CMP_NEQ_OQ);
                const __m512 p = _mm512_maskz_mov_ps(keep, exp_neg(_mm512_sub_ps(x, vmx)));
                _mm512_store_ps(s + j, p);
                lsum = _mm512_add_ps(lsum, p);
            }
        }
        m_out[(a0 + a) * part_stride] = mx;
        l_out[(a0 + a) * part_stride] = _mm512_reduce_add_ps(lsum);
    }
    // values: acc[a] = sum over j of p[a][j] v[j], j in order (masked keys have p = 0, v = 0)
    __m512 acc[NA][C];
    for (int a = 0; a < NA; ++a)
        for (int c = 0; c < C; ++c) acc[a][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < nk; ++j) {
        for (int c = 0; c < C; ++c) {
            const __m512 vv = _mm512_load_ps(S.vb + j * HD + c * 16);
            for (int a = 0; a < NA; ++a)
                acc[a][c] = _mm512_fmadd_ps(_mm512_set1_ps(S.s[a * BLOCK + j]), vv, acc[a][c]);
        }
    }
    for (int a = 0; a < NA; ++a) {
        float* dst = acc_out + (a0 + a) * acc_stride;
        for (int c = 0; c < C; ++c) _mm512_storeu_ps(dst + c * 16, acc[a][c]);
    }
}


// ---- bfloat16 caches: vdpbf16ps ----
//
// Keys are transposed into groups of 16: dword i of key e's row (its dims 2i and 2i + 1) sits in
// lane e of vector i, so q . k for 16 keys is hd / 2 vdpbf16ps with the query's pair i broadcast,
// and the scores come out one key per lane with no horizontal sum. Values sit in pairs of keys
// (element 2d of a pair's vector is key j's dim d, 2d + 1 key j + 1's): p_j v_j + p_j+1 v_j+1
// is one vdpbf16ps per 16 dims with the pair of weights broadcast. Both layouts are built once
// per block and read by every query head of the group and every row that shares the block.
//
// Those rows (the rows of a chain or of a prompt slice, in all but their last block) go through
// the block together: a pass takes up to QMAX (row, query head) queries, and each key or value
// vector it loads serves four queries before the next load. A block's two layouts are 64 KB at
// head dim 128, twice L1, so a pass takes the keys 64 at a time and the values 64 dims at a
// time, which stay in L1 for all its queries. A query's products, chains and summation order
// are its own whatever shares its pass, so every row is still bitwise what a one-row call
// computes.

// Queries (row, query head) per pass over a block: their scores and weights stay in L1.
constexpr int QMAX = 16;

// Scratch row stride of the keys: a whole number of 32-element (64-byte) bfloat16 vectors.
template <int HD>
constexpr int KS = HD < 32 ? 32 : HD;

template <int HD>
struct ScratchH {
    alignas(64) uint32_t kt[BLOCK * KS<HD> / 2];  // [BLOCK / 16][KS / 2][16] key dword pairs
    alignas(64) uint16_t vp[BLOCK * HD];          // [BLOCK / 2][HD][2]
    alignas(64) float s[QMAX * BLOCK];            // one pass's scores, then weights
    alignas(64) uint16_t sp[QMAX * BLOCK];        // the weights rounded to bfloat16
    alignas(64) uint32_t qw[QMAX * KS<HD> / 2];   // the pass's queries as bfloat16 pairs
    __mmask16 live16[BLOCK / 16];                 // per 16 keys: which hold a key
    int64_t lo = -1, n = 0, b = -1;
};

inline __mmask32 tail32(int64_t hd, int c) {
    const int64_t n = hd - 32 * c;
    return n >= 32 ? __mmask32(0xFFFFFFFFu) : n <= 0 ? __mmask32(0) : __mmask32((1u << n) - 1);
}

// r[i] lane e <- r[e] lane i: a 16 x 16 transpose of 32-bit elements.
inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    // now r[4a + b] holds, in 128-bit lane L, element 4L + b... of rows 4a .. 4a + 3 of each
    // 128-bit lane's rows: regroup the 128-bit lanes across the four quarters
    for (int i = 0; i < 4; ++i) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
    }
    for (int i = 0; i < 4; ++i) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
    }
}

// As fill(), for a bfloat16 cache, into the layouts above. Masked keys and the padding to 16
// are zero rows.
template <int HD>
void fill_h(const Rows& R, int64_t t, int64_t h, int64_t j0, int64_t nk, ScratchH<HD>& S) {
    constexpr int CK = KS<HD> / 32, CV = HD / 16;
    const int64_t hd = R.hd;
    const uint16_t* kbase = static_cast<const uint16_t*>(R.k) + h * R.max_len * hd;
    const uint16_t* vbase = static_cast<const uint16_t*>(R.v) + h * R.max_len * hd;
    const int64_t contiguous = R.hi[t] - R.lo[t];
    const int64_t nk16 = (nk + 15) / 16 * 16;
    for (int64_t j = 0; j < nk16; j += 16) {
        const uint16_t* kr[16];
        const uint16_t* vr[16];
        for (int e = 0; e < 16; ++e) {
            const int64_t sq = j0 + j + e;
            int64_t pos = -1;
            if (j + e < nk)
                pos = sq < contiguous ? R.lo[t] + sq
                                      : R.ext[h * R.ext_h + t * R.ext_t + (sq - contiguous)];
            kr[e] = pos < 0 ? nullptr : kbase + pos * hd;
            vr[e] = pos < 0 ? nullptr : vbase + pos * hd;
            // the next block's rows (contiguous runs): in cache by the time this one is reduced
            if (pos >= 0 && pos + BLOCK < R.max_len)
                for (int64_t c = 0; c < hd * 2; c += 64) {
                    _mm_prefetch(reinterpret_cast<const char*>(kr[e] + BLOCK * hd) + c, _MM_HINT_T1);
                    _mm_prefetch(reinterpret_cast<const char*>(vr[e] + BLOCK * hd) + c, _MM_HINT_T1);
                }
        }
        __mmask16 live = 0;
        for (int e = 0; e < 16; ++e)
            if (kr[e]) live |= static_cast<__mmask16>(1u << e);
        S.live16[j / 16] = live;
        uint32_t* kt = S.kt + j * (KS<HD> / 2);  // group j / 16: KS / 2 vectors of 16 lanes
        for (int c = 0; c < CK; ++c) {
            __m512i r[16];
            for (int e = 0; e < 16; ++e)
                r[e] = kr[e] ? _mm512_maskz_loadu_epi16(tail32(hd, c), kr[e] + 32 * c)
                             : _mm512_setzero_si512();
            transpose16(r);
            for (int i = 0; i < 16; ++i) _mm512_store_si512(kt + (16 * c + i) * 16, r[i]);
        }
        for (int e = 0; e < 16; e += 2) {
            uint16_t* dst = S.vp + (j + e) * HD;  // pair (j + e) / 2: HD dims x 2 keys
            for (int c = 0; c < CV; ++c) {
                const __m256i a = vr[e] ? _mm256_maskz_loadu_epi16(tail(hd, c), vr[e] + 16 * c)
                                        : _mm256_setzero_si256();
                const __m256i b = vr[e + 1]
                                      ? _mm256_maskz_loadu_epi16(tail(hd, c), vr[e + 1] + 16 * c)
                                      : _mm256_setzero_si256();
                _mm512_store_si512(dst + 32 * c,
                                   _mm512_or_si512(_mm512_cvtepu16_epi32(a),
                                                   _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
            }
        }
    }
}

// One query of a pass over a block: a (row, query head) pair and where its block partials go.
struct Query {
    const float* q;
    float* m;
    float* l;
    float* acc;
};

// Scores of NQ queries over NG consecutive 16-key groups (qw: each query's dword pairs, NP
// apart): per query and group two chains (even and odd pairs) added at the end, the same
// sequence whatever NQ and NG. Each key vector loaded serves the NQ queries before the next.
template <int HD, int NQ, int NG>
inline void scores_q(const uint32_t* kt, const uint32_t* qw, __m512 out[NQ][NG]) {
    constexpr int NP = KS<HD> / 2;
    __m512 a[NQ][NG][2];
    for (int q = 0; q < NQ; ++q)
        for (int g = 0; g < NG; ++g) a[q][g][0] = a[q][g][1] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int i = 0; i < NP; i += 2) {
        __m512bh q0[NQ], q1[NQ];
        for (int q = 0; q < NQ; ++q) {
            q0[q] = (__m512bh)_mm512_set1_epi32(static_cast<int>(qw[q * NP + i]));
            q1[q] = (__m512bh)_mm512_set1_epi32(static_cast<int>(qw[q * NP + i + 1]));
        }
        for (int g = 0; g < NG; ++g) {
            const uint32_t* k = kt + g * NP * 16;
            const __m512bh k0 = (__m512bh)_mm512_load_si512(k + i * 16);
            const __m512bh k1 = (__m512bh)_mm512_load_si512(k + (i + 1) * 16);
            for (int q = 0; q < NQ; ++q) {
                a[q][g][0] = _mm512_dpbf16_ps(a[q][g][0], k0, q0[q]);
                a[q][g][1] = _mm512_dpbf16_ps(a[q][g][1], k1, q1[q]);
            }
        }
    }
    for (int q = 0; q < NQ; ++q)
        for (int g = 0; g < NG; ++g) out[q][g] = _mm512_add_ps(a[q][g][0], a[q][g][1]);
}

// Weighted sums of values for NQ queries (from qi) and CC 16-dim chunks of the head dim (from
// c0): acc += p[j] v[j] + p[j + 1] v[j + 1], pairs in order (masked keys: p = v = 0). Each value
// vector loaded serves the NQ queries.
template <int HD, int NQ, int CC>
inline void values_q(const ScratchH<HD>& S, const Query* qs, int qi, int c0, int64_t npairs) {
    __m512 acc[NQ][CC];
    for (int q = 0; q < NQ; ++q)
        for (int c = 0; c < CC; ++c) acc[q][c] = _mm512_setzero_ps();
    const int32_t* sp32 = reinterpret_cast<const int32_t*>(S.sp) + qi * (BLOCK / 2);
    for (int64_t jp = 0; jp < npairs; ++jp) {
        __m512i pw[NQ];
        for (int q = 0; q < NQ; ++q) pw[q] = _mm512_set1_epi32(sp32[q * (BLOCK / 2) + jp]);
        for (int c = 0; c < CC; ++c) {
            const __m512bh vv =
                (__m512bh)_mm512_load_si512(S.vp + jp * 2 * HD + 32 * (c0 + c));
            for (int q = 0; q < NQ; ++q)
                acc[q][c] = _mm512_dpbf16_ps(acc[q][c], vv, (__m512bh)pw[q]);
        }
    }
    for (int q = 0; q < NQ; ++q)
        for (int c = 0; c < CC; ++c) _mm512_storeu_ps(qs[qi + q].acc + 16 * (c0 + c), acc[q][c]);
}

// nq <= QMAX queries of KV head h over the nk keys in the scratch, a bfloat16 cache: each
// query's block maximum, sum of weights and weighted sum of values, by the rule of the header.
// Every query's arithmetic is its own (the passes only share the loads of keys and values), so
// a query's partials are the same whichever others share the pass.
template <int HD>
void queries_h(const Rows& R, int nq, const Query* qs, int64_t nk, ScratchH<HD>& S) {
    constexpr int CK = KS<HD> / 32, CV = HD / 16, NP = KS<HD> / 2;
    constexpr int CC = CV < 4 ? CV : 4;  // value chunks per pass: 4 queries x 4 accumulators
    const int64_t nk16 = (nk + 15) / 16 * 16;
    const float NEG = -std::numeric_limits<float>::infinity();
    for (int q = 0; q < nq; ++q) {
        for (int c = 0; c < CK; ++c) {
            const float* qp = qs[q].q;
            const __m512 lo = _mm512_maskz_loadu_ps(tail(R.hd, 2 * c), qp + 32 * c);
            const __m512 hi = _mm512_maskz_loadu_ps(tail(R.hd, 2 * c + 1), qp + 32 * c + 16);
            _mm512_store_si512(S.qw + q * NP + 16 * c, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
    auto finish = [&](int q, int64_t j, __m512 x) {
        // keys past nk belong to a longer row's fill
        const __mmask16 live = S.live16[j / 16] &
                               (j + 16 <= nk ? __mmask16(0xFFFF)
                                             : static_cast<__mmask16>((1u << (nk - j)) - 1));
        store_scores(S.s + q * BLOCK + j, x, live, R);
    };
    // scores, 64 keys at a time (their transposed keys stay in L1 for every query)
    for (int64_t j0 = 0; j0 < nk16; j0 += 64) {
        const int64_t jn = std::min<int64_t>(nk16, j0 + 64);
        for (int q0 = 0; q0 < nq; q0 += 4) {
            const int n = std::min(nq - q0, 4);
            int64_t j = j0;
#define VD_SCORES(NQ, NG)                                                           \
    {                                                                               \
        __m512 x[NQ][NG];                                                           \
        scores_q<HD, NQ, NG>(S.kt + j * NP, S.qw + q0 * NP, x);                     \
        for (int q = 0; q < NQ; ++q)                                                \
            for (int g = 0; g < NG; ++g) finish(q0 + q, j + 16 * g, x[q][g]);       \
    }
#define VD_SCORES_N(NG)                   \
    switch (n) {                          \
        case 1: VD_SCORES(1, NG) break;   \
        case 2: VD_SCORES(2, NG) break;   \
        case 3: VD_SCORES(3, NG) break;   \
        default: VD_SCORES(4, NG) break;  \
    }
            for (; j + 32 <= jn; j += 32) VD_SCORES_N(2)
            for (; j < jn; j += 16) VD_SCORES_N(1)
#undef VD_SCORES_N
#undef VD_SCORES
        }
    }
    // weights e^(s - max), exactly zero where masked, rounded to bfloat16
    for (int q = 0; q < nq; ++q) {
        float* s = S.s + q * BLOCK;
        uint16_t* sp = S.sp + q * BLOCK;
        __m512 vm = _mm512_set1_ps(NEG);
        for (int64_t j = 0; j < nk16; j += 16) vm = _mm512_max_ps(vm, _mm512_load_ps(s + j));
        const float mx = _mm512_reduce_max_ps(vm);
        __m512 lsum = _mm512_setzero_ps();
        if (mx != NEG) {
            const __m512 vmx = _mm512_set1_ps(mx);
            for (int64_t j = 0; j < nk16; j += 16) {
                const __m512 x = _mm512_load_ps(s + j);
                const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(NEG), _CMP_NEQ_OQ);
                const __m512 p = _mm512_maskz_mov_ps(keep, exp_neg(_mm512_sub_ps(x, vmx)));
                const __m256bh pr = _mm512_cvtneps_pbh(p);
                _mm256_store_si256(reinterpret_cast<__m256i*>(sp + j), (__m256i)pr);
                // the sum of the weights as they multiply the values: rounded
                lsum = _mm512_add_ps(lsum, _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32((__m256i)pr), 16)));
            }
        } else {
            for (int64_t j = 0; j < nk16; j += 16)
                _mm256_store_si256(reinterpret_cast<__m256i*>(sp + j), _mm256_setzero_si256());
        }
        *qs[q].m = mx;
        *qs[q].l = _mm512_reduce_add_ps(lsum);
    }
    // values, CC chunks of the head dim at a time (their vectors stay in L1 for every query)
    const int64_t npairs = (nk + 1) / 2;
    for (int c0 = 0; c0 < CV; c0 += CC)
        for (int q0 = 0; q0 < nq; q0 += 4) switch (std::min(nq - q0, 4)) {
                case 1: values_q<HD, 1, CC>(S, qs, q0, c0, npairs); break;
                case 2: values_q<HD, 2, CC>(S, qs, q0, c0, npairs); break;
                case 3: values_q<HD, 3, CC>(S, qs, q0, c0, npairs); break;
                default: values_q<HD, 4, CC>(S, qs, q0, c0, npairs); break;
            }
}

// Rows t0 .. t1 (inclusive), which read the same nk keys of the scratch, over KV head h: every
// query head of its group, QMAX queries a pass. Partials go to bm, bl [T, G] and ba [T, G, HD].
template <int HD>
void rows_h(const Rows& R, int64_t t0, int64_t t1, int64_t h, int64_t nk, ScratchH<HD>& S,
            float* bm, float* bl, float* ba) {
    const int64_t G = R.group;
    Query qs[QMAX];
    int nq = 0;
    for (int64_t t = t0; t <= t1; ++t)
        for (int64_t a = 0; a < G; ++a) {
            const int64_t i = t * G + a;
            qs[nq++] = Query{R.q + (h * G + a) * R.q_head + t * R.q_row, bm + i, bl + i,
                             ba + i * HD};
            if (nq == QMAX) queries_h<HD>(R, nq, qs, nk, S), nq = 0;
        }
    if (nq > 0) queries_h<HD>(R, nq, qs, nk, S);
}

// Row t over its keys in the scratch (a float32 cache), every query head of KV head h's group,
// a few at a time.
template <int HD>
void reduce(const Rows& R, int64_t t, int64_t h, int64_t nk, Scratch<HD>& S, float* m_out,
            float* l_out, float* acc_out, int64_t part_stride, int64_t acc_stride) {
    constexpr int64_t HC = HD <= 64 ? 4 : HD == 128 ? 2 : 1;  // heads per pass: <= 16 accumulators
    for (int64_t a0 = 0; a0 < R.group; a0 += HC) {
        const int64_t na = std::min<int64_t>(R.group - a0, HC);
#define VD_HEADS(N) heads<HD, N>(R, t, h, a0, nk, S, m_out, l_out, acc_out, part_stride, acc_stride)
        if (na == 1) { VD_HEADS(1); }
        if constexpr (HC >= 2) if (na == 2) { VD_HEADS(2); }
        if constexpr (HC >= 4) {
            if (na == 3) { VD_HEADS(3); }
            if (na == 4) { VD_HEADS(4); }
        }
#undef VD_HEADS
    }
}

// Blocks per work unit. A unit reduces its blocks one after the other into one partial per
// (row, head), so the partials of a call are T x n_h x (blocks / SUPER) and the units are few
// enough to keep each thread busy for a while; units still split a 7k context into ~15 per KV
// head.
constexpr int64_t SUPER = 4;

inline float neg_inf() { return -std::numeric_limits<float>::infinity(); }

// Merge a block's partial (bm, bl, ba) into a running one (m, l, a): the flash-attention rule,
// rescaled to the larger maximum. The blocks of a row reach this in the order of its key
// sequence, whatever else the call holds.
template <int HD>
inline void merge_into(float& m, float& l, float* a, float bm, float bl, const float* ba) {
    if (bm == neg_inf()) return;
    if (m == neg_inf()) {
        m = bm, l = bl;
        for (int c = 0; c < HD / 16; ++c) _mm512_storeu_ps(a + 16 * c, _mm512_loadu_ps(ba + 16 * c));
        return;
    }
    const float top = std::max(m, bm);
    const float w0 = std::exp(m - top), w1 = std::exp(bm - top);
    l = l * w0 + bl * w1;
    const __m512 v0 = _mm512_set1_ps(w0), v1 = _mm512_set1_ps(w1);
    for (int c = 0; c < HD / 16; ++c)
        _mm512_storeu_ps(a + 16 * c, _mm512_fmadd_ps(_mm512_loadu_ps(ba + 16 * c), v1,
                                                     _mm512_mul_ps(_mm512_loadu_ps(a + 16 * c), v0)));
    m = top;
}

template <int HD, class S_>
void run(const Rows& R, float* out) {
    const int64_t n_h = R.n_kv * R.group, G = R.group;
    std::vector<int64_t> nb(R.T), ns(R.T);
    int64_t max_ns = 0;
    for (int64_t t = 0; t < R.T; ++t) {
        const int64_t n = R.hi[t] - R.lo[t] + R.n_ext;
        nb[t] = (n + BLOCK - 1) / BLOCK;
        ns[t] = (nb[t] + SUPER - 1) / SUPER;
        max_ns = std::max(max_ns, ns[t]);
    }
    // partials [T, n_h, max_ns] (+ hd for the value sums), in buffers kept by the calling
    // thread: a fresh allocation per call costs page faults at long contexts. Every entry the
    // final merge reads is set by its unit first, so nothing is cleared.
    thread_local std::vector<float> m_buf, l_buf, acc_buf;
    const size_t np = static_cast<size_t>(R.T * n_h * max_ns);
    if (m_buf.size() < np) m_buf.resize(np), l_buf.resize(np);
    if (acc_buf.size() < np * HD) acc_buf.resize(np * HD);
    float* const m = m_buf.data();
    float* const l = l_buf.data();
    float* const acc = acc_buf.data();
    // One work unit per (KV head, SUPER blocks) serves every row that reaches its blocks: rows
    // whose keys there are the same contiguous run (a chain's rows, all but their last block)
    // reuse the scratch's keys, so a verification forward reads the cache once.
    at::parallel_for(0, R.n_kv * max_ns, 1, [&](int64_t u0, int64_t u1) {
        thread_local std::unique_ptr<S_> scratch;
        thread_local std::vector<float> part;  // one block's partials: [T, G] m, l, then acc
        if (!scratch) scratch = std::make_unique<S_>();
        S_& S = *scratch;
        const size_t pn = static_cast<size_t>(R.T * G);
        if (part.size() < pn * (2 + HD)) part.resize(pn * (2 + HD));
        float* const bm = part.data();
        float* const bl = bm + pn;
        float* const ba = bl + pn;
        for (int64_t u = u0; u < u1; ++u) {
            const int64_t h = u / max_ns, sb = u % max_ns;
            for (int64_t t = 0; t < R.T; ++t)
                if (sb < ns[t])
                    for (int64_t a = 0; a < G; ++a) {
                        const int64_t i = (t * n_h + h * G + a) * max_ns + sb;
                        m[i] = neg_inf(), l[i] = 0.0f;
                    }
            S.lo = -1;
            for (int64_t b = sb * SUPER; b < (sb + 1) * SUPER; ++b) {
                const int64_t j0 = b * BLOCK;
                auto keys = [&](int64_t t) {  // row t's keys in block b, and whether all cached
                    const int64_t contiguous = R.hi[t] - R.lo[t];
                    const int64_t nk = std::min(contiguous + R.n_ext, j0 + BLOCK) - j0;
                    return std::make_pair(nk, j0 + nk <= contiguous);
                };
                auto reuses = [&](int64_t t) {
                    const auto [nk, run] = keys(t);
                    return run && S.lo == R.lo[t] && S.n >= 0 && nk <= S.n && S.b == b;
                };
                for (int64_t t = R.T - 1; t >= 0;) {  // the longest rows first
                    if (b >= nb[t]) {
                        --t;
                        continue;
                    }
                    const auto [nk, run] = keys(t);
                    if (!reuses(t)) {
                        if constexpr (std::is_same_v<S_, ScratchH<HD>>)
                            fill_h<HD>(R, t, h, j0, nk, S);
                        else
                            fill<HD>(R, t, h, j0, nk, S);
                        S.lo = run ? R.lo[t] : -1;
                        S.n = nk;
                        S.b = b;
                    }
                    // bfloat16: the next rows that read these same nk keys from the scratch
                    // share the pass (a chain's rows, all but their last block)
                    int64_t t0 = t;
                    if constexpr (std::is_same_v<S_, ScratchH<HD>>) {
                        while (t0 > 0 && b < nb[t0 - 1] && keys(t0 - 1).first == nk &&
                               reuses(t0 - 1))
                            --t0;
                        rows_h<HD>(R, t0, t, h, nk, S, bm, bl, ba);
                    } else {
                        reduce<HD>(R, t, h, nk, S, bm + t * G, bl + t * G, ba + t * G * HD, 1, HD);
                    }
                    for (int64_t u = t; u >= t0; --u)
                        for (int64_t a = 0; a < G; ++a) {
                            const int64_t i = (u * n_h + h * G + a) * max_ns + sb;
                            merge_into<HD>(m[i], l[i], acc + i * HD, bm[u * G + a], bl[u * G + a],
                                           ba + (u * G + a) * HD);
                        }
                    t = t0 - 1;
                }
            }
        }
    });
    // Merge each (row, head)'s units in order.
    at::parallel_for(0, R.T * n_h, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t t = r / n_h, head = r % n_h;
            const int64_t base = (t * n_h + head) * max_ns;
            float top = neg_inf();
            for (int64_t b = 0; b < ns[t]; ++b) top = std::max(top, m[base + b]);
            float total = 0.0f;
            __m512 o[HD / 16];
            for (int c = 0; c < HD / 16; ++c) o[c] = _mm512_setzero_ps();
            for (int64_t b = 0; b < ns[t]; ++b) {
                if (m[base + b] == neg_inf()) continue;
                const float w = std::exp(m[base + b] - top);
                total += l[base + b] * w;
                const __m512 vw = _mm512_set1_ps(w);
                for (int c = 0; c < HD / 16; ++c)
                    o[c] = _mm512_fmadd_ps(vw, _mm512_loadu_ps(&acc[(base + b) * HD + c * 16]),
                                           o[c]);
            }
            const __m512 inv = _mm512_set1_ps(total > 0 ? 1.0f / total : 0.0f);
            float* dst = out + (t * n_h + head) * R.hd;
            for (int c = 0; c < HD / 16; ++c)
                _mm512_mask_storeu_ps(dst + c * 16, tail(R.hd, c), _mm512_mul_ps(o[c], inv));
        }
    });
}

// The checked description of a call: q float32 [n_h, T, hd] through its strides (last dim
// contiguous), the rest as rows() takes them.
Rows prepare(const float* q, int64_t n_h, int64_t T, int64_t hd, int64_t q_head, int64_t q_row,
             const at::Tensor& k, const at::Tensor& v, const at::Tensor& lo, const at::Tensor& hi,
             const c10::optional<at::Tensor>& ext, double scale, double softcap) {
    TORCH_CHECK(k.dim() == 4 && k.size(0) == 1 && k.is_contiguous() && v.is_contiguous() &&
                    k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type(),
                "attnkernel.rows: k and v must be contiguous [1, n_kv, max_len, hd] of one dtype");
    TORCH_CHECK(k.scalar_type() == at::kBFloat16 || k.scalar_type() == at::kFloat,
                "attnkernel.rows: the cache must be bfloat16 or float32");
    const int64_t n_kv = k.size(1);
    TORCH_CHECK(k.size(3) == hd && n_h % n_kv == 0, "attnkernel.rows: q and cache shapes differ");
    TORCH_CHECK(hd <= 256, "attnkernel.rows: head_dim ", hd, " above 256");
    TORCH_CHECK(lo.scalar_type() == at::kLong && hi.scalar_type() == at::kLong &&
                    lo.is_contiguous() && hi.is_contiguous() && lo.numel() == T && hi.numel() == T,
                "attnkernel.rows: lo and hi must be contiguous int64 [T]");
    Rows R{q, q_head, q_row, k.data_ptr(), v.data_ptr(),
           k.scalar_type() == at::kBFloat16, k.size(2), n_kv, n_h / n_kv, T, hd,
           lo.data_ptr<int64_t>(), hi.data_ptr<int64_t>(), nullptr, 0, 0, 0,
           static_cast<float>(scale), static_cast<float>(softcap)};
    for (int64_t t = 0; t < T; ++t)
        TORCH_CHECK(0 <= R.lo[t] && R.lo[t] <= R.hi[t] && R.hi[t] <= R.max_len,
                    "attnkernel.rows: key range out of the cache");
    if (ext.has_value() && ext->numel() > 0) {
        const at::Tensor& e = *ext;
        TORCH_CHECK(e.dim() == 3 && e.scalar_type() == at::kLong && e.stride(2) == 1 &&
                        (e.size(0) == 1 || e.size(0) == n_kv) && (e.size(1) == 1 || e.size(1) == T),
                    "attnkernel.rows: ext must be int64 [1 or n_kv, 1 or T, E]");
        R.ext = e.data_ptr<int64_t>();
        R.ext_h = e.size(0) == 1 ? 0 : e.stride(0);
        R.ext_t = e.size(1) == 1 ? 0 : e.stride(1);
        R.n_ext = e.size(2);
        for (int64_t h = 0; h < e.size(0); ++h)
            for (int64_t t = 0; t < e.size(1); ++t)
                for (int64_t j = 0; j < R.n_ext; ++j)
                    TORCH_CHECK(R.ext[h * e.stride(0) + t * e.stride(1) + j] < R.max_len,
                                "attnkernel.rows: ext beyond the cache");
    }
    return R;
}

// out: float32 [T, n_h * hd]
template <int HD>
void run_hd(const Rows& R, float* out) {
    if (R.bf16)
        run<HD, ScratchH<HD>>(R, out);
    else
        run<HD, Scratch<HD>>(R, out);
}

void run_into(const Rows& R, float* out) {
    if (R.hd <= 16) run_hd<16>(R, out);
    else if (R.hd <= 32) run_hd<32>(R, out);
    else if (R.hd <= 64) run_hd<64>(R, out);
    else if (R.hd <= 128) run_hd<128>(R, out);
    else run_hd<256>(R, out);
}

at::Tensor rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& lo, const at::Tensor& hi, const c10::optional<at::Tensor>& ext,
                double scale, double softcap) {
    TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.stride(2) == 1,
                "attnkernel.rows: q must be float32 [n_h, T, hd] with a contiguous last dim");
    const int64_t n_h = q.size(0), T = q.size(1), hd = q.size(2);
    const Rows R = prepare(q.data_ptr<float>(), n_h, T, hd, q.stride(0), q.stride(1), k, v, lo,
                           hi, ext, scale, softcap);
    at::Tensor out = at::empty({T, n_h * hd}, q.options());
    run_into(R, out.data_ptr<float>());
    return out;
}

}  // namespace

#ifndef VERIDRAFT_NO_MODULE  // fused.cpp compiles this file into its own library
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("rows", &rows, "attention of query rows over cached keys, row-invariant",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("lo"), py::arg("hi"), py::arg("ext"),
          py::arg("scale"), py::arg("softcap"),
          py::call_guard<py::gil_scoped_release>());  // as torch's own operators: no GIL held
}
#endif
