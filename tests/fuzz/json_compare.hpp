// JSON comparisons for the targets that check a value survives serialize and parse.
#pragma once

#include <algorithm>
#include <boost/json/value.hpp>
#include <cmath>
#include <limits>

namespace qb_fuzz {

// Boost.JSON 1.81 reads 1e400 as infinity and writes it as "Infinity", which no parser reads
// back (docs/fuzzing.md, finding 3): a value holding one cannot be sent on as it came.
inline bool all_finite(const boost::json::value& v) {
  if (v.is_double()) return std::isfinite(v.get_double());
  if (const auto* a = v.if_array()) return std::all_of(a->begin(), a->end(), all_finite);
  if (const auto* o = v.if_object()) {
    return std::all_of(o->begin(), o->end(), [](const auto& kv) { return all_finite(kv.value()); });
  }
  return true;
}

// Equal, except that a double may come back a few units in the last place away: Boost.JSON
// 1.81's parser does not round every decimal correctly (1310.5e075 written and read again is
// not the same double; docs/fuzzing.md, finding 6). Every other kind compares exactly.
inline bool same_json(const boost::json::value& a, const boost::json::value& b) {
  if (a.is_double() && b.is_double()) {
    const double x = a.get_double();
    const double y = b.get_double();
    const double scale = std::max(std::abs(x), std::abs(y));
    return x == y || std::abs(x - y) <= 8 * std::numeric_limits<double>::epsilon() * scale;
  }
  if (a.kind() != b.kind()) return false;
  if (const auto* x = a.if_array()) {
    const auto& y = b.get_array();
    return x->size() == y.size() && std::equal(x->begin(), x->end(), y.begin(), same_json);
  }
  if (const auto* x = a.if_object()) {
    const auto& y = b.get_object();
    if (x->size() != y.size()) return false;
    return std::all_of(x->begin(), x->end(), [&y](const auto& kv) {
      const auto* other = y.if_contains(kv.key());
      return other != nullptr && same_json(kv.value(), *other);
    });
  }
  return a == b;
}

}  // namespace qb_fuzz
