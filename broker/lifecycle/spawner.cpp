#include "broker/lifecycle/spawner.hpp"

#include <fcntl.h>
#include <linux/mount.h>
#include <linux/sched.h>
#include <grp.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "broker/lifecycle/errc.hpp"
#include "fdpass/devices.hpp"

namespace broker::lifecycle {
namespace {

struct StepReport {
  int step;
  int err;
};

// One operation of the root step, prepared by the parent so the child only makes syscalls.
struct RootOp {
  enum Kind { mkdir_, touch, bind_ro, bind_dev, symlink_, move_mount_ } kind;
  std::string a;  // target (jail side, absolute host path under the mount point)
  std::string b;  // source host path, or symlink target
  int fd = -1;
};

[[noreturn]] void fail(int report_fd, errc step) {
  StepReport r{static_cast<int>(step), errno};
  [[maybe_unused]] auto n = ::write(report_fd, &r, sizeof(r));
  ::_exit(127);
}

bool run_root_op(const RootOp& op) {
  switch (op.kind) {
    case RootOp::mkdir_:
      return ::mkdir(op.a.c_str(), 0755) == 0 || errno == EEXIST;
    case RootOp::touch: {
      int fd = ::open(op.a.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0444);
      if (fd < 0) return false;
      ::close(fd);
      return true;
    }
    case RootOp::bind_ro:
      return ::mount(op.b.c_str(), op.a.c_str(), nullptr, MS_BIND | MS_REC, nullptr) == 0 &&
             ::mount(nullptr, op.a.c_str(), nullptr,
                     MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, nullptr) == 0;
    case RootOp::bind_dev:
      return ::mount(op.b.c_str(), op.a.c_str(), nullptr, MS_BIND, nullptr) == 0 &&
             ::mount(nullptr, op.a.c_str(), nullptr, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NOEXEC,
                     nullptr) == 0;
    case RootOp::symlink_:
      return ::symlink(op.b.c_str(), op.a.c_str()) == 0;
    case RootOp::move_mount_:
      return ::syscall(SYS_move_mount, op.fd, "", AT_FDCWD, op.a.c_str(),
                       MOVE_MOUNT_F_EMPTY_PATH) == 0;
  }
  return false;
}

// Parents of `path` (relative to the jail, e.g. "boot/kernel") as mkdir ops, outermost first.
void add_parents(std::vector<RootOp>& ops, const std::string& mp, const std::string& path) {
  for (std::size_t pos = path.find('/', 1); pos != std::string::npos; pos = path.find('/', pos + 1)) {
    ops.push_back({RootOp::mkdir_, mp + path.substr(0, pos), {}, -1});
  }
}

std::vector<RootOp> plan_root(const JailLayout& j) {
  std::vector<RootOp> ops;
  const std::string& mp = j.mountpoint;
  for (const auto& d : j.ro_dirs) {
    add_parents(ops, mp, d);
    ops.push_back({RootOp::mkdir_, mp + d, {}, -1});
    ops.push_back({RootOp::bind_ro, mp + d, d, -1});
  }
  for (const auto& f : j.ro_files) {
    add_parents(ops, mp, f);
    ops.push_back({RootOp::touch, mp + f, {}, -1});
    ops.push_back({RootOp::bind_ro, mp + f, f, -1});
  }
  for (const auto& dev : j.devices) {
    add_parents(ops, mp, dev);
    ops.push_back({RootOp::touch, mp + dev, {}, -1});
    ops.push_back({RootOp::bind_dev, mp + dev, dev, -1});
  }
  for (const auto& [link, target] : j.symlinks) {
    add_parents(ops, mp, link);
    ops.push_back({RootOp::symlink_, mp + link, target, -1});
  }
  for (const auto& [fd, target] : j.fd_mounts) {
    add_parents(ops, mp, target);
    ops.push_back({RootOp::touch, mp + target, {}, -1});
    ops.push_back({RootOp::move_mount_, mp + target, {}, fd.get()});
  }
  return ops;
}

// Closes every fd except those in `keep` (sorted, unique).
void close_all_but(const int* keep, std::size_t n) {
  unsigned from = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (static_cast<unsigned>(keep[i]) > from) {
      ::syscall(SYS_close_range, from, static_cast<unsigned>(keep[i]) - 1, 0);
    }
    from = static_cast<unsigned>(keep[i]) + 1;
  }
  ::syscall(SYS_close_range, from, ~0U, 0);
}

[[noreturn]] void child_main(const SpawnRequest& req, const std::vector<RootOp>& root_ops,
                             const std::vector<char*>& argv, int report_fd) {
  // sanitize: move every fd we need above all the numbers they will end up at, close the rest,
  // then place them. F_DUPFD_CLOEXEC leaves the high copies close-on-exec.
  const int npass = static_cast<int>(req.pass.size());
  int floor = 3 + npass;
  int high_report = ::fcntl(report_fd, F_DUPFD_CLOEXEC, floor);
  if (high_report < 0) fail(report_fd, errc::step_sanitize);
  report_fd = high_report;
  int keep[64 + 8];
  std::size_t nkeep = 0;
  keep[nkeep++] = report_fd;
  int high_pass[64];
  if (npass > 64 || req.jail.fd_mounts.size() > 8) fail(report_fd, errc::step_sanitize);
  for (int i = 0; i < npass; ++i) {
    high_pass[i] = ::fcntl(req.pass[i].get(), F_DUPFD_CLOEXEC, floor);
    if (high_pass[i] < 0) fail(report_fd, errc::step_sanitize);
    keep[nkeep++] = high_pass[i];
  }
  int high_out = -1;
  if (req.output.valid()) {
    high_out = ::fcntl(req.output.get(), F_DUPFD_CLOEXEC, floor);
    if (high_out < 0) fail(report_fd, errc::step_sanitize);
    keep[nkeep++] = high_out;
  }
  // Mount fds stay at their numbers: the root ops refer to them. Move them up too.
  int mount_fd_map[8][2];
  std::size_t nmounts = req.jail.fd_mounts.size();
  for (std::size_t i = 0; i < nmounts; ++i) {
    mount_fd_map[i][0] = req.jail.fd_mounts[i].first.get();
    mount_fd_map[i][1] = ::fcntl(mount_fd_map[i][0], F_DUPFD_CLOEXEC, floor);
    if (mount_fd_map[i][1] < 0) fail(report_fd, errc::step_sanitize);
    keep[nkeep++] = mount_fd_map[i][1];
  }
  std::sort(keep, keep + nkeep);
  close_all_but(keep, nkeep);
  int null_fd = ::open("/dev/null", O_RDWR);  // lowest free: 0
  if (null_fd != 0) fail(report_fd, errc::step_sanitize);
  int out = high_out >= 0 ? high_out : null_fd;
  if (::dup2(out, 1) != 1 || ::dup2(out, 2) != 2) fail(report_fd, errc::step_sanitize);
  for (int i = 0; i < npass; ++i) {
    // dup2 clears close-on-exec on the new number: these are the fds QEMU inherits.
    if (::dup2(high_pass[i], 3 + i) != 3 + i) fail(report_fd, errc::step_sanitize);
    ::close(high_pass[i]);
  }
  if (high_out >= 0) ::close(high_out);
  sigset_t all;
  sigemptyset(&all);
  ::sigprocmask(SIG_SETMASK, &all, nullptr);
  for (int sig = 1; sig < NSIG; ++sig) ::signal(sig, SIG_DFL);  // fails harmlessly for KILL/STOP

  // mount-private: nothing below propagates to the host's mount namespace.
  if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
    fail(report_fd, errc::step_mount_private);
  }

