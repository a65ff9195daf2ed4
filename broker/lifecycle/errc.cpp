#include "broker/lifecycle/errc.hpp"

#include <string>

namespace broker::lifecycle {
namespace {

class Category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "lifecycle"; }
  std::string message(int ev) const override {
    switch (static_cast<errc>(ev)) {
      case errc::ok: return "success";
      case errc::invalid_spec: return "invalid domain spec";
      case errc::invalid_uid_range: return "invalid uid range";
      case errc::uid_exhausted: return "no free uid in the range";
      case errc::uid_quarantined: return "uid quarantined: processes survived the sweep";
      case errc::kill_failed: return "kill by uid failed";
      case errc::survivors: return "processes of the uid survived the kill";
      case errc::step_clone: return "spawn step 'clone' failed";
      case errc::step_sanitize: return "spawn step 'sanitize' failed";
      case errc::step_mount_private: return "spawn step 'mount-private' failed";
      case errc::step_root: return "spawn step 'root' failed";
      case errc::step_pivot_root: return "spawn step 'pivot-root' failed";
      case errc::step_rlimits: return "spawn step 'rlimits' failed";
      case errc::step_credentials: return "spawn step 'credentials' failed";
      case errc::step_no_new_privs: return "spawn step 'no-new-privs' failed";
      case errc::step_exec: return "spawn step 'exec' failed";
      case errc::cgroup_unavailable: return "cgroup v2 is not available";
    }
    return "unknown lifecycle error";
  }
};

}  // namespace

const std::error_category& category() noexcept {
  static const Category instance;
  return instance;
}

}  // namespace broker::lifecycle
