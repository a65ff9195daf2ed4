#include "broker/lifecycle/spawner.hpp"

#include <fcntl.h>
#include <linux/capability.h>
#include <linux/mount.h>
#include <linux/sched.h>
#include <grp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iterator>
#include <new>
#include <string>

#include "broker/lifecycle/errc.hpp"
#include "fdpass/devices.hpp"

namespace broker::lifecycle {
namespace {

struct StepReport {
  int step;
  int err;
};

// One operation of populate_root, prepared by the parent so the child only makes syscalls.
struct RootOp {
  enum Kind { mkdir_, touch, bind_ro, bind_ro_noexec, bind_dev, symlink_, move_mount_ } kind;
  std::string a;  // target (jail side, absolute host path under the mount point)
  std::string b;  // source host path, or symlink target
  int fd = -1;
};

// Everything the child needs, built by the parent before the clone. The child of a threaded
// process may only make async-signal-safe calls, so it allocates nothing: it makes syscalls and
// fills storage sized here, in its own copy of this memory.
struct ChildPlan {
  const SpawnRequest& req;
  std::vector<RootOp> root_ops;
  std::vector<char*> argv;
  std::vector<int> lifted_pass;  // the passed fds, lifted above their final numbers
  std::vector<int> keep;         // every fd the child holds while it closes the rest
  int report_fd = -1;
  int lifted_out = -1;  // the log, lifted; -1: stdout and stderr go to /dev/null
  // The index of the step the child is in, in memory it shares with the parent: a child that
  // hangs is reported with the step it hung in.
  std::atomic<int>* progress = nullptr;
};

// Sends {step, errno} to the parent and exits. The report is one small pipe write, so it arrives
// whole or not at all; a child that dies without it is reported as child_died.
[[noreturn]] void fail(const ChildPlan& p, errc step) {
  StepReport r{static_cast<int>(step), errno};
  [[maybe_unused]] auto n = ::write(p.report_fd, &r, sizeof(r));
  ::_exit(127);
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
  for (const auto& d : j.ro_data_dirs) {
    add_parents(ops, mp, d);
    ops.push_back({RootOp::mkdir_, mp + d, {}, -1});
    ops.push_back({RootOp::bind_ro_noexec, mp + d, d, -1});
  }
  for (const auto& f : j.ro_files) {
    add_parents(ops, mp, f);
    ops.push_back({RootOp::touch, mp + f, {}, -1});
    ops.push_back({RootOp::bind_ro_noexec, mp + f, f, -1});
  }
  for (const auto& dev : j.devices) {
    add_parents(ops, mp, dev);
    ops.push_back({RootOp::touch, mp + dev, {}, -1});
    ops.push_back({RootOp::bind_dev, mp + dev, dev, -1});
  }
  for (const auto& [host, in_jail] : j.device_binds) {
    add_parents(ops, mp, in_jail);
    ops.push_back({RootOp::touch, mp + in_jail, {}, -1});
    ops.push_back({RootOp::bind_dev, mp + in_jail, host, -1});
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

ChildPlan make_plan(const SpawnRequest& req, int report_fd) {
  ChildPlan p{req, plan_root(req.jail), {}, {}, {}, report_fd, -1};
  for (const auto& a : req.argv) p.argv.push_back(const_cast<char*>(a.c_str()));
  p.argv.push_back(nullptr);
  p.lifted_pass.resize(req.pass.size());
  p.keep.resize(1 + req.pass.size() + (req.output.valid() ? 1 : 0) + req.jail.fd_mounts.size());
  return p;
}

// The steps of a spawn, in order (docs/lifecycle.md has the same list): clone, in the parent
// (below child_main), then the child's. Each child step either succeeds or calls fail() with the
// code of the syscall that failed, errno intact.
namespace steps {

// Every fd the child keeps moves above 3 + pass.size(), so placing the passed fds at 3, 4, ...
// later never overwrites one not yet placed.
void lift_fds(ChildPlan& p) {
  const int floor = 3 + static_cast<int>(p.req.pass.size());
  std::size_t nkeep = 0;
  auto lift = [&](int fd) {
    // F_DUPFD_CLOEXEC: the lifted copies themselves never reach QEMU.
    int high = ::fcntl(fd, F_DUPFD_CLOEXEC, floor);
    if (high < 0) fail(p, errc::step_lift_fds);
    p.keep[nkeep++] = high;
    return high;
  };
  p.report_fd = lift(p.report_fd);
  for (std::size_t i = 0; i < p.req.pass.size(); ++i) p.lifted_pass[i] = lift(p.req.pass[i].get());
  if (p.req.output.valid()) p.lifted_out = lift(p.req.output.get());
  // populate_root mounts the boot files from their fds, so those are kept too.
  for (auto& op : p.root_ops) {
    if (op.kind == RootOp::move_mount_) op.fd = lift(op.fd);
  }
}

void close_fds(ChildPlan& p) {
  std::sort(p.keep.begin(), p.keep.end());
  unsigned from = 0;
  for (int fd : p.keep) {
    const auto kept = static_cast<unsigned>(fd);
    // Everything between two kept fds: an fd another broker thread opened without O_CLOEXEC
    // (or just before the clone) must not reach QEMU.
    if (kept > from && ::syscall(SYS_close_range, from, kept - 1, 0) != 0) {
      fail(p, errc::step_close_range);
    }
    from = kept + 1;
  }
  if (::syscall(SYS_close_range, from, ~0U, 0) != 0) fail(p, errc::step_close_range);
}

void stdio(ChildPlan& p) {
  // stdin reads nothing. close_fds freed 0, the lowest number, so open puts it in place.
  int null_fd = ::open("/dev/null", O_RDWR);
  if (null_fd != 0) {
    if (null_fd > 0) errno = EBADFD;  // 0 was not free: report that, not a stale errno
    fail(p, errc::step_open_null);
  }
  // stdout and stderr go to the log the broker opened, or nowhere.
  const int out = p.lifted_out >= 0 ? p.lifted_out : null_fd;
  if (::dup2(out, 1) != 1 || ::dup2(out, 2) != 2) fail(p, errc::step_dup_stdio);
  if (p.lifted_out >= 0) ::close(p.lifted_out);
}

void place_fds(ChildPlan& p) {
  for (std::size_t i = 0; i < p.lifted_pass.size(); ++i) {
    const int target = 3 + static_cast<int>(i);
    // dup2 clears close-on-exec on the new number: these are the fds QEMU inherits.
    if (::dup2(p.lifted_pass[i], target) != target) fail(p, errc::step_dup_pass);
    ::close(p.lifted_pass[i]);
  }
}

// QEMU starts with no blocked signal and default dispositions, whatever the broker had set.
// Neither call can fail here: the mask is valid, and signal refuses only KILL and STOP, which
// are always at their default.
void reset_signals() {
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  for (int sig = 1; sig < NSIG; ++sig) ::signal(sig, SIG_DFL);
}

void mount_private(ChildPlan& p) {
  // The new mount namespace copied the host's shared propagation: without this, every mount
  // below would appear on the host too.
  if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
    fail(p, errc::step_mount_private);
  }
}

void mount_tmpfs(ChildPlan& p) {
  // A fresh, tiny root holding only what populate_root puts in: nothing on it is executable,
  // set-uid or a device except through the binds.
  if (::mount("qbroker-jail", p.req.jail.mountpoint.c_str(), "tmpfs",
              MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=64k,nr_inodes=512") != 0) {
    fail(p, errc::step_mount_tmpfs);
  }
}

// One operation of populate_root; returns the code of the call that failed, errno intact.
errc run_root_op(const RootOp& op) {
  switch (op.kind) {
    case RootOp::mkdir_:
      // A mount point; EEXIST when two entries share a parent.
      return (::mkdir(op.a.c_str(), 0755) == 0 || errno == EEXIST) ? errc::ok : errc::step_mkdir;
    case RootOp::touch: {
      // A file to mount a file over: a bind needs a target of the same kind.
      int fd = ::open(op.a.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0444);
      if (fd < 0) return errc::step_create_file;
      ::close(fd);
      return errc::ok;
    }
    case RootOp::bind_ro:
    case RootOp::bind_ro_noexec: {
      // The host's directory or file at the same path, recursively for /usr's submounts ...
      if (::mount(op.b.c_str(), op.a.c_str(), nullptr, MS_BIND | MS_REC, nullptr) != 0) {
        return errc::step_bind_ro;
      }
      // ... made read-only, nosuid and nodev together with every mount below it: a remount
      // would change only the top one and leave a host mount under /usr writable.
      mount_attr attr{};
      attr.attr_set = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV |
                      (op.kind == RootOp::bind_ro_noexec ? MOUNT_ATTR_NOEXEC : 0);
      return ::syscall(SYS_mount_setattr, AT_FDCWD, op.a.c_str(), AT_RECURSIVE, &attr,
                       sizeof(attr)) == 0
                 ? errc::ok
                 : errc::step_remount_bind_ro;
    }
    case RootOp::bind_dev:
      // A device node QEMU may open (nodev would make it useless) ...
      if (::mount(op.b.c_str(), op.a.c_str(), nullptr, MS_BIND, nullptr) != 0) {
        return errc::step_bind_dev;
      }
      // ... that nothing can be executed from or gain privileges through. Read-only still lets
      // QEMU write to the device: a read-only mount refuses writes to its files, not to devices.
      return ::mount(nullptr, op.a.c_str(), nullptr,
                     MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC, nullptr) == 0
                 ? errc::ok
                 : errc::step_remount_bind_dev;
    case RootOp::symlink_:
      // The merged-/usr links the dynamic loader and QEMU expect (/lib -> usr/lib, ...).
      return ::symlink(op.b.c_str(), op.a.c_str()) == 0 ? errc::ok : errc::step_symlink;
    case RootOp::move_mount_:
      // The detached mount of the inode the broker opened: QEMU opens a jail-local name, but
      // the broker chose the file. The lifted fd is then no longer needed.
      if (::syscall(SYS_move_mount, op.fd, "", AT_FDCWD, op.a.c_str(),
                    MOVE_MOUNT_F_EMPTY_PATH) != 0) {
        return errc::step_move_mount;
      }
      ::close(op.fd);
      return errc::ok;
  }
  return errc::ok;
}

void populate_root(ChildPlan& p) {
  for (const auto& op : p.root_ops) {
    const errc failed = run_root_op(op);
    if (failed != errc::ok) fail(p, failed);
  }
}

void seal_root(ChildPlan& p) {
  // Read-only from here on: QEMU cannot create anything in its own root.
  if (::mount(nullptr, p.req.jail.mountpoint.c_str(), nullptr,
              MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr) != 0) {
    fail(p, errc::step_remount_root_ro);
  }
}

void pivot_root(ChildPlan& p) {
  // pivot_root(".", ".") needs the new root as the working directory.
  if (::chdir(p.req.jail.mountpoint.c_str()) != 0) fail(p, errc::step_chdir_jail);
  // The tmpfs becomes "/" and the old root is stacked on it, so no put_old directory is needed.
  if (::syscall(SYS_pivot_root, ".", ".") != 0) fail(p, errc::step_pivot_root);
  // Detach the old root: from now on no host path is reachable. Lazily, as it is busy.
  if (::umount2(".", MNT_DETACH) != 0) fail(p, errc::step_umount_old_root);
  // pivot_root does not promise where the working directory ends up.
  if (::chdir("/") != 0) fail(p, errc::step_chdir_root);
}

void jail_stdio(ChildPlan& p) {
  // The host's /dev/null is no longer reachable by path; the jail's own bind of it is.
  int jail_null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (jail_null < 0) fail(p, errc::step_open_jail_null);
  // dup2 clears close-on-exec on 0 (and 1, 2 when there is no log).
  if (::dup2(jail_null, 0) != 0) fail(p, errc::step_dup_jail_null);
  if (!p.req.output.valid() && (::dup2(jail_null, 1) != 1 || ::dup2(jail_null, 2) != 2)) {
    fail(p, errc::step_dup_jail_null);
  }
  ::close(jail_null);
}

// Lowered while still root; the uid change below keeps them and QEMU cannot raise them again.
void rlimits(ChildPlan& p) {
  const struct {
    int resource;
    rlim_t value;
    errc step;
  } limits[] = {
      {RLIMIT_FSIZE, p.req.limits.fsize, errc::step_setrlimit_fsize},  // see JailLimits::fsize
      {RLIMIT_CORE, 0, errc::step_setrlimit_core},          // a core file would hold guest memory
      {RLIMIT_MSGQUEUE, 0, errc::step_setrlimit_msgqueue},  // QEMU uses no POSIX queues
      {RLIMIT_LOCKS, 0, errc::step_setrlimit_locks},
      {RLIMIT_MEMLOCK, 0, errc::step_setrlimit_memlock},  // QEMU pins no memory
      {RLIMIT_NPROC, p.req.limits.nproc, errc::step_setrlimit_nproc},  // caps a fork storm
      {RLIMIT_NOFILE, p.req.limits.nofile, errc::step_setrlimit_nofile},
  };
  for (const auto& l : limits) {
    rlimit r{l.value, l.value};
    if (::setrlimit(l.resource, &r) != 0) fail(p, l.step);
  }
}

// The child already sits in its domain's cgroup (clone3 put it there): from here on that cgroup
// is the root of every cgroup path it can see, so no path names the host's hierarchy.
void cgroup_namespace(ChildPlan& p) {
  if (::unshare(CLONE_NEWCGROUP) != 0) fail(p, errc::step_cgroup_namespace);
}

// The uid change below clears the permitted, effective and ambient sets but keeps the bounding
// and inheritable ones. Emptied here, while CAP_SETPCAP is still held: no execve, set-uid file or
// file capability can ever give QEMU a capability back, even if it ran as root by mistake.
void capabilities(ChildPlan& p) {
  // PR_CAPBSET_READ fails past the kernel's last capability, however many it has.
  for (int cap = 0; ::prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0; ++cap) {
    if (::prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0) fail(p, errc::step_drop_bounding);
  }
  if (::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0) {
    fail(p, errc::step_clear_ambient);
  }
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};
  if (::syscall(SYS_capget, &header, data) != 0) fail(p, errc::step_clear_inheritable);
  for (auto& d : data) d.inheritable = 0;
  if (::syscall(SYS_capset, &header, data) != 0) fail(p, errc::step_clear_inheritable);
}

// Every object above was made with the broker's credentials; the domain's are applied last.
// Raw syscalls, not glibc's wrappers: in a threaded process those broadcast the change to every
// thread glibc knows of, and this child's copy of that list names the broker's threads, which
// are not here. A thread the broker was just starting at the clone is one glibc waits for, on a
// futex nothing will ever wake: the child hung in this step until the spawn deadline killed it.
void credentials(ChildPlan& p) {
  // Groups first: setgroups needs CAP_SETGID, which the uid change drops.
  if (::syscall(SYS_setgroups, p.req.groups.size(), p.req.groups.data()) != 0) {
    fail(p, errc::step_setgroups);
  }
  // All three gids, so none can be switched back to.
  if (::syscall(SYS_setresgid, p.req.gid, p.req.gid, p.req.gid) != 0) fail(p, errc::step_setresgid);
  // Last: after this the child has no capability left.
  if (::syscall(SYS_setresuid, p.req.uid, p.req.uid, p.req.uid) != 0) fail(p, errc::step_setresuid);
}

void no_new_privs(ChildPlan& p) {
  // execve can then never grant privileges (set-uid files, file capabilities), and QEMU can
  // install its own seccomp filter without CAP_SYS_ADMIN.
  if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) fail(p, errc::step_no_new_privs);
  // After the uid change, which clears the parent-death signal.
  if (p.req.pdeathsig != 0 && ::prctl(PR_SET_PDEATHSIG, p.req.pdeathsig, 0, 0, 0) != 0) {
    fail(p, errc::step_pdeathsig);
  }
}

[[noreturn]] void exec(ChildPlan& p) {
  // An empty environment: nothing of the broker's reaches QEMU. Success closes the
  // close-on-exec report pipe, which is how the parent learns the jail is complete.
  char* const envp[] = {nullptr};
  ::execve(p.req.executable.c_str(), p.argv.data(), envp);
  fail(p, errc::step_exec);
}

}  // namespace steps

// child_main's steps, in order, by the names docs/lifecycle.md uses.
constexpr const char* kStepNames[] = {
    "lift_fds",      "close_fds",   "stdio",           "place_fds",    "reset_signals",
    "mount_private", "mount_tmpfs", "populate_root",   "seal_root",    "pivot_root",
    "jail_stdio",    "rlimits",     "cgroup_namespace", "capabilities", "credentials",
    "no_new_privs",  "exec"};

[[noreturn]] void child_main(ChildPlan& p) {
  int step = 0;
  // A plain store into shared memory: async-signal-safe, and no syscall.
  auto at = [&p, &step] { p.progress->store(step++, std::memory_order_relaxed); };
  at(), steps::lift_fds(p);
  at(), steps::close_fds(p);
  at(), steps::stdio(p);
  at(), steps::place_fds(p);
  at(), steps::reset_signals();
  at(), steps::mount_private(p);
  at(), steps::mount_tmpfs(p);
  at(), steps::populate_root(p);
  at(), steps::seal_root(p);
  at(), steps::pivot_root(p);
  at(), steps::jail_stdio(p);
  at(), steps::rlimits(p);
  at(), steps::cgroup_namespace(p);
  at(), steps::capabilities(p);
  at(), steps::credentials(p);
  at(), steps::no_new_privs(p);
  at(), steps::exec(p);
}

// A failed step as an Error whose code is the step's and whose message names the step, the
// call and errno.
Error step_failure(errc step, int err) {
  const char* name = ::strerrorname_np(err);
  const std::string err_name = name != nullptr ? name : "errno " + std::to_string(err);
  const auto code = make_error_code(step);
  return Error(code, code.message() + ": " + err_name + " (" + std::strerror(err) + ")");
}

// The child's report; a step it cannot have sent means the report is not one.
Error step_error(const StepReport& r) {
  const bool child_step = r.step >= static_cast<int>(errc::step_lift_fds) &&
                          r.step <= static_cast<int>(errc::step_exec);
  if (!child_step) {
    return Error(make_error_code(errc::child_died),
                 "spawn: the child reported an unknown step " + std::to_string(r.step));
  }
  return step_failure(static_cast<errc>(r.step), r.err);
}

namespace steps {

// clone3 with new mount, IPC, network, UTS and pid namespaces, straight into the domain's
// cgroup, returning a pidfd: the child never exists outside any of them.
Result<SpawnedChild> clone(ChildPlan& plan, fdpass::UniqueFd& report_read) {
  int pidfd = -1;
  clone_args args{};
  args.flags = CLONE_PIDFD | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWUTS |
               CLONE_NEWPID | (plan.req.cgroup.valid() ? CLONE_INTO_CGROUP : 0);
  args.pidfd = reinterpret_cast<std::uint64_t>(&pidfd);
  args.exit_signal = SIGCHLD;
  if (plan.req.cgroup.valid()) args.cgroup = static_cast<std::uint64_t>(plan.req.cgroup.get());
  long pid = ::syscall(SYS_clone3, &args, sizeof(args));
  if (pid < 0) return step_failure(errc::step_clone, errno);
  if (pid == 0) {
    report_read.reset();
    child_main(plan);
  }
  return SpawnedChild{static_cast<pid_t>(pid), fdpass::UniqueFd(pidfd)};
}

}  // namespace steps

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

namespace {

// True once `fd` is readable or closed by its writers, waiting at most `deadline`.
bool wait_readable(int fd, std::chrono::milliseconds deadline) {
  const auto until = std::chrono::steady_clock::now() + deadline;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        until - std::chrono::steady_clock::now());
    pollfd p{fd, POLLIN, 0};
    int ready = ::poll(&p, 1, static_cast<int>(std::max<long long>(left.count(), 0)));
    if (ready < 0 && errno == EINTR) continue;
    return ready > 0;
  }
}

// The page the child's progress goes to: shared, so the child's stores reach the parent.
class SharedProgress {
 public:
  SharedProgress() {
    void* page = ::mmap(nullptr, sizeof(std::atomic<int>), PROT_READ | PROT_WRITE,
                        MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (page != MAP_FAILED) value_ = new (page) std::atomic<int>(-1);
  }
  ~SharedProgress() {
    if (value_ != nullptr) ::munmap(value_, sizeof(std::atomic<int>));
  }
  SharedProgress(const SharedProgress&) = delete;
  SharedProgress& operator=(const SharedProgress&) = delete;
  std::atomic<int>* get() { return value_; }

 private:
  std::atomic<int>* value_ = nullptr;
};

// What a child that ran out of time was doing: its step, and as /proc sees it, its state and
// the kernel function it sleeps in. Read before the kill, so a stuck spawn names its cause.
std::string describe_stuck(pid_t pid, int step) {
  std::string out = step >= 0 && step < static_cast<int>(std::size(kStepNames))
                        ? std::string("in step '") + kStepNames[step] + "'"
                        : std::string("before its first step");
  const std::string proc = "/proc/" + std::to_string(pid);
  std::string stat, wchan;
  std::getline(std::ifstream(proc + "/stat"), stat);
  std::getline(std::ifstream(proc + "/wchan"), wchan);
  // The state follows the command's closing parenthesis: "pid (comm) S ...".
  if (auto close = stat.rfind(") "); close != std::string::npos && close + 2 < stat.size()) {
    out += ", state " + stat.substr(close + 2, 1);
  }
  if (!wchan.empty() && wchan != "0") out += ", waiting in " + wchan;
  return out;
}

}  // namespace

Result<SpawnedChild> spawn_jailed(const SpawnRequest& req) {
  if (req.uid == 0 || req.gid == 0) {
    return Error(make_error_code(errc::invalid_spec), "refusing to run a jailed process as root");
  }
  if (req.jail.mountpoint.empty() || req.argv.empty() || req.pass.size() > 64 ||
      req.jail.fd_mounts.size() > 8) {
    return Error(make_error_code(errc::invalid_spec), "malformed spawn request");
  }
  auto report = fdpass::make_pipe();
  if (!report) return make_error(report.error(), "spawn: report pipe");
  SharedProgress progress;
  if (progress.get() == nullptr) {
    return make_error({errno, std::system_category()}, "spawn: progress page");
  }
  // Everything the child touches is built here, before the clone.
  ChildPlan plan = make_plan(req, report->second.get());
  plan.progress = progress.get();
  auto child = steps::clone(plan, report->first);
  if (!child) return child;
  report->second.reset();

  StepReport r{};
  ssize_t n = -1;
  std::string stuck;
  const bool answered = wait_readable(report->first.get(), req.exec_deadline);
  if (answered) {
    do {
      n = ::read(report->first.get(), &r, sizeof(r));
    } while (n < 0 && errno == EINTR);
    if (n == 0) return child;  // the exec closed the pipe: the child is QEMU now
  } else {
    stuck = describe_stuck(child->pid, progress.get()->load(std::memory_order_relaxed));
    ::syscall(SYS_pidfd_send_signal, child->pidfd.get(), SIGKILL, nullptr, 0);
  }

  // The child failed a step, died, or was killed: reap it so nothing is left behind.
  siginfo_t info{};
  ::waitid(P_PIDFD, static_cast<id_t>(child->pidfd.get()), &info, WEXITED);
  if (!answered) {
    return Error(make_error_code(errc::child_died),
                 "spawn: the child neither exec'd nor reported a step within " +
                     std::to_string(req.exec_deadline.count()) + " ms (" + stuck +
                     "), and was killed");
  }
  if (n != sizeof(r)) {
    return Error(make_error_code(errc::child_died), "spawn: child died before exec");
  }
  return step_error(r);
}

}  // namespace broker::lifecycle
