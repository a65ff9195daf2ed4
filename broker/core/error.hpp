// broker/core holds what every broker layer shares: this Error value, broker::errc, atomic files
// and logging.
//
// The broker's error value: a code (from any module's errc, or errno) plus the context a person
// needs ("blockdev-add cd0: ..."), and QEMU's own class/desc when QEMU refused something. The HTTP
// layer maps the code to a status in one place (broker/api/http_errors.cpp).
#pragma once

#include <boost/system/result.hpp>
#include <ostream>
#include <source_location>
#include <string>
#include <system_error>

namespace broker {

struct Error {
  std::error_code code;
  std::string message;    // context first, then the cause
  std::string qmp_class;  // set when QEMU answered with an error
  std::string qmp_desc;
  std::string field;      // set when one input field is to blame

  Error() = default;
  Error(std::error_code c, std::string msg) : code(c), message(std::move(msg)) {}

  // "context: message".
  Error& context(std::string_view what) {
    message = std::string(what) + (message.empty() ? "" : ": " + message);
    return *this;
  }
  std::string describe() const {
    return message.empty() ? code.message() : message + " (" + code.message() + ")";
  }
};

inline std::ostream& operator<<(std::ostream& os, const Error& e) { return os << e.describe(); }

[[noreturn]] void throw_exception_from_error(const Error& e, const boost::source_location& loc);

template <class T>
using Result = boost::system::result<T, Error>;

// Builds an Error from a code and a context string, with the code's own message appended.
inline Error make_error(std::error_code code, std::string_view context) {
  return Error(code, std::string(context) + ": " + code.message());
}

}  // namespace broker
