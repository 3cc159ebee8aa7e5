// kvmesh.DecodeAttention: ONNX Runtime's CPU GroupQueryAttention contract for decode steps (one new
// token per row, rotate-half rotary inside, past and present KV sharing one buffer), computed so
// that each KV head is read once for all of its query heads.
//
// Why: ORT's CPU GroupQueryAttention runs every query head on its own, so with SmolLM2's 9 query
// and 3 KV heads each KV head crosses memory three times, and its M=1 GEMMs are not bandwidth-bound
// (measured: 11.2 ms a step over 2,200 tokens of 30 layers where the KV's 101 MB take 2.3 ms).
//
// Inputs (as GroupQueryAttention's with packed QKV; float32):
//   0 qkv                   (B, 1, (H + 2 KV) * D)   queries, keys, values of the new token
//   1 past_key, 2 past_value (B, KV, C, D)           each row's tokens left-aligned, C >= tokens
//   3 seqlens_k             (B,) int32               tokens per row after this step, minus 1
//   4 total_sequence_length () int32                 the longest row's tokens after this step
//   5 cos_cache, 6 sin_cache (P, D / 2)              rotary tables by position
// Outputs: 0 (B, 1, H * D); 1 present_key, 2 present_value (B, KV, max(C, total), D): the same
// memory as the past when the caller binds them so (then only the new token is written).
// Attributes: num_heads, kv_num_heads, scale (0: 1/sqrt(D)).
//
// Numerics: fp32 throughout; a row's result depends only on its own inputs (no batch mates, no
// thread count): tokens are cut into fixed chunks whose partial softmax sums are combined in order.

#include <immintrin.h>
#include <onnxruntime_c_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

const OrtApi* api = nullptr;

constexpr int64_t kChunk = 256;   // tokens a task covers: enough tasks for 2+ threads at 500+ tokens
constexpr int64_t kMaxGroup = 16;  // query heads per KV head we take (SmolLM2: 3, Llama 3: 4)

// exp(x) for x <= 0 (the generic path's; exp512 below is the same on 16 lanes): 2^n * p(r),
// x = n ln2 + r, |r| <= ln2 / 2, with a degree-6 polynomial (relative error ~2e-7).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504f + 0.5f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// a . b over n floats in 16 lanes summed in a fixed order (vectorized without reassociation).
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float lanes[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) lanes[j] += a[i + j] * b[i + j];
  float s = 0.0f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int j = 0; j < 16; ++j) s += lanes[j];
  return s;
}

// x (D) rotated in place at one position, rotate-half order: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s).
inline void rotate(float* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i] + a * sin[i];
  }
}

struct Kernel {
  int64_t heads = 0, kv_heads = 0;
  float scale = 0.0f;
};

struct Step;
// One task's chunk: (step, task, its G queries, its first key and value rows, tokens).
using ChunkFn = void (*)(Step&, size_t, const float*, const float*, const float*, int64_t);

// One step's work, shared by the tasks: task t = (row, KV head, chunk) over `tasks`.
struct Step {
  int64_t group = 0, dim = 0, capacity = 0, kv_heads = 0;
  float scale = 0.0f;
  const float* queries = nullptr;  // (B, H, D), rotated
  const float* keys = nullptr;     // present (B, KV, capacity, D)
  const float* values = nullptr;
  const int32_t* lengths = nullptr;  // (B,) tokens to attend to
  std::vector<int64_t> row, head, first;  // per task
  std::vector<float> max, sum, acc;  // per task and query head: (tasks, G), (tasks, G), (tasks, G, D)
  ChunkFn chunk = nullptr;
};

// A task's tokens [t0, t1) of one row and KV head: its G query heads' scores, their softmax
// partial sums (max, sum of exp) and exp-weighted values (unnormalized), as generic C++.
void chunk_generic(Step& s, size_t task, const float* q, const float* K, const float* V, int64_t n) {
  const int64_t G = s.group, D = s.dim;
  float scores[kMaxGroup * kChunk];  // (G, n)
  for (int64_t t = 0; t < n; ++t)
    for (int64_t g = 0; g < G; ++g) scores[g * kChunk + t] = s.scale * dot(q + g * D, K + t * D, D);
  float* acc = s.acc.data() + task * G * D;
  for (int64_t g = 0; g < G; ++g) {
    float* row = scores + g * kChunk;
    const float m = *std::max_element(row, row + n);
    float total = 0.0f;
    for (int64_t t = 0; t < n; ++t) {
      row[t] = exp_nonpositive(row[t] - m);
      total += row[t];
    }
    s.max.data()[task * G + g] = m;
    s.sum.data()[task * G + g] = total;
    std::fill(acc + g * D, acc + (g + 1) * D, 0.0f);
  }
  for (int64_t t = 0; t < n; ++t) {
    const float* v = V + t * D;
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * kChunk + t];
      float* a = acc + g * D;
      for (int64_t d = 0; d < D; ++d) a[d] += p * v[d];
    }
  }
}

