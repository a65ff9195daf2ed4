// Lifecycle error codes: one per refusal and one per syscall of the spawn steps, so a failed start
// names the step and the call that failed (docs/lifecycle.md lists them in the same order).
#pragma once

#include <system_error>

namespace broker::lifecycle {

enum class errc {
  ok = 0,
  invalid_spec,       // a field of the domain spec is out of range or malformed
  invalid_uid_range,  // base 0, overflow, or a uid in the range belongs to a real user
  uid_exhausted,      // every uid of the range is in use or quarantined
  uid_quarantined,    // the sweep left processes running under the uid
  kill_failed,        // the reaper could not kill as the uid (never retried by pid)
  survivors,          // processes of the uid are still alive after the kill
  // Spawn steps, in order, one code per syscall that can fail (broker/lifecycle/spawner.cpp).
  step_clone,               // clone: clone3 with namespaces, cgroup and pidfd
  step_lift_fds,            // lift_fds: fcntl(F_DUPFD_CLOEXEC)
  step_close_range,         // close_fds: close_range
  step_open_null,           // stdio: open("/dev/null")
  step_dup_stdio,           // stdio: dup2 onto stdout and stderr
  step_dup_pass,            // place_fds: dup2 onto 3, 4, ...
  step_mount_private,       // mount_private: mount(MS_REC | MS_PRIVATE)
  step_mount_tmpfs,         // mount_tmpfs: mount("tmpfs")
  step_mkdir,               // populate_root: mkdir of a mount point
  step_create_file,         // populate_root: open(O_CREAT) of a file mount point
  step_bind_ro,             // populate_root: mount(MS_BIND) of a read-only directory or file
  step_remount_bind_ro,     // populate_root: mount_setattr(AT_RECURSIVE, RDONLY...) of that bind
  step_bind_dev,            // populate_root: mount(MS_BIND) of a device node
  step_remount_bind_dev,    // populate_root: read-only, nosuid, noexec remount of that bind
  step_symlink,             // populate_root: symlink
  step_move_mount,          // populate_root: move_mount of a boot-file mount
  step_remount_root_ro,     // seal_root: mount(MS_REMOUNT | MS_RDONLY) of the tmpfs
  step_chdir_jail,          // pivot_root: chdir into the tmpfs
  step_pivot_root,          // pivot_root: pivot_root(".", ".")
  step_umount_old_root,     // pivot_root: umount2(MNT_DETACH) of the old root
  step_chdir_root,          // pivot_root: chdir("/")
  step_open_jail_null,      // jail_stdio: open("/dev/null") inside the jail
  step_dup_jail_null,       // jail_stdio: dup2 onto stdin (and stdout, stderr without a log)
  step_setrlimit_fsize,     // rlimits: setrlimit(RLIMIT_FSIZE)
  step_setrlimit_core,      // rlimits: setrlimit(RLIMIT_CORE)
  step_setrlimit_msgqueue,  // rlimits: setrlimit(RLIMIT_MSGQUEUE)
  step_setrlimit_locks,     // rlimits: setrlimit(RLIMIT_LOCKS)
  step_setrlimit_memlock,   // rlimits: setrlimit(RLIMIT_MEMLOCK)
  step_setrlimit_nproc,     // rlimits: setrlimit(RLIMIT_NPROC)
  step_setrlimit_nofile,    // rlimits: setrlimit(RLIMIT_NOFILE)
  step_cgroup_namespace,    // cgroup_namespace: unshare(CLONE_NEWCGROUP)
  step_drop_bounding,       // capabilities: prctl(PR_CAPBSET_DROP)
  step_clear_ambient,       // capabilities: prctl(PR_CAP_AMBIENT_CLEAR_ALL)
  step_clear_inheritable,   // capabilities: capset with an empty inheritable set
  step_setgroups,           // credentials: setgroups
  step_setresgid,           // credentials: setresgid
  step_setresuid,           // credentials: setresuid
  step_no_new_privs,        // no_new_privs: prctl(PR_SET_NO_NEW_PRIVS)
  step_pdeathsig,           // no_new_privs: prctl(PR_SET_PDEATHSIG)
  step_exec,                // exec: execve
  child_died,               // the child exited before exec without reporting a step
  cgroup_unavailable,
};
// How many enumerators errc has: they run from 0 to the one named here, which must stay the
// last (tests/api/http_errors_test.cpp fails to compile otherwise).
inline constexpr int kErrcCount = static_cast<int>(errc::cgroup_unavailable) + 1;

const std::error_category& category() noexcept;
inline std::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), category()};
}

}  // namespace broker::lifecycle

template <>
struct std::is_error_code_enum<broker::lifecycle::errc> : std::true_type {};
