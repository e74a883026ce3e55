// backend/cpu/attention.cpp: causal grouped-query attention with optional document masking,
// naive O(T^2) with the probabilities saved for backward. Scale D^-0.5, softmax in fp32.
// attention_tail_* are the same loops for the last Tq queries of each sequence over all Tkv of
// its keys (query t at position Tkv - Tq + t), so a sequence split in two halves gives the
// unsplit forward's bits.
#include <cmath>
#include <limits>
#include <vector>

#include "core/check.h"
#include "ops/ops.h"

namespace automoe::cpu {

namespace {

// q[B,Tq,nH,D] at positions Tkv-Tq.., k/v[B,Tkv,nKV,D], out[B,Tq,nH,D], att[B,nH,Tq,Tkv];
// doc[B*Tkv] only with Tq = Tkv
void attn_fwd(float* out, float* att, const float* q, const float* k, const float* v,
              const int32_t* doc, int64_t B, int64_t Tq, int64_t Tkv, int64_t nH, int64_t nKV,
              int64_t D) {
  const int64_t rep = nH / nKV, off = Tkv - Tq, T = Tkv;
  const float scale = 1.0f / std::sqrt(float(D));
#pragma omp parallel for collapse(2)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < nH; ++h) {
      const int64_t hk = h / rep;
      for (int64_t i = 0; i < Tq; ++i) {
        const int64_t t = off + i;  // the query's position
        const float* qr = q + ((b * Tq + i) * nH + h) * D;
        float* a = att + ((b * nH + h) * Tq + i) * T;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < T; ++s) {
          bool ok = s <= t && (!doc || doc[b * T + s] == doc[b * T + t]);
          if (!ok) { a[s] = -std::numeric_limits<float>::infinity(); continue; }
          const float* kr = k + ((b * T + s) * nKV + hk) * D;
          float dot = 0.f;
          for (int64_t d = 0; d < D; ++d) dot += qr[d] * kr[d];
          a[s] = dot * scale;
          mx = std::max(mx, a[s]);
        }
        float sum = 0.f;
        for (int64_t s = 0; s < T; ++s) {
          a[s] = (s <= t && a[s] != -std::numeric_limits<float>::infinity()) ? std::exp(a[s] - mx) : 0.f;
          sum += a[s];
        }
        float inv = 1.0f / sum;
        float* o = out + ((b * Tq + i) * nH + h) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
        for (int64_t s = 0; s <= t; ++s) {
          a[s] *= inv;
          if (a[s] == 0.f) continue;
          const float* vr = v + ((b * T + s) * nKV + hk) * D;
          for (int64_t d = 0; d < D; ++d) o[d] += a[s] * vr[d];
        }
      }
    }
}

// dq (=) [B,Tq]; dk, dv [B,Tkv] (+=)
void attn_bwd(float* dq, float* dk, float* dv, const float* dout, const float* att,
              const float* q, const float* k, const float* v, int64_t B, int64_t Tq, int64_t Tkv,
              int64_t nH, int64_t nKV, int64_t D) {
  const int64_t rep = nH / nKV, off = Tkv - Tq, T = Tkv;
  const float scale = 1.0f / std::sqrt(float(D));
  // Parallel over batch and kv head: each kv head's dk/dv is touched only by its query heads.
#pragma omp parallel for collapse(2)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t hk = 0; hk < nKV; ++hk) {
      std::vector<float> datt(T);
      for (int64_t h = hk * rep; h < (hk + 1) * rep; ++h)
        for (int64_t i = 0; i < Tq; ++i) {
          const int64_t t = off + i;  // the query's position
          const float* a = att + ((b * nH + h) * Tq + i) * T;
          const float* go = dout + ((b * Tq + i) * nH + h) * D;
          const float* qr = q + ((b * Tq + i) * nH + h) * D;
          float* gq = dq + ((b * Tq + i) * nH + h) * D;
          // datt[s] = go . v[s];  dv[s] += a[s] go
          float dot_sum = 0.f;
          for (int64_t s = 0; s <= t; ++s) {
            const float* vr = v + ((b * T + s) * nKV + hk) * D;
            float* gv = dv + ((b * T + s) * nKV + hk) * D;
            float d_ = 0.f;
            for (int64_t d = 0; d < D; ++d) {
              d_ += go[d] * vr[d];
              gv[d] += a[s] * go[d];
            }
            datt[s] = d_;
            dot_sum += a[s] * d_;
          }
          // softmax backward: dscore[s] = a[s] (datt[s] - sum_s' a datt)
          for (int64_t d = 0; d < D; ++d) gq[d] = 0.f;
          for (int64_t s = 0; s <= t; ++s) {
            float ds = a[s] * (datt[s] - dot_sum) * scale;
            if (ds == 0.f) continue;
            const float* kr = k + ((b * T + s) * nKV + hk) * D;
            float* gk = dk + ((b * T + s) * nKV + hk) * D;
            for (int64_t d = 0; d < D; ++d) {
              gq[d] += ds * kr[d];
              gk[d] += ds * qr[d];
            }
          }
        }
    }
}

}  // namespace

void attention_fwd(float* out, float* att, const float* q, const float* k, const float* v,
                   const int32_t* doc, int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D) {
  attn_fwd(out, att, q, k, v, doc, B, T, T, nH, nKV, D);
}

void attention_bwd(float* dq, float* dk, float* dv, const float* dout, const float* att,
                   const float* q, const float* k, const float* v, int64_t B, int64_t T,
                   int64_t nH, int64_t nKV, int64_t D) {
  for (int64_t i = 0; i < B * T * nKV * D; ++i) dk[i] = dv[i] = 0.f;
  attn_bwd(dq, dk, dv, dout, att, q, k, v, B, T, T, nH, nKV, D);
}

void attention_tail_fwd(float* out, float* att, const float* q, const float* k, const float* v,
                        int64_t B, int64_t Tq, int64_t Tkv, int64_t nH, int64_t nKV, int64_t D) {
  AM_CHECK(Tq >= 1 && Tq <= Tkv, "[attention_tail_fwd] {} queries over {} keys: needs "
           "1 <= Tq <= Tkv", Tq, Tkv);
  attn_fwd(out, att, q, k, v, nullptr, B, Tq, Tkv, nH, nKV, D);
}

void attention_tail_bwd(float* dq, float* dk, float* dv, const float* dout, const float* att,
                        const float* q, const float* k, const float* v, int64_t B, int64_t Tq,
                        int64_t Tkv, int64_t nH, int64_t nKV, int64_t D) {
  AM_CHECK(Tq >= 1 && Tq <= Tkv, "[attention_tail_bwd] {} queries over {} keys: needs "
           "1 <= Tq <= Tkv", Tq, Tkv);
  attn_bwd(dq, dk, dv, dout, att, q, k, v, B, Tq, Tkv, nH, nKV, D);
}

}  // namespace automoe::cpu
