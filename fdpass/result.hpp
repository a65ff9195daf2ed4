// A small value-or-error type: fdpass is libc-only, so it cannot use boost::system::result, and
// std::expected is C++23. The shape mirrors both so callers read the same way.
#pragma once

#include <cassert>
#include <system_error>
#include <utility>
#include <variant>

namespace fdpass {

template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}  // NOLINT: implicit by design
  Result(std::error_code ec) : v_(std::in_place_index<1>, ec) { assert(ec); }  // NOLINT

  bool has_value() const noexcept { return v_.index() == 0; }
  bool has_error() const noexcept { return v_.index() == 1; }
  explicit operator bool() const noexcept { return has_value(); }

  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T& operator*() & { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  std::error_code error() const noexcept {
    return has_error() ? std::get<1>(v_) : std::error_code{};
  }

 private:
  std::variant<T, std::error_code> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(std::error_code ec) : ec_(ec) {}  // NOLINT: implicit by design

  bool has_value() const noexcept { return !ec_; }
  bool has_error() const noexcept { return static_cast<bool>(ec_); }
  explicit operator bool() const noexcept { return has_value(); }
  std::error_code error() const noexcept { return ec_; }

 private:
  std::error_code ec_;
};

}  // namespace fdpass
