// qmp errors: one errc enum and one error value for everything the QMP layer can report.
//
// An Error carries a code (always qmp::category()), a human-readable message with context
// ("blockdev-del: Node 'x' not found"), and, when QEMU answered with an error, the
// QMP `class` and `desc` verbatim so the HTTP layer can pass them to the user unchanged.
// Results are boost::system::result<T, qmp::Error>; failures are values, never exceptions.
#pragma once

#include <boost/assert/source_location.hpp>
#include <boost/system/result.hpp>
#include <string>
#include <system_error>
#include <utility>

namespace qmp {

enum class errc {
  ok = 0,
  // Connection errors: the peer broke the protocol or went away. The connection is closed.
  line_too_long,       // a line exceeded Limits::max_line
  too_deep,            // JSON nesting exceeded Limits::max_depth
  invalid_json,        // not JSON, or not valid UTF-8
  message_too_large,   // the parsed message exceeded Limits::max_message_memory
  unexpected_message,  // valid JSON, but not a QMP greeting, reply or event
  unexpected_fds,      // the peer attached more fds to a message than Limits::max_fds
  no_greeting,         // the first message was not a greeting, or none came in time
  negotiation_failed,  // qmp_capabilities was refused
  disconnected,        // the connection ended (peer closed, I/O error, protocol error)
  io_error,            // a socket call failed
  bad_socket,          // the fd given to connect() is not a connected Unix stream socket
  unresponsive,        // more commands went unanswered than ClientOptions::max_abandoned
  // Command errors: this command failed; the connection is still usable.
  command_failed,   // QEMU answered with an error (qmp_class / qmp_desc are set)
  timeout,          // the deadline passed before the reply came
  cancelled,        // the caller cancelled the wait
  closed,           // the client was closed locally
  invalid_command,  // the command cannot be encoded (bad name, nesting, invalid UTF-8)
  bad_reply,        // a reply did not have the shape a typed decoder expects
  busy,             // a subscription already has a waiter
};
// How many enumerators errc has: they run from 0 to the one named here, which must stay the
// last (tests/api/http_errors_test.cpp fails to compile otherwise).
inline constexpr int kErrcCount = static_cast<int>(errc::busy) + 1;

const std::error_category& category() noexcept;

inline std::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), category()};
}

struct Error {
  std::error_code code;
  std::string message;    // context + details, for logs and users
  std::string qmp_class;  // QMP error class when QEMU answered with an error, else empty
  std::string qmp_desc;   // QMP error description, verbatim

  Error() = default;
  Error(errc e, std::string msg) : code(make_error_code(e)), message(std::move(msg)) {}
  Error(errc e, std::string msg, std::string cls, std::string desc)
      : code(make_error_code(e)),
        message(std::move(msg)),
        qmp_class(std::move(cls)),
        qmp_desc(std::move(desc)) {}

  bool is(errc e) const noexcept { return code == make_error_code(e); }
  // The same error with `context` prepended to the message ("blockdev-add: ...").
  Error with_context(std::string_view context) const;
};

template <class T>
using Result = boost::system::result<T, Error>;

// boost::system::result calls this (found by ADL) when value() is used on an error. Using
// value() on a failed result is a bug, so it throws std::system_error with the message.
[[noreturn]] void throw_exception_from_error(const Error& e, const boost::source_location& loc);

}  // namespace qmp

template <>
struct std::is_error_code_enum<qmp::errc> : std::true_type {};
