#include "qmp/error.hpp"

#include <stdexcept>

namespace qmp {
namespace {

class Category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "qmp"; }
  std::string message(int v) const override {
    switch (static_cast<errc>(v)) {
      case errc::ok:
        return "success";
      case errc::line_too_long:
        return "QMP line too long";
      case errc::too_deep:
        return "QMP message nested too deeply";
      case errc::invalid_json:
        return "QMP message is not valid JSON or UTF-8";
      case errc::message_too_large:
        return "QMP message too large";
      case errc::unexpected_message:
        return "not a QMP message";
      case errc::unexpected_fds:
        return "QMP peer sent file descriptors";
      case errc::no_greeting:
        return "no QMP greeting";
      case errc::negotiation_failed:
        return "QMP capabilities negotiation failed";
      case errc::disconnected:
        return "QMP connection lost";
      case errc::io_error:
        return "QMP socket error";
      case errc::bad_socket:
        return "not a connected Unix stream socket";
      case errc::unresponsive:
        return "QEMU stopped answering QMP commands";
      case errc::command_failed:
        return "QMP command failed";
      case errc::timeout:
        return "QMP command timed out";
      case errc::cancelled:
        return "QMP wait cancelled";
      case errc::closed:
        return "QMP client closed";
      case errc::invalid_command:
        return "QMP command cannot be encoded";
      case errc::bad_reply:
        return "unexpected QMP reply";
      case errc::busy:
        return "QMP event subscription already has a waiter";
    }
    return "unknown qmp error";
  }
};

}  // namespace

const std::error_category& category() noexcept {
  static const Category c;
  return c;
}

Error Error::with_context(std::string_view context) const {
  Error e = *this;
  e.message = std::string(context) + ": " + message;
  return e;
}

void throw_exception_from_error(const Error& e, const boost::source_location&) {
  throw std::system_error(e.code, e.message);
}

}  // namespace qmp
