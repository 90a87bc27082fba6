// See sampling.h. Per row: one pass for the max, one for the fp64 probabilities and their
// normaliser (binned by distance from the best), then only the tokens of the two bins around the
// nucleus's edge are sorted, where the torch path takes a top-k of 256-8192 tokens and, for flat
// rows, a full sort of the vocabulary.

#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace dglm {
namespace {

// Tokens are binned by how far below the best score they are, kBinWidth nats per bin (the last
// bin takes everything further down). The nucleus ends inside the first bin where the mass from
// the top reaches top_p: every token of the bins above it is kept, every token of the bins below
// the next one is dropped, and only those two bins are sorted to place the cut exactly.
constexpr double kBinWidth = 1.0 / 16;
constexpr int kBins = 1024;

inline float gumbel(float u) { return -std::log(-std::log(u)); }

struct RowScratch {
  std::vector<float> s, tmp;
  std::vector<double> e;
  std::vector<int16_t> bin;
  std::vector<int64_t> edge;
};

int64_t sample_row(const float* logits, const float* u, float temperature, int64_t top_k,
                   double top_p, int64_t V, RowScratch& w) {
  const float ninf = -std::numeric_limits<float>::infinity();
  std::vector<float>& s = w.s;
  for (int64_t i = 0; i < V; ++i) s[i] = logits[i] / temperature;
  float kth = ninf;
  if (top_k > 0 && top_k < V) {  // the k-th largest score; ties with it are kept (as HF)
    w.tmp.assign(s.begin(), s.end());
    std::nth_element(w.tmp.begin(), w.tmp.begin() + (top_k - 1), w.tmp.end(),
                     std::greater<float>());
    kth = w.tmp[top_k - 1];
  }
  float mx = ninf;
  for (int64_t i = 0; i < V; ++i) mx = std::max(mx, s[i]);
  if (!(mx > ninf)) return 0;  // every score −inf: nothing to sample (as argmax of all −inf)
  const double m = mx;
  // fp64 probabilities (unnormalised) of the tokens top-k keeps; 0 elsewhere (and below e⁻⁷⁴⁵)
  double z = 0.0;
  double mass[kBins] = {};
  for (int64_t i = 0; i < V; ++i) {
    const double d = static_cast<double>(s[i]) - m;
    const double e = s[i] >= kth ? std::exp(d) : 0.0;
    w.e[i] = e;
    z += e;
    const int b = e > 0.0 ? static_cast<int>(std::min<double>(kBins - 1, -d / kBinWidth)) : -1;
    w.bin[i] = static_cast<int16_t>(b);
    if (b >= 0) mass[b] += e;
  }
  const double drop = 1.0 - top_p;
  int64_t best = -1;
  float best_v = ninf;
  auto consider = [&](int64_t i) {
    const float v = s[i] + gumbel(u[i]);
    const bool tie_wins = v == best_v && (s[i] > s[best] || (s[i] == s[best] && i < best));
    if (best < 0 || v > best_v || tie_wins) {
      best_v = v;
      best = i;
    }
  };
  if (drop <= 0.0) {  // no nucleus: every token top-k keeps whose probability is not 0 in fp64
    for (int64_t i = 0; i < V; ++i)
      if (w.bin[i] >= 0) consider(i);
    return best < 0 ? 0 : best;
  }
  // the cut bin: the first where the mass from the top reaches top_p (the last bin if none)
  int cut = kBins - 1;
  double above = 0.0;
  for (int b = 0; b < kBins; ++b) {
    above += mass[b];
    if (above >= top_p * z) {
      cut = b;
      break;
    }
  }
  // bins [cut, cut + 1] are sorted; tails count up from the mass below them
  const int hi = std::min(kBins - 1, cut + 1);
  double below = 0.0;
  for (int b = hi + 1; b < kBins; ++b) below += mass[b];
  w.edge.clear();
  for (int64_t i = 0; i < V; ++i)
    if (w.bin[i] >= cut && w.bin[i] <= hi) w.edge.push_back(i);
  std::sort(w.edge.begin(), w.edge.end(), [&](int64_t a, int64_t b) {
    return s[a] > s[b] || (s[a] == s[b] && a < b);
  });
  const int64_t n = static_cast<int64_t>(w.edge.size());
  const bool best_in_edge = cut == 0;  // the best token is never dropped
  int64_t keep = n;
  double tail = below / z;
  for (int64_t r = n - 1; r >= (best_in_edge ? 1 : 0); --r) {
    tail += w.e[w.edge[r]] / z;
    if (tail <= drop) keep = r;  // this one and every less likely one are dropped
    else break;
  }
  for (int64_t i = 0; i < V; ++i)
    if (w.bin[i] >= 0 && w.bin[i] < cut) consider(i);
  for (int64_t r = 0; r < keep; ++r) consider(w.edge[r]);
  return best < 0 ? 0 : best;
}

}  // namespace

void sample_nucleus(const NucleusArgs& a) {
  RowScratch w;
  w.s.resize(a.V);
  w.e.resize(a.V);
  w.bin.resize(a.V);
  for (int64_t r = 0; r < a.S; ++r) {
    const int64_t row = a.rows ? a.rows[r] : r;
    a.out[r] = sample_row(a.logits + row * a.stride, a.uniforms + r * a.V, a.temperature[r],
                          a.top_k[r], a.top_p[r], a.V, w);
  }
}

}  // namespace dglm
