// A decoder forward in one call: every layer of a q4 / q4a8 model over a few rows (decoding,
// verification, token trees, sparse views), with no Python between the kernels.
//
// Why: a one-token step of a small model is mostly dispatch. smollm2-135m in q4 makes ~3,700
// ATen calls per step, and 42% of the step was outside the weight matmuls on an AMD EPYC; the
// work between the matmuls (norms, RoPE, the gated activation, residual adds, cache writes) is a
// few microseconds of arithmetic behind each call's interpreter and dispatcher overhead. This
// file runs the same layer body in C++: the q4 kernel (q4kernel.cpp) and the decode attention
// kernel (attnkernel.cpp) are compiled into it and called directly, and the elementwise steps are
// plain loops.
//
// Exactness: the elementwise steps here (rmsnorm, rope, glu) are also what q4 mode's Python
// layers call (models/fused.py sets them up), so a row computed by this forward is bitwise the
// row the Python path computes, at any T, and the two can be mixed within one generation (a
// prefill through Python, then steps here; a verification forward that needs attention
// weights, which only the Python path captures, beside plain steps here). The keys and values
// go into a bfloat16 cache rounded to nearest even, as ATen's conversion on the Python path
// rounds every finite value. Every step is per
// row with a fixed order of operations, so a forward over T rows gives each row what a
// one-row forward gives it.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

// The two kernels, compiled into this library (their own pybind modules left out).
#define VERIDRAFT_NO_MODULE 1
namespace vdq4 {
#include "q4kernel.cpp"
}
namespace vdattn {
#include "attnkernel.cpp"
}

namespace {

inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// ---- elementwise steps: each row alone, in a fixed order ----

// y = x / rms(x) * w over each group of G values of a row (G = N: a plain RMSNorm; G = head_dim:
// per-head q/k norms with one weight row per head). x and y may be the same memory.
void rmsnorm_rows(const float* x, int64_t ldx, const float* w, float* y, int64_t ldy, int64_t M,
                  int64_t N, int64_t G, float eps) {
  auto body = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * ldx;
      float* yr = y + r * ldy;
      for (int64_t g0 = 0; g0 < N; g0 += G) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < G; j += 16) {
          const __m512 v = _mm512_maskz_loadu_ps(lanes(G - j), xr + g0 + j);
          acc = _mm512_fmadd_ps(v, v, acc);
        }
        const float ss = _mm512_reduce_add_ps(acc);
        const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(ss / static_cast<float>(G) + eps));
        for (int64_t j = 0; j < G; j += 16) {
          const __mmask16 m = lanes(G - j);
          const __m512 v = _mm512_maskz_loadu_ps(m, xr + g0 + j);
          const __m512 wv = _mm512_maskz_loadu_ps(m, w + g0 + j);
          _mm512_mask_storeu_ps(yr + g0 + j, m, _mm512_mul_ps(_mm512_mul_ps(v, inv), wv));
        }
      }
    }
  };
  if (M * N >= 65536) at::parallel_for(0, M, 16, body);  // prefill-sized: rows in parallel
  else body(0, M);
}

// HF's half-split RoPE in place on H heads of each of T rows: x[i] * cos[i] + x[i -+ hd/2] *
// sin[i], the sign of rotate_half folded into the sin table (base.RopeTables).
void rope_rows(float* x, int64_t T, int64_t H, int64_t hd, int64_t ldt, const float* cos,
               const float* sin) {
  const int64_t half = hd / 2;
  auto body = [&](int64_t t0, int64_t t1) {
    alignas(64) float tmp[512];
    for (int64_t t = t0; t < t1; ++t) {
      const float* c = cos + t * hd;
      const float* s = sin + t * hd;
      for (int64_t h = 0; h < H; ++h) {
        float* p = x + t * ldt + h * hd;
        std::memcpy(tmp, p, hd * sizeof(float));
        for (int64_t i = 0; i < hd; ++i) {
          const float r = i < half ? tmp[i + half] : tmp[i - half];
          p[i] = std::fma(r, s[i], tmp[i] * c[i]);
        }
      }
    }
  };
  if (T * H * hd >= 65536) at::parallel_for(0, T, 8, body);
  else body(0, T);
}

// e^x for x <= 0 (the attention kernel's polynomial).
inline __m512 exp_neg(__m512 x) { return vdattn::exp_neg(x); }

