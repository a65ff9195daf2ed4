// Lets Catch print broker::Result values: "value" or the error's description.
#pragma once

#include <catch2/catch.hpp>
#include <string>

#include "broker/core/error.hpp"

namespace Catch {
template <class T>
struct StringMaker<boost::system::result<T, broker::Error>> {
  static std::string convert(const boost::system::result<T, broker::Error>& r) {
    return r.has_value() ? std::string("value") : "error: " + r.error().describe();
  }
};
}  // namespace Catch
