// Lifecycle error codes: one per refusal and one per spawn step, so a failed start names the
// step that failed (docs/lifecycle.md lists them in order).
#pragma once

#include <system_error>

namespace broker::lifecycle {

enum class errc {
  ok = 0,
  invalid_spec,          // a field of the domain spec is out of range or malformed
  invalid_uid_range,     // base 0, overflow, or a uid in the range belongs to a real user
  uid_exhausted,         // every uid of the range is in use or quarantined
  uid_quarantined,       // the sweep left processes running under the uid
  kill_failed,           // the reaper could not kill as the uid (never retried by pid)
  survivors,             // processes of the uid are still alive after the kill
  // spawn steps, in order
  step_clone,            // clone3 with namespaces, cgroup and pidfd
  step_sanitize,         // fd table reduced to the allow-list, stdio set
  step_mount_private,    // mount propagation cut from the host
  step_root,             // tmpfs root, read-only binds, /dev nodes, image mounts
  step_pivot_root,       // pivot_root into the jail, old root detached
  step_rlimits,
  step_credentials,      // setgroups, setresgid, setresuid
  step_no_new_privs,     // PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG
  step_exec,
  cgroup_unavailable,
};
// How many enumerators errc has: they run from 0 to the one named here, which must stay the
// last (tests/api/http_errors_test.cpp fails to compile otherwise).
inline constexpr int kErrcCount = static_cast<int>(errc::cgroup_unavailable) + 1;

const std::error_category& category() noexcept;
inline std::error_code make_error_code(errc e) noexcept { return {static_cast<int>(e), category()}; }

}  // namespace broker::lifecycle

template <>
struct std::is_error_code_enum<broker::lifecycle::errc> : std::true_type {};