// sign-bit logic in AVX512F (the _ps forms are AVX512DQ)
inline __m512 or_ps(__m512 a, __m512 b) {
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a), _mm512_castps_si512(b)));
}
inline __m512 and_ps(__m512 a, __m512 b) {
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_castps_si512(b)));
}
inline __m512 andnot_ps(__m512 a, __m512 b) {  // ~a & b
  return _mm512_castsi512_ps(
      _mm512_andnot_si512(_mm512_castps_si512(a), _mm512_castps_si512(b)));
}

// a = act(gate) * up for rows gu = [gate | up] (I values each): SiLU or GELU (tanh form).
void glu_rows(const float* gu, int64_t ldg, float* a, int64_t lda, int64_t M, int64_t I, int act) {
  const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
  const __m512 k0 = _mm512_set1_ps(0.7978845608028654f), k1 = _mm512_set1_ps(0.044715f);
  const __m512 sign = _mm512_set1_ps(-0.0f);
  auto body = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = gu + r * ldg;
      const float* u = g + I;
      float* ar = a + r * lda;
      for (int64_t j = 0; j < I; j += 16) {
        const __mmask16 m = lanes(I - j);
        const __m512 gv = _mm512_maskz_loadu_ps(m, g + j);
        const __m512 uv = _mm512_maskz_loadu_ps(m, u + j);
        __m512 y;
        if (act == 0) {  // silu(g) = g * sigmoid(g); e = e^-|g| keeps the exponent <= 0
          const __m512 e = exp_neg(or_ps(gv, sign));  // -|g|
          const __m512 den = _mm512_add_ps(one, e);
          const __mmask16 neg = _mm512_cmp_ps_mask(gv, _mm512_setzero_ps(), _CMP_LT_OQ);
          const __m512 sig = _mm512_div_ps(_mm512_mask_blend_ps(neg, one, e), den);
          y = _mm512_mul_ps(gv, sig);
        } else {  // 0.5 g (1 + tanh(k0 (g + k1 g^3))); tanh(z) = sign(z) (1 - e) / (1 + e)
          const __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(gv, gv), gv);
          const __m512 z = _mm512_mul_ps(k0, _mm512_fmadd_ps(k1, g3, gv));
          const __m512 az = andnot_ps(sign, z);
          const __m512 e = exp_neg(_mm512_mul_ps(_mm512_set1_ps(-2.0f), az));
          __m512 th = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
          th = or_ps(th, and_ps(z, sign));
          y = _mm512_mul_ps(_mm512_mul_ps(half, gv), _mm512_add_ps(one, th));
        }
        _mm512_mask_storeu_ps(ar + j, m, _mm512_mul_ps(y, uv));
      }
    }
  };
  if (M * I >= 65536) at::parallel_for(0, M, 16, body);
  else body(0, M);
}

void add_rows(float* x, const float* y, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes(n - j);
    _mm512_mask_storeu_ps(x + j, m,
                          _mm512_add_ps(_mm512_maskz_loadu_ps(m, x + j),
                                        _mm512_maskz_loadu_ps(m, y + j)));
  }
}

// Rows of float32 into the cache's element type: bfloat16 rounded to nearest even (what ATen's
// conversion gives every finite value), or float32 as it is.
void store_row(const float* src, void* dst, bool bf16, int64_t n) {
  if (!bf16) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  auto* d = static_cast<uint16_t*>(dst);
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7FFF);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes(n - j);
    const __m512 v = _mm512_maskz_loadu_ps(m, src + j);
    const __m512i b = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(bias, _mm512_and_si512(
                                                         _mm512_srli_epi32(b, 16), one)));
    r = _mm512_srli_epi32(r, 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0xFFFF));
    _mm256_mask_storeu_epi16(d + j, m, _mm512_cvtepi32_epi16(r));
  }
}

void check_rows(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kFloat && t.stride(1) == 1,
              "fused.", what, ": a float32 [M, N] tensor with contiguous rows is needed");
}

// ---- the Python path's calls (models/fused.py) ----

