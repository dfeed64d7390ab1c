// The two dynamic quantization maps of 8-bit state (common/state8.h), built once: the
// per-decade constants in double rounded to float32, the values from them in float32. python/fastopt/reference.py builds the same values with
// the same operations; the tests compare the two.
#include "common/state8.h"

namespace fastopt {
namespace {

State8Map build(bool is_signed) {
  static const double decade[7] = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0};
  State8Map m{};
  m.zero_code = is_signed ? 127 : 0;
  m.first_code = m.zero_code + 1;
  float positive[254];  // the nonzero values below 1.0, ascending
  int n = 0;
  for (int d = 0; d < 7; ++d) {
    const int bins = is_signed ? 1 << d : 2 << d;
    m.base[d] = n;
    m.scale[d] = float(bins / (0.9 * decade[d]));
    m.offset[d] = float(bins / 9.0);
    m.top[d] = float(bins - 1);
    m.first[d] = float(decade[d] * (0.1 + 0.9 / double(2 * bins)));
    m.step[d] = float(decade[d] * 0.9 / double(bins));
    for (int k = 0; k < bins; ++k) {
      const float offset = float(k) * m.step[d];  // two float32 roundings (no FMA)
      positive[n++] = m.first[d] + offset;
    }
  }
  m.first[7] = 1.0f;
  m.step[7] = 0.0f;
  // n = 127 (signed) or 254 (unsigned) positive values, then 1.0 at code 255.
  for (int i = 0; i < n; ++i) m.value[m.first_code + i] = positive[i];
  if (is_signed)
    for (int i = 0; i < n; ++i) m.value[126 - i] = -positive[i];
  m.value[m.zero_code] = 0.0f;
  m.value[255] = 1.0f;
  const auto midway = [](float a, float b) { return float((double(a) + double(b)) / 2.0); };
  m.lower[0] = midway(0.0f, positive[0]);
  for (int d = 1; d < 7; ++d) m.lower[d] = midway(positive[m.base[d] - 1], positive[m.base[d]]);
  m.lower[7] = midway(positive[n - 1], 1.0f);
  return m;
}

}  // namespace

const State8Map& state8_map(bool is_signed) {
  static const State8Map signed_map = build(true), unsigned_map = build(false);
  return is_signed ? signed_map : unsigned_map;
}

}  // namespace fastopt