// The first min(left, 16) lanes.
inline __mmask16 tail(int64_t left) { return left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1); }

// exp_nonpositive on 16 lanes (round to nearest for n; the same polynomial).
__attribute__((target("avx512f"))) inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  for (const float c : {1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// The same with AVX-512 for G query heads of D = 16 * DC: each key and value row is loaded once
// for all G heads, the accumulators stay in registers (G * DC of the 32 zmm).
template <int G, int DC>
__attribute__((target("avx512f"))) void chunk_avx512(Step& s, size_t task, const float* q, const float* K,
                                                     const float* V, int64_t n) {
  constexpr int D = 16 * DC;
  __m512 qv[G][DC];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < DC; ++c) qv[g][c] = _mm512_loadu_ps(q + g * D + 16 * c);
  alignas(64) float scores[G][kChunk];
  for (int64_t t = 0; t < n; ++t) {
    __m512 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for (int c = 0; c < DC; ++c) {
      const __m512 k = _mm512_loadu_ps(K + t * D + 16 * c);
      for (int g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(qv[g][c], k, acc[g]);
    }
    for (int g = 0; g < G; ++g) scores[g][t] = s.scale * _mm512_reduce_add_ps(acc[g]);
  }
  float* max = s.max.data() + task * G;
  float* sum = s.sum.data() + task * G;
  for (int g = 0; g < G; ++g) {
    float* row = scores[g];
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < n; t += 16) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, tail(n - t), row + t));
    const float top = _mm512_reduce_max_ps(m);
    __m512 total = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t += 16) {
      const __mmask16 k = tail(n - t);
      const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, row + t), _mm512_set1_ps(top)));
      _mm512_mask_storeu_ps(row + t, k, e);
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(k, e));
    }
    max[g] = top;
    sum[g] = _mm512_reduce_add_ps(total);
  }
  __m512 acc[G][DC];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < DC; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t)
    for (int c = 0; c < DC; ++c) {
      const __m512 v = _mm512_loadu_ps(V + t * D + 16 * c);
      for (int g = 0; g < G; ++g) acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g][t]), v, acc[g][c]);
    }
  float* out = s.acc.data() + task * G * D;
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < DC; ++c) _mm512_storeu_ps(out + g * D + 16 * c, acc[g][c]);
}

// The kernel for this CPU and shape: AVX-512 where the CPU has it and D = 64 with up to 4 query
// heads per KV head (SmolLM2, Llama 3), generic C++ otherwise.
ChunkFn pick(int64_t group, int64_t dim) {
  if (dim != 64 || !__builtin_cpu_supports("avx512f")) return chunk_generic;
  switch (group) {
    case 1: return chunk_avx512<1, 4>;
    case 2: return chunk_avx512<2, 4>;
    case 3: return chunk_avx512<3, 4>;
    case 4: return chunk_avx512<4, 4>;
    default: return chunk_generic;
  }
}

void run_chunk(void* data, size_t task) {
  Step& s = *static_cast<Step*>(data);  // each task writes only its own max, sum and acc
  const int64_t b = s.row[task], h = s.head[task], t0 = s.first[task];
  const int64_t n = std::min<int64_t>(t0 + kChunk, s.lengths[b]) - t0;
  const int64_t offset = ((b * s.kv_heads + h) * s.capacity + t0) * s.dim;
  const float* q = s.queries + (b * s.kv_heads + h) * s.group * s.dim;  // this KV head's G query heads
  s.chunk(s, task, q, s.keys + offset, s.values + offset, n);
}

OrtStatusPtr fail(const std::string& message) { return api->CreateStatus(ORT_INVALID_ARGUMENT, message.c_str()); }

#define KV_TRY(expr)                        \
  do {                                      \
    if (OrtStatusPtr _s = (expr)) return _s; \
  } while (0)

OrtStatusPtr dims_of(const OrtValue* value, std::vector<int64_t>& dims) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  KV_TRY(api->GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatusPtr status = api->GetDimensionsCount(info, &rank);
  if (!status) {
    dims.resize(rank);
    status = api->GetDimensions(info, dims.data(), rank);
  }
  api->ReleaseTensorTypeAndShapeInfo(info);
  return status;
}

