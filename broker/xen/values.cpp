#include "broker/xen/values.hpp"

#include <charconv>
#include <string>
#include <system_error>

namespace broker::xen {
namespace {

template <class T>
std::optional<T> parse_decimal(std::string_view s) {
  T v{};
  if (s.empty() || (s.size() > 1 && s[0] == '0') || s[0] == '-' || s[0] == '+') return std::nullopt;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size()) return std::nullopt;
  return v;
}

}  // namespace

std::optional<uid_t> parse_uid(std::string_view s) { return parse_decimal<uid_t>(s); }
std::optional<pid_t> parse_pid(std::string_view s) { return parse_decimal<pid_t>(s); }
std::optional<std::uint32_t> parse_domid(std::string_view s) {
  return parse_decimal<std::uint32_t>(s);
}

std::string_view to_string(GuestType t) { return t == GuestType::pv ? "pv" : "hvm"; }

Result<GuestType> parse_guest_type(std::string_view s) {
  if (s == "hvm") return GuestType::hvm;
  if (s == "pv") return GuestType::pv;
  Error e(std::make_error_code(std::errc::invalid_argument),
          "xen.type must be \"hvm\" or \"pv\", not \"" + std::string(s) + "\"");
  e.field = "xen.type";
  return e;
}

}  // namespace broker::xen
