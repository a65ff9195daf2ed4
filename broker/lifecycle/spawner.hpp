// Starting a process in a jail, in ordered, named steps (docs/lifecycle.md):
//
//   clone        clone3 with new mount, IPC, network, UTS and pid namespaces, straight into the
//                domain's cgroup, returning a pidfd. Doing all of this in one syscall leaves no
//                moment in which the child exists outside its namespaces or its cgroup.
//   sanitize     keep only the allow-listed fds (placed at 3, 4, ...), stdio to /dev/null and the
//                log, default signal dispositions, an empty environment.
//   mount-private  cut mount propagation, so nothing done here reaches the host.
//   root         a small tmpfs with read-only binds of what the binary needs, the device nodes it
//                may open, and the broker-opened boot files mounted from their fds (no path).
//   pivot-root   into the tmpfs; the old root is detached, so no host path is reachable.
//   rlimits      FSIZE, CORE, MSGQUEUE, LOCKS, MEMLOCK, NPROC, NOFILE.
//   credentials  setgroups, setresgid, setresuid: every object above was made with the broker's
//                credentials, and the domain's are applied last (seed 003).
//   no-new-privs PR_SET_NO_NEW_PRIVS, then PR_SET_PDEATHSIG (a uid change clears it).
//   exec
//
// The child runs only async-signal-safe code: everything it needs is prepared by the parent.
// A failed step reports {step, errno} over a close-on-exec pipe; a successful exec closes it.
#pragma once

#include <sys/resource.h>
#include <sys/types.h>

#include <string>
#include <vector>

#include "broker/core/error.hpp"
#include "fdpass/unique_fd.hpp"

namespace broker::lifecycle {

struct JailLayout {
  // An empty host directory used as the jail's mount point. Mounts made on it are private to the
  // child's mount namespace, so every jail can share one.
  std::string mountpoint;
  std::vector<std::string> ro_dirs;   // host directories bound read-only at the same path
  std::vector<std::string> ro_files;  // host files bound read-only at the same path
  std::vector<std::string> devices;   // host device nodes bound (read-write, nosuid, noexec)
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