// The C API of these headers reads inputs through GetTensorMutableData only; nothing writes them.
template <typename T>
OrtStatusPtr data_of(const OrtValue* value, const T** out) {
  void* data = nullptr;
  KV_TRY(api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  *out = static_cast<const T*>(data);
  return nullptr;
}

struct Inputs {
  const OrtValue* value[7] = {};
  std::vector<int64_t> dims[7];
};

OrtStatusPtr compute(const Kernel& k, OrtKernelContext* ctx) {
  Inputs in;
  for (size_t i = 0; i < 7; ++i) {
    KV_TRY(api->KernelContext_GetInput(ctx, i, &in.value[i]));
    if (!in.value[i]) return fail("DecodeAttention: input " + std::to_string(i) + " missing");
    KV_TRY(dims_of(in.value[i], in.dims[i]));
  }
  const auto& qd = in.dims[0];
  const auto& kd = in.dims[1];
  int64_t total_count = 1;  // total_sequence_length: one value (a scalar, or shape (1,))
  for (const int64_t d : in.dims[4]) total_count *= d;
  if (qd.size() != 3 || kd.size() != 4 || in.dims[2] != kd || in.dims[3].size() != 1 || total_count != 1 ||
      in.dims[5].size() != 2 || in.dims[6] != in.dims[5])
    return fail("DecodeAttention: input ranks are not GroupQueryAttention's");
  const int64_t B = qd[0], H = k.heads, KV = k.kv_heads, C = kd[2], D = kd[3], half = D / 2, P = in.dims[5][0];
  if (qd[1] != 1) return fail("DecodeAttention takes one new token per row (decode steps)");
  if (kd[0] != B || kd[1] != KV || D % 2 || qd[2] != (H + 2 * KV) * D || in.dims[3][0] != B || in.dims[5][1] != half)
    return fail("DecodeAttention: input shapes disagree with num_heads / kv_num_heads");
  const float* qkv = nullptr;
  const float *past_k = nullptr, *past_v = nullptr, *cos = nullptr, *sin = nullptr;
  const int32_t *seqlens = nullptr, *total = nullptr;
  KV_TRY(data_of(in.value[0], &qkv));
  KV_TRY(data_of(in.value[1], &past_k));
  KV_TRY(data_of(in.value[2], &past_v));
  KV_TRY(data_of(in.value[3], &seqlens));
  KV_TRY(data_of(in.value[4], &total));
  KV_TRY(data_of(in.value[5], &cos));
  KV_TRY(data_of(in.value[6], &sin));
  const int64_t cap = std::max<int64_t>(C, *total);
  for (int64_t b = 0; b < B; ++b)
    if (seqlens[b] < 0 || seqlens[b] >= cap || seqlens[b] >= P || seqlens[b] >= *total)
      return fail("DecodeAttention: a row's position is outside the KV buffer or the rotary tables");

  const int64_t out_dims[3] = {B, 1, H * D};
  const int64_t kv_dims[4] = {B, KV, cap, D};
  OrtValue *out_v = nullptr, *pk_v = nullptr, *pv_v = nullptr;
  KV_TRY(api->KernelContext_GetOutput(ctx, 0, out_dims, 3, &out_v));
  KV_TRY(api->KernelContext_GetOutput(ctx, 1, kv_dims, 4, &pk_v));
  KV_TRY(api->KernelContext_GetOutput(ctx, 2, kv_dims, 4, &pv_v));
  float *out = nullptr, *present_k = nullptr, *present_v = nullptr;
  KV_TRY(api->GetTensorMutableData(out_v, reinterpret_cast<void**>(&out)));
  KV_TRY(api->GetTensorMutableData(pk_v, reinterpret_cast<void**>(&present_k)));
  KV_TRY(api->GetTensorMutableData(pv_v, reinterpret_cast<void**>(&present_v)));
  if (present_k != past_k || present_v != past_v) {  // not one shared buffer: the past is copied over
    for (int64_t bh = 0; bh < B * KV; ++bh) {
      const int64_t valid = std::min<int64_t>(seqlens[bh / KV], C);
      std::memcpy(present_k + bh * cap * D, past_k + bh * C * D, valid * D * sizeof(float));
      std::memcpy(present_v + bh * cap * D, past_v + bh * C * D, valid * D * sizeof(float));
    }
  }

  // The new token: queries rotated into `queries` (B, H, D), its key rotated and value written at
  // each row's position in the present.
  const int64_t G = H / KV;
  std::vector<float> queries(B * H * D);
  std::vector<int32_t> lengths(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t pos = seqlens[b];
    lengths[b] = static_cast<int32_t>(pos + 1);
    const float* x = qkv + b * (H + 2 * KV) * D;
    std::memcpy(queries.data() + b * H * D, x, H * D * sizeof(float));
    for (int64_t h = 0; h < H; ++h) rotate(queries.data() + (b * H + h) * D, cos + pos * half, sin + pos * half, half);
    for (int64_t h = 0; h < KV; ++h) {
      float* key = present_k + ((b * KV + h) * cap + pos) * D;
      std::memcpy(key, x + (H + h) * D, D * sizeof(float));
      rotate(key, cos + pos * half, sin + pos * half, half);
      std::memcpy(present_v + ((b * KV + h) * cap + pos) * D, x + (H + KV + h) * D, D * sizeof(float));
    }
  }

  Step s;
  s.group = G, s.dim = D, s.capacity = cap, s.kv_heads = KV;
  s.scale = k.scale > 0.0f ? k.scale : 1.0f / std::sqrt(static_cast<float>(D));
  s.chunk = pick(G, D);
  s.queries = queries.data(), s.keys = present_k, s.values = present_v, s.lengths = lengths.data();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < KV; ++h)
      for (int64_t t0 = 0; t0 < lengths[b]; t0 += kChunk) {
        s.row.push_back(b);
        s.head.push_back(h);
        s.first.push_back(t0);
      }
  const size_t tasks = s.row.size();
  s.max.resize(tasks * G), s.sum.resize(tasks * G), s.acc.resize(tasks * G * D);
  KV_TRY(api->KernelContext_ParallelFor(ctx, run_chunk, tasks, 0, &s));

  // Each query head's chunks combined in order: out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c.
  size_t task = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < KV; ++h) {
      const size_t first = task, chunks = static_cast<size_t>((lengths[b] + kChunk - 1) / kChunk);
      task += chunks;
      for (int64_t g = 0; g < G; ++g) {
        float m = -INFINITY;
        for (size_t c = first; c < task; ++c) m = std::max(m, s.max[c * G + g]);
        float* o = out + (b * H + h * G + g) * D;
        std::fill(o, o + D, 0.0f);
        float denom = 0.0f;
        for (size_t c = first; c < task; ++c) {
          const float w = std::exp(s.max[c * G + g] - m);
          denom += w * s.sum[c * G + g];
          const float* a = s.acc.data() + (c * G + g) * D;
          for (int64_t d = 0; d < D; ++d) o[d] += w * a[d];
        }
        for (int64_t d = 0; d < D; ++d) o[d] /= denom;
      }
    }
  return nullptr;
}