  // root
  const char* mp = req.jail.mountpoint.c_str();
  if (::mount("qbroker-jail", mp, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
              "mode=0755,size=64k,nr_inodes=512") != 0) {
    fail(report_fd, errc::step_root);
  }
  for (const auto& op : root_ops) {
    if (op.kind == RootOp::move_mount_) {
      for (std::size_t i = 0; i < nmounts; ++i) {
        if (mount_fd_map[i][0] == op.fd) {
          if (::syscall(SYS_move_mount, mount_fd_map[i][1], "", AT_FDCWD, op.a.c_str(),
                        MOVE_MOUNT_F_EMPTY_PATH) != 0) {
            fail(report_fd, errc::step_root);
          }
          ::close(mount_fd_map[i][1]);
        }
      }
      continue;
    }
    if (!run_root_op(op)) fail(report_fd, errc::step_root);
  }
  if (::mount(nullptr, mp, nullptr, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
              nullptr) != 0) {
    fail(report_fd, errc::step_root);
  }

  // pivot-root: the tmpfs becomes "/", the old root is stacked under it and then detached.
  if (::chdir(mp) != 0 || ::syscall(SYS_pivot_root, ".", ".") != 0 ||
      ::umount2(".", MNT_DETACH) != 0 || ::chdir("/") != 0) {
    fail(report_fd, errc::step_pivot_root);
  }
  // Re-point stdio at the jail's own /dev/null: the host's is no longer reachable by path.
  int jail_null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (jail_null < 0 || ::dup2(jail_null, 0) != 0 ||
      (high_out < 0 && (::dup2(jail_null, 1) != 1 || ::dup2(jail_null, 2) != 2))) {
    fail(report_fd, errc::step_pivot_root);
  }
  ::close(jail_null);

  // rlimits: lowered while still root; the uid change below keeps them.
  const struct {
    int resource;
    rlim_t value;
  } limits[] = {{RLIMIT_FSIZE, req.limits.fsize}, {RLIMIT_CORE, 0},    {RLIMIT_MSGQUEUE, 0},
                {RLIMIT_LOCKS, 0},                {RLIMIT_MEMLOCK, 0}, {RLIMIT_NPROC, req.limits.nproc},
                {RLIMIT_NOFILE, req.limits.nofile}};
  for (const auto& l : limits) {
    rlimit r{l.value, l.value};
    if (::setrlimit(l.resource, &r) != 0) fail(report_fd, errc::step_rlimits);
  }