at::Tensor rmsnorm(const at::Tensor& x, const at::Tensor& w, double eps, int64_t group) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
                  w.is_contiguous(),
              "fused.rmsnorm: float32 x and weight are needed");
  const int64_t N = x.size(-1), G = group > 0 ? group : N;
  TORCH_CHECK(w.numel() == N && N % G == 0, "fused.rmsnorm: weight and group must fit x");
  at::Tensor xc = x.reshape({-1, N});
  if (xc.stride(1) != 1) xc = xc.contiguous();
  at::Tensor y = at::empty(xc.sizes(), xc.options());
  rmsnorm_rows(xc.data_ptr<float>(), xc.stride(0), w.data_ptr<float>(), y.data_ptr<float>(), N,
               xc.size(0), N, G, static_cast<float>(eps));
  return y.view(x.sizes());
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat, "fused.rope: x is float32 [T, H, hd]");
  const int64_t T = x.size(0), H = x.size(1), hd = x.size(2);
  TORCH_CHECK(hd <= 512 && hd % 2 == 0, "fused.rope: head_dim must be even and <= 512");
  at::Tensor c = cos.reshape({T, hd}).contiguous(), s = sin.reshape({T, hd}).contiguous();
  TORCH_CHECK(c.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat,
              "fused.rope: float32 tables are needed");
  at::Tensor y = x.contiguous().clone();
  rope_rows(y.data_ptr<float>(), T, H, hd, H * hd, c.data_ptr<float>(), s.data_ptr<float>());
  return y;
}

at::Tensor glu(const at::Tensor& gu, int64_t act) {
  at::Tensor g = gu.reshape({-1, gu.size(-1)});
  if (g.stride(1) != 1) g = g.contiguous();
  check_rows(g, "glu");
  const int64_t I = g.size(1) / 2;
  at::Tensor a = at::empty({g.size(0), I}, g.options());
  glu_rows(g.data_ptr<float>(), g.stride(0), a.data_ptr<float>(), I, g.size(0), I, act);
  auto sizes = gu.sizes().vec();
  sizes.back() = I;
  return a.view(sizes);
}

// ---- the forward ----

using SegArgs = std::tuple<int64_t, int64_t, int64_t, int64_t, at::Tensor, at::Tensor, at::Tensor,
                           c10::optional<at::Tensor>>;  // col, mode, group, scales, codes, sa, sb, bias

struct Seg {
  int64_t col, mode, group, scales;
  at::Tensor codes, sa, sb;
  c10::optional<at::Tensor> bias;
};

struct Lin {
  std::vector<Seg> segs;
  int64_t out = 0;
  Lin() = default;
  Lin(const std::vector<SegArgs>& args, int64_t out_features) : out(out_features) {
    for (const auto& a : args)
      segs.push_back(Seg{std::get<0>(a), std::get<1>(a), std::get<2>(a), std::get<3>(a),
                         std::get<4>(a), std::get<5>(a), std::get<6>(a), std::get<7>(a)});
  }
  void run(const at::Tensor& x, at::Tensor& y) const {
    for (const auto& s : segs)
      vdq4::q4_linear(x, y, s.col, s.codes, s.sa, s.sb, s.bias, s.mode, s.group, s.scales);
  }
};

struct Layer {
  at::Tensor in_norm, post_attn_norm, ffn_norm, post_ffn_norm, qk_w;  // undefined: absent
  Lin wqkv, wo, w13, w2;
  int64_t rope = 0;
  double scale = 1.0, softcap = 0.0;
};

class Net {
 public:
  Net(int64_t dim, int64_t n_h, int64_t n_kv, int64_t hd, int64_t inter, double eps, int64_t act)
      : dim_(dim), n_h_(n_h), n_kv_(n_kv), hd_(hd), inter_(inter), eps_(eps), act_(act) {
    TORCH_CHECK(hd <= 256 && hd % 2 == 0, "fused.Net: head_dim must be even and <= 256");
  }

  void add_layer(const at::Tensor& in_norm, const c10::optional<at::Tensor>& post_attn_norm,
                 const at::Tensor& ffn_norm, const c10::optional<at::Tensor>& post_ffn_norm,
                 const c10::optional<at::Tensor>& qk_w, const std::vector<SegArgs>& wqkv,
                 const std::vector<SegArgs>& wo, const std::vector<SegArgs>& w13,
                 const std::vector<SegArgs>& w2, int64_t rope, double scale, double softcap) {
    Layer L;
    L.in_norm = in_norm.contiguous();
    if (post_attn_norm) L.post_attn_norm = post_attn_norm->contiguous();
    L.ffn_norm = ffn_norm.contiguous();
    if (post_ffn_norm) L.post_ffn_norm = post_ffn_norm->contiguous();
    if (qk_w) L.qk_w = qk_w->contiguous();
    const int64_t nqkv = n_h_ + 2 * n_kv_;
    L.wqkv = Lin(wqkv, nqkv * hd_);
    L.wo = Lin(wo, dim_);
    L.w13 = Lin(w13, 2 * inter_);
    L.w2 = Lin(w2, dim_);
    L.rope = rope;
    L.scale = scale;
    L.softcap = softcap;
    layers_.push_back(std::move(L));
  }

