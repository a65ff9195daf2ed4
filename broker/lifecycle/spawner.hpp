// Starting a process in a jail, in ordered, named steps (docs/lifecycle.md has the same list, and
// each syscall of a step has its own lifecycle::errc):
//
//   clone          clone3 with new mount, IPC, network, UTS and pid namespaces, straight into the
//                  domain's cgroup, returning a pidfd: the child never exists outside any of them.
//   lift_fds       every fd the child keeps is moved above the numbers the passed fds end up at.
//   close_fds      close_range on everything else.
//   stdio          stdin /dev/null, stdout and stderr the log (or /dev/null).
//   place_fds      the allow-listed fds at 3, 4, ...
//   reset_signals  empty signal mask, default dispositions.
//   mount_private  cut mount propagation, so nothing done here reaches the host.
//   mount_tmpfs    a small tmpfs on the jail mount point.
//   populate_root  read-only binds of what the binary needs, the device nodes it may open,
//                  links, and the broker-opened boot files mounted from their fds (no path).
//   seal_root      the tmpfs made read-only.
//   pivot_root     into the tmpfs; the old root is detached, so no host path is reachable.
//   jail_stdio     stdin (and stdout, stderr without a log) re-opened on the jail's /dev/null.
//   rlimits        FSIZE, CORE, MSGQUEUE, LOCKS, MEMLOCK, NPROC, NOFILE.
//   credentials    setgroups, setresgid, setresuid: every object above was made with the
//                  broker's credentials, and the domain's are applied last (seed 003).
//   no_new_privs   PR_SET_NO_NEW_PRIVS, then PR_SET_PDEATHSIG (a uid change clears it).
//   exec           execve with an empty environment.
//
// The child runs only async-signal-safe code: everything it needs is prepared by the parent.
// A failed step reports {step, errno} over a close-on-exec pipe; a successful exec closes it.
// spawn_jailed returns that as an Error whose code is the step's errc and whose message names
// the step, the call and errno.
#pragma once

#include <sys/resource.h>
#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

#include "broker/core/error.hpp"
#include "fdpass/unique_fd.hpp"

namespace broker::lifecycle {

struct JailLayout {
  // An empty host directory used as the jail's mount point. Mounts made on it are private to the
  // child's mount namespace, so every jail can share one.
  std::string mountpoint;
  // Every mount in the jail is read-only and nosuid; all but the device binds are nodev, and all
  // but ro_dirs (which hold QEMU's binary and libraries) are noexec.
  std::vector<std::string> ro_dirs;   // host directories bound read-only at the same path,
                                      // with every mount below them (ro, nosuid, nodev)
  std::vector<std::string> ro_data_dirs;  // the same, and noexec: data QEMU reads (firmware)
  std::vector<std::string> ro_files;  // host files bound at the same path (ro, nosuid, nodev, noexec)
  std::vector<std::string> devices;   // host device nodes bound (ro, nosuid, noexec; QEMU can
                                      // still write to the device itself)
  // Device nodes bound at another path: {host node, jail path}. The broker's private copies of
  // a node (Xen's, owned by the domain uid) are bound this way.
  std::vector<std::pair<std::string, std::string>> device_binds;
  std::vector<std::pair<std::string, std::string>> symlinks;  // {jail path, target}
  // Detached read-only mounts (see detached_mount) and the jail path they appear at.
  std::vector<std::pair<fdpass::BorrowedFd, std::string>> fd_mounts;
};

struct JailLimits {
  // No file-size limit: QEMU cannot create a file (the jail is empty and read-only), and the
  // kernel applies RLIMIT_FSIZE to every write past the limit, so any limit would fail guest
  // writes (and migration streams) beyond that offset of the images the broker passes.
  rlim_t fsize = RLIM_INFINITY;
  rlim_t nproc = 256;        // threads count here: QEMU runs a thread pool
  rlim_t nofile = 1024;
};

struct SpawnRequest {
  std::string executable;                 // path inside the jail
  std::vector<std::string> argv;          // argv[0] included
  std::vector<fdpass::BorrowedFd> pass;   // become fds 3, 4, ... in the child
  fdpass::BorrowedFd output;              // stdout and stderr; invalid: /dev/null
  JailLayout jail;
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;
  JailLimits limits;
  int pdeathsig = 0;                      // 0: none (the daemon wants QEMU to outlive a restart)
  fdpass::BorrowedFd cgroup;              // invalid: no cgroup
  // From clone to exec. A child that has neither exec'd nor reported a failed step by then is
  // killed by pidfd and reaped, so one stuck jail set-up cannot hold a lifecycle thread. The
  // error names the step it was in and where /proc saw it wait. Generous: the set-up takes
  // milliseconds, but a loaded host can hold mount-namespace work up for seconds.
  std::chrono::milliseconds exec_deadline{30'000};
};

struct SpawnedChild {
  pid_t pid = 0;
  fdpass::UniqueFd pidfd;
};

Result<SpawnedChild> spawn_jailed(const SpawnRequest& request);

// A detached, read-only, nosuid, nodev, noexec bind mount of exactly the object `file` refers
// to (open_tree(OPEN_TREE_CLONE)). Mounted in the jail with move_mount, it lets QEMU open a boot
// file by a jail-local name while the broker decided which inode that name is.
Result<fdpass::UniqueFd> detached_mount(fdpass::BorrowedFd file);

// The default jail contents for a QEMU binary on a merged-/usr Debian system.
JailLayout default_qemu_layout(const std::string& mountpoint, bool with_kvm);

}  // namespace broker::lifecycle