OrtStatusPtr create(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** out) {
  auto* k = new Kernel;
  OrtStatusPtr status = api->KernelInfoGetAttribute_int64(info, "num_heads", &k->heads);
  if (!status) status = api->KernelInfoGetAttribute_int64(info, "kv_num_heads", &k->kv_heads);
  if (status) {
    delete k;
    return status;
  }
  if (OrtStatusPtr no_scale = api->KernelInfoGetAttribute_float(info, "scale", &k->scale)) {
    api->ReleaseStatus(no_scale);  // optional: 1/sqrt(D)
    k->scale = 0.0f;
  }
  if (k->heads <= 0 || k->kv_heads <= 0 || k->heads % k->kv_heads || k->heads / k->kv_heads > kMaxGroup) {
    delete k;
    return fail("DecodeAttention: num_heads must be a multiple of kv_num_heads, at most 16 times it");
  }
  *out = k;
  return nullptr;
}

struct Op : OrtCustomOp {
  Op() : OrtCustomOp{} {
    version = ORT_API_VERSION;
    GetName = [](const OrtCustomOp*) { return "DecodeAttention"; };
    GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return nullptr; };  // CPU
    GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 7; };
    GetInputType = [](const OrtCustomOp*, size_t i) {
      return i == 3 || i == 4 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    };
    GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 3; };
    GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
    GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
    GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 0; };
    GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 0; };
    CreateKernelV2 = create;
    KernelComputeV2 = [](void* kernel, OrtKernelContext* ctx) { return compute(*static_cast<Kernel*>(kernel), ctx); };
    KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
    GetStartVersion = [](const OrtCustomOp*) { return 1; };
    GetEndVersion = [](const OrtCustomOp*) { return 1 << 30; };
  }
};

Op op;

}  // namespace

// ONNX Runtime calls this when a session registers the library (SessionOptions.register_custom_ops_library).
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  api = base->GetApi(ORT_API_VERSION);
  if (!api) return nullptr;  // an ONNX Runtime older than these headers: the session then fails on the op
  OrtCustomOpDomain* domain = nullptr;  // kept for the process: sessions refer to it while they live
  KV_TRY(api->CreateCustomOpDomain("kvmesh", &domain));
  KV_TRY(api->CustomOpDomain_Add(domain, &op));
  return api->AddCustomOpDomain(options, domain);
}