  void set_head(const at::Tensor& norm, const std::vector<SegArgs>& head, int64_t vocab) {
    norm_ = norm.contiguous();
    head_ = Lin(head, vocab);
  }

  // x: the embedded rows [T, dim] (float32; overwritten). Per layer i: kc[i], vc[i] its cache
  // ([1, n_kv, max_len, hd], bfloat16 or float32), keys[i] the index of its (lo, hi, ext) key
  // ranges (attnkernel.rows), -1 for a skipped attention; mlp[i] false for a skipped MLP.
  // Returns the logits of the last n_logits rows, when asked the final-normed hidden states
  // of all T rows (a drafter's own head), then the residual stream after each layer in `keep`
  // (a trained draft head's features: captured here, not by a second forward).
  std::vector<at::Tensor> forward(at::Tensor x, const std::vector<at::Tensor>& kc,
                                  const std::vector<at::Tensor>& vc, int64_t start,
                                  const std::vector<at::Tensor>& cos,
                                  const std::vector<at::Tensor>& sin,
                                  const std::vector<at::Tensor>& lo,
                                  const std::vector<at::Tensor>& hi,
                                  const std::vector<c10::optional<at::Tensor>>& ext,
                                  const std::vector<int64_t>& keys, const std::vector<bool>& mlp,
                                  int64_t n_logits, bool want_hidden,
                                  const std::vector<int64_t>& keep) {
    const int64_t n_layers = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(x.dim() == 2 && x.size(1) == dim_ && x.scalar_type() == at::kFloat &&
                    x.is_contiguous(),
                "fused.forward: x must be contiguous float32 [T, dim]");
    TORCH_CHECK(static_cast<int64_t>(kc.size()) == n_layers &&
                    static_cast<int64_t>(vc.size()) == n_layers &&
                    static_cast<int64_t>(keys.size()) == n_layers &&
                    static_cast<int64_t>(mlp.size()) == n_layers,
                "fused.forward: one cache, key set and MLP flag per layer");
    const int64_t T = x.size(0), nq = n_h_ + n_kv_, nqkv = n_h_ + 2 * n_kv_;
    const auto opt = x.options();
    at::Tensor h = at::empty({T, dim_}, opt), o = at::empty({T, dim_}, opt);
    at::Tensor qkv = at::empty({T, nqkv * hd_}, opt);
    at::Tensor gu = at::empty({T, 2 * inter_}, opt), a = at::empty({T, inter_}, opt);
    at::Tensor att = at::empty({T, n_h_ * hd_}, opt);
    float* xp = x.data_ptr<float>();
    const float eps = static_cast<float>(eps_);
    std::vector<at::Tensor> kept;
    size_t next_keep = 0;
    for (int64_t i = 0; i < n_layers; ++i) {
      const Layer& L = layers_[i];
      if (keys[i] >= 0) {
        const int64_t j = keys[i];
        rmsnorm_rows(xp, dim_, L.in_norm.data_ptr<float>(), h.data_ptr<float>(), dim_, T, dim_,
                     dim_, eps);
        L.wqkv.run(h, qkv);
        float* qp = qkv.data_ptr<float>();
        if (L.qk_w.defined())
          rmsnorm_rows(qp, nqkv * hd_, L.qk_w.data_ptr<float>(), qp, nqkv * hd_, T, nq * hd_, hd_,
                       eps);
        rope_rows(qp, T, nq, hd_, nqkv * hd_, cos[L.rope].data_ptr<float>(),
                  sin[L.rope].data_ptr<float>());
        const at::Tensor& K = kc[i];
        const at::Tensor& V = vc[i];
        TORCH_CHECK(K.dim() == 4 && K.is_contiguous() && V.is_contiguous() &&
                        K.sizes() == V.sizes() && K.size(1) == n_kv_ && K.size(3) == hd_ &&
                        start + T <= K.size(2) && K.scalar_type() == V.scalar_type() &&
                        (K.scalar_type() == at::kBFloat16 || K.scalar_type() == at::kFloat),
                    "fused.forward: layer ", i, "'s cache does not fit");
        const bool bf16 = K.scalar_type() == at::kBFloat16;
        const int64_t es = bf16 ? 2 : 4, max_len = K.size(2);
        auto* kp = static_cast<char*>(K.data_ptr());
        auto* vp = static_cast<char*>(V.data_ptr());
        for (int64_t t = 0; t < T; ++t)
          for (int64_t hh = 0; hh < n_kv_; ++hh) {
            const int64_t at_ = (hh * max_len + start + t) * hd_ * es;
            store_row(qp + (t * nqkv + n_h_ + hh) * hd_, kp + at_, bf16, hd_);
            store_row(qp + (t * nqkv + nq + hh) * hd_, vp + at_, bf16, hd_);
          }
        // q [n_h, T, hd] read through its strides in qkv
        const vdattn::Rows R = vdattn::prepare(qp, n_h_, T, hd_, hd_, nqkv * hd_, K, V, lo[j],
                                               hi[j], ext[j], L.scale, L.softcap);
        vdattn::run_into(R, att.data_ptr<float>());
        L.wo.run(att, o);
        float* op = o.data_ptr<float>();
        if (L.post_attn_norm.defined())
          rmsnorm_rows(op, dim_, L.post_attn_norm.data_ptr<float>(), op, dim_, T, dim_, dim_, eps);
        add_rows(xp, op, T * dim_);
      }
      if (mlp[i]) {
        rmsnorm_rows(xp, dim_, L.ffn_norm.data_ptr<float>(), h.data_ptr<float>(), dim_, T, dim_,
                     dim_, eps);
        L.w13.run(h, gu);
        glu_rows(gu.data_ptr<float>(), 2 * inter_, a.data_ptr<float>(), inter_, T, inter_, act_);
        L.w2.run(a, o);
        float* op = o.data_ptr<float>();
        if (L.post_ffn_norm.defined())
          rmsnorm_rows(op, dim_, L.post_ffn_norm.data_ptr<float>(), op, dim_, T, dim_, dim_, eps);
        add_rows(xp, op, T * dim_);
      }
      // x is updated in place by the next layer: a copy of this layer's output
      if (next_keep < keep.size() && keep[next_keep] == i) {
        kept.push_back(x.clone());
        ++next_keep;
      }
    }
    TORCH_CHECK(next_keep == keep.size(), "fused.forward: keep must be sorted layer indices");
    const int64_t n = std::min(n_logits, T);
    at::Tensor hidden, last;
    if (want_hidden) {
      hidden = at::empty({T, dim_}, opt);
      rmsnorm_rows(xp, dim_, norm_.data_ptr<float>(), hidden.data_ptr<float>(), dim_, T, dim_,
                   dim_, eps);
      last = hidden.narrow(0, T - n, n);
    } else {
      last = at::empty({n, dim_}, opt);
      rmsnorm_rows(xp + (T - n) * dim_, dim_, norm_.data_ptr<float>(), last.data_ptr<float>(),
                   dim_, n, dim_, dim_, eps);
    }
    at::Tensor logits = at::empty({n, head_.out}, opt);
    if (n > 0) head_.run(last.contiguous(), logits);
    std::vector<at::Tensor> out{logits, want_hidden ? hidden : at::Tensor()};
    out.insert(out.end(), kept.begin(), kept.end());
    return out;
  }

 private:
  int64_t dim_, n_h_, n_kv_, hd_, inter_;
  double eps_;
  int64_t act_;
  std::vector<Layer> layers_;
  at::Tensor norm_;
  Lin head_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rmsnorm", &rmsnorm, "x / rms(x) * w over groups of the last dim, row by row");
  m.def("rope", &rope, "HF half-split RoPE on x [T, H, hd] (signed sin table)");
  m.def("glu", &glu, "act(gate) * up for rows [gate | up]; act 0 = SiLU, 1 = GELU (tanh)");
  py::class_<Net>(m, "Net")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, int64_t>())
      .def("add_layer", &Net::add_layer)
      .def("set_head", &Net::set_head)
      // the GIL is let go for the whole forward (C++ only, nothing of Python's is touched):
      // the server's event loop streams the last step's text while this step computes
      .def("forward", &Net::forward, py::call_guard<py::gil_scoped_release>());
}
