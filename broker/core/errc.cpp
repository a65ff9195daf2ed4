#include "broker/core/errc.hpp"

#include <string>

namespace broker {
namespace {

class Category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "broker"; }
  std::string message(int ev) const override {
    switch (static_cast<errc>(ev)) {
      case errc::ok: return "success";
      case errc::invalid_argument: return "invalid argument";
      case errc::not_found: return "not found";
      case errc::already_exists: return "already exists";
      case errc::busy: return "domain is busy with another job";
      case errc::wrong_state: return "domain is not in a state that allows this";
      case errc::tray_locked: return "the guest has locked the tray";
      case errc::guest_timeout: return "the guest did not respond in time";
      case errc::qemu_timeout: return "QEMU did not answer in time";
      case errc::qemu_error: return "QEMU refused the command";
      case errc::qemu_gone: return "QEMU has exited";
      case errc::not_implemented: return "not implemented";
      case errc::forbidden: return "forbidden";
      case errc::cancelled: return "the job was cancelled";
      case errc::internal: return "internal error";
    }
    return "unknown broker error";
  }
};

}  // namespace

const std::error_category& category() noexcept {
  static const Category instance;
  return instance;
}

}  // namespace broker
