#include "broker/lifecycle/errc.hpp"

#include <string>

namespace broker::lifecycle {
namespace {

class Category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "lifecycle"; }
  std::string message(int ev) const override {
    // No default: -Wswitch flags a code without a message. A spawn-step message names the step
    // (as spawner.cpp and docs/lifecycle.md do) and the call that failed.
    switch (static_cast<errc>(ev)) {
      case errc::ok: return "success";
      case errc::invalid_spec: return "invalid domain spec";
      case errc::invalid_uid_range: return "invalid uid range";
      case errc::uid_exhausted: return "no free uid in the range";
      case errc::uid_quarantined: return "uid quarantined: processes survived the sweep";
      case errc::kill_failed: return "kill by uid failed";
      case errc::survivors: return "processes of the uid survived the kill";
      case errc::step_clone: return "spawn step 'clone': clone3 failed";
      case errc::step_lift_fds: return "spawn step 'lift_fds': fcntl(F_DUPFD_CLOEXEC) failed";
      case errc::step_close_range: return "spawn step 'close_fds': close_range failed";
      case errc::step_open_null: return "spawn step 'stdio': open(/dev/null) failed";
      case errc::step_dup_stdio: return "spawn step 'stdio': dup2 onto stdout/stderr failed";
      case errc::step_dup_pass:
        return "spawn step 'place_fds': dup2 onto a passed fd's number failed";
      case errc::step_mount_private: return "spawn step 'mount_private': mount(MS_PRIVATE) failed";
      case errc::step_mount_tmpfs: return "spawn step 'mount_tmpfs': mount(tmpfs) failed";
      case errc::step_mkdir: return "spawn step 'populate_root': mkdir failed";
      case errc::step_create_file: return "spawn step 'populate_root': open(O_CREAT) failed";
      case errc::step_bind_ro: return "spawn step 'populate_root': read-only bind mount failed";
      case errc::step_remount_bind_ro:
        return "spawn step 'populate_root': making a bind read-only (recursively) failed";
      case errc::step_bind_dev: return "spawn step 'populate_root': device bind mount failed";
      case errc::step_remount_bind_dev:
        return "spawn step 'populate_root': read-only/nosuid/noexec remount of a device bind failed";
      case errc::step_symlink: return "spawn step 'populate_root': symlink failed";
      case errc::step_move_mount: return "spawn step 'populate_root': move_mount failed";
      case errc::step_remount_root_ro: return "spawn step 'seal_root': read-only remount failed";
      case errc::step_chdir_jail: return "spawn step 'pivot_root': chdir into the jail failed";
      case errc::step_pivot_root: return "spawn step 'pivot_root': pivot_root failed";
      case errc::step_umount_old_root:
        return "spawn step 'pivot_root': umount2 of the old root failed";
      case errc::step_chdir_root: return "spawn step 'pivot_root': chdir(/) failed";
      case errc::step_open_jail_null: return "spawn step 'jail_stdio': open(/dev/null) failed";
      case errc::step_dup_jail_null: return "spawn step 'jail_stdio': dup2 failed";
      case errc::step_setrlimit_fsize:
        return "spawn step 'rlimits': setrlimit(RLIMIT_FSIZE) failed";
      case errc::step_setrlimit_core: return "spawn step 'rlimits': setrlimit(RLIMIT_CORE) failed";
      case errc::step_setrlimit_msgqueue:
        return "spawn step 'rlimits': setrlimit(RLIMIT_MSGQUEUE) failed";
      case errc::step_setrlimit_locks:
        return "spawn step 'rlimits': setrlimit(RLIMIT_LOCKS) failed";
      case errc::step_setrlimit_memlock:
        return "spawn step 'rlimits': setrlimit(RLIMIT_MEMLOCK) failed";
      case errc::step_setrlimit_nproc:
        return "spawn step 'rlimits': setrlimit(RLIMIT_NPROC) failed";
      case errc::step_setrlimit_nofile:
        return "spawn step 'rlimits': setrlimit(RLIMIT_NOFILE) failed";
      case errc::step_cgroup_namespace:
        return "spawn step 'cgroup_namespace': unshare(CLONE_NEWCGROUP) failed";
      case errc::step_drop_bounding:
        return "spawn step 'capabilities': prctl(PR_CAPBSET_DROP) failed";
      case errc::step_clear_ambient:
        return "spawn step 'capabilities': clearing the ambient set failed";
      case errc::step_clear_inheritable:
        return "spawn step 'capabilities': clearing the inheritable set failed";
      case errc::step_setgroups: return "spawn step 'credentials': setgroups failed";
      case errc::step_setresgid: return "spawn step 'credentials': setresgid failed";
      case errc::step_setresuid: return "spawn step 'credentials': setresuid failed";
      case errc::step_no_new_privs:
        return "spawn step 'no_new_privs': prctl(PR_SET_NO_NEW_PRIVS) failed";
      case errc::step_pdeathsig: return "spawn step 'no_new_privs': prctl(PR_SET_PDEATHSIG) failed";
      case errc::step_exec: return "spawn step 'exec': execve failed";
      case errc::child_died: return "the jailed child died before exec without naming a step";
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