  // credentials: groups first (needs root), then gid, then uid (after which nothing is allowed).
  if (::setgroups(req.groups.size(), req.groups.data()) != 0 ||
      ::setresgid(req.gid, req.gid, req.gid) != 0 || ::setresuid(req.uid, req.uid, req.uid) != 0) {
    fail(report_fd, errc::step_credentials);
  }

  // no-new-privs, and the parent-death signal, which the uid change above would have cleared.
  if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
      (req.pdeathsig != 0 && ::prctl(PR_SET_PDEATHSIG, req.pdeathsig, 0, 0, 0) != 0)) {
    fail(report_fd, errc::step_no_new_privs);
  }

  char* const envp[] = {nullptr};
  ::execve(req.executable.c_str(), argv.data(), envp);
  fail(report_fd, errc::step_exec);
}

}  // namespace

Result<fdpass::UniqueFd> detached_mount(fdpass::BorrowedFd file) {
  fdpass::UniqueFd tree(static_cast<int>(
      ::syscall(SYS_open_tree, file.get(), "", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH)));
  if (!tree) return make_error({errno, std::system_category()}, "open_tree");
  mount_attr attr{};
  attr.attr_set = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC;
  if (::syscall(SYS_mount_setattr, tree.get(), "", AT_EMPTY_PATH, &attr, sizeof(attr)) != 0) {
    return make_error({errno, std::system_category()}, "mount_setattr");
  }
  return tree;
}

JailLayout default_qemu_layout(const std::string& mountpoint, bool with_kvm) {
  JailLayout j;
  j.mountpoint = mountpoint;
  // QEMU's libraries, firmware and keymaps all live under /usr on a merged-/usr system.
  j.ro_dirs = {"/usr"};
  j.ro_files = {"/etc/ld.so.cache"};
  // /dev/null must exist or QEMU silently disables image locking.
  j.devices = {"/dev/null", "/dev/zero", "/dev/urandom"};
  if (with_kvm) j.devices.push_back("/dev/kvm");
  j.symlinks = {{"/lib", "usr/lib"}, {"/lib64", "usr/lib64"}, {"/bin", "usr/bin"}};
  return j;
}

Result<SpawnedChild> spawn_jailed(const SpawnRequest& req) {
  if (req.uid == 0 || req.gid == 0) {
    return Error(make_error_code(errc::invalid_spec), "refusing to run a jailed process as root");
  }
  if (req.jail.mountpoint.empty() || req.argv.empty() || req.pass.size() > 64 ||
      req.jail.fd_mounts.size() > 8) {
    return Error(make_error_code(errc::invalid_spec), "malformed spawn request");
  }
  // Everything the child touches is built here, before the clone.
  std::vector<RootOp> root_ops = plan_root(req.jail);
  std::vector<char*> argv;
  for (const auto& a : req.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);

  auto report = fdpass::make_pipe();
  if (!report) return make_error(report.error(), "spawn: report pipe");

  int pidfd = -1;
  clone_args args{};
  args.flags = CLONE_PIDFD | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWUTS |
               CLONE_NEWPID | (req.cgroup.valid() ? CLONE_INTO_CGROUP : 0);
  args.pidfd = reinterpret_cast<std::uint64_t>(&pidfd);
  args.exit_signal = SIGCHLD;
  if (req.cgroup.valid()) args.cgroup = static_cast<std::uint64_t>(req.cgroup.get());
  long pid = ::syscall(SYS_clone3, &args, sizeof(args));
  if (pid < 0) {
    Error e(make_error_code(errc::step_clone),
            std::string("clone3: ") + std::strerror(errno));
    return e;
  }
  if (pid == 0) {
    report->first.reset();
    child_main(req, root_ops, argv, report->second.get());
  }
  SpawnedChild child{static_cast<pid_t>(pid), fdpass::UniqueFd(pidfd)};
  report->second.reset();

  StepReport r{};
  ssize_t n;
  do {
    n = ::read(report->first.get(), &r, sizeof(r));
  } while (n < 0 && errno == EINTR);
  if (n == 0) return child;  // the exec closed the pipe: the child is QEMU now

  // The child failed a step and exits: reap it so nothing is left behind.
  siginfo_t info{};
  ::waitid(P_PIDFD, static_cast<id_t>(child.pidfd.get()), &info, WEXITED);
  if (n != sizeof(r)) {
    return Error(make_error_code(errc::step_exec), "spawn: child died before exec");
  }
  Error e(make_error_code(static_cast<errc>(r.step)),
          std::string(make_error_code(static_cast<errc>(r.step)).message()) + ": " +
              std::strerror(r.err));
  return e;
}

}  // namespace broker::lifecycle
