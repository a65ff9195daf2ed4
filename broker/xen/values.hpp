// What the broker reads from xenstore values, parsed with no I/O (and fuzzed on its own,
// tests/fuzz/xenstore_fuzz.cpp): a guest can write beneath its own /local/domain/<domid>, so these
// are input from the guest.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string_view>

#include "broker/core/error.hpp"

namespace broker::xen {

enum class GuestType { hvm, pv };
std::string_view to_string(GuestType t);
// "hvm" or "pv"; anything else is invalid_argument naming the field xen.type.
Result<GuestType> parse_guest_type(std::string_view s);

// A decimal number with no sign, space or leading zero, as libxl writes it, that fits the type;
// nullopt for anything else. A value that parses prints back as itself (std::to_string).
std::optional<uid_t> parse_uid(std::string_view s);
std::optional<pid_t> parse_pid(std::string_view s);
std::optional<std::uint32_t> parse_domid(std::string_view s);

}  // namespace broker::xen
