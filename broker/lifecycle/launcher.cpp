#include "broker/lifecycle/launcher.hpp"

#include <cstdio>

#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <poll.h>
#include <sys/stat.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <functional>
#include <mutex>

#include "broker/core/atomic_file.hpp"
#include "broker/core/log.hpp"
#include "broker/lifecycle/errc.hpp"
#include "broker/lifecycle/proc.hpp"
#include "fdpass/devices.hpp"

namespace broker::lifecycle {
namespace {

constexpr const char* kKernelInJail = "/boot/kernel";
constexpr const char* kInitrdInJail = "/boot/initrd";
constexpr int kQmpFd = 3;
constexpr int kConsoleFd = 4;
constexpr int kFirstColdFd = 5;

std::error_code errno_code() { return {errno, std::system_category()}; }

constexpr const char* kCgroupPrefix = "dom-";

// A name no earlier instance had: "dom-<domain>-<64 random bits>".
std::string fresh_cgroup_name(const std::string& domain) {
  std::uint64_t id = 0;
  if (::getrandom(&id, sizeof(id), 0) != static_cast<ssize_t>(sizeof(id))) {
    id = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  }
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(id));
  return kCgroupPrefix + domain + "-" + hex;
}

// Reaps a child through its pidfd, if it has exited or once it does.
// Waits until the process behind `pidfd` has exited (a pidfd turns readable then), at most
// `limit`; it is not reaped.
void wait_exit(const fdpass::UniqueFd& pidfd, std::chrono::milliseconds limit) {
  if (!pidfd) return;
  pollfd p{pidfd.get(), POLLIN, 0};
  while (::poll(&p, 1, static_cast<int>(limit.count())) < 0 && errno == EINTR) {
  }
}

void reap(const fdpass::UniqueFd& pidfd) {
  if (!pidfd) return;
  siginfo_t info{};
  while (::waitid(P_PIDFD, static_cast<id_t>(pidfd.get()), &info, WEXITED) != 0 && errno == EINTR) {
  }
}

// Undo list for start(): each completed step pushes its inverse.
class Rollback {
 public:
  ~Rollback() {
    if (armed_) {
      for (auto it = steps_.rbegin(); it != steps_.rend(); ++it) (*it)();
    }
  }
  void push(std::function<void()> f) { steps_.push_back(std::move(f)); }
  void disarm() { armed_ = false; }

 private:
  std::vector<std::function<void()>> steps_;
  bool armed_ = true;
};

}  // namespace

Launcher::Launcher(LauncherConfig config, UidPool& uids, CgroupManager& cgroups,
                   const fdpass::ImageRoots& roots)
    : config_(std::move(config)), uids_(uids), cgroups_(cgroups), roots_(roots) {}

bool kvm_open_to_domains(const struct stat& st) {
  if (!S_ISCHR(st.st_mode)) return false;
  // A domain's uid is never the owner (root) and never in root's group: it can open the node only
  // through a group it is given (kvm) or through the world bits.
  const bool by_group = st.st_gid != 0 && (st.st_mode & (S_IRGRP | S_IWGRP)) == (S_IRGRP | S_IWGRP);
  const bool by_world = (st.st_mode & (S_IROTH | S_IWOTH)) == (S_IROTH | S_IWOTH);
  return by_group || by_world;
}

Accel Launcher::detect_accel(Accel wanted) const {
  if (wanted != Accel::automatic) return wanted;
  struct stat st {};
  if (::stat(config_.kvm_device.c_str(), &st) != 0) return Accel::tcg;
  if (!kvm_open_to_domains(st)) {
    static std::once_flag said;
    std::call_once(said, [&] {
      char mode[8];
      std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
      log::warn(config_.kvm_device + " has mode " + mode + " and group " +
                std::to_string(st.st_gid) +
                ": no domain uid can open it, so domains run under TCG. Give it a group (kvm) "
                "with read and write, as udev does, to use KVM");
    });
    return Accel::tcg;
  }
  fdpass::UniqueFd kvm(::open(config_.kvm_device.c_str(), O_RDWR | O_CLOEXEC));
  return kvm ? Accel::kvm : Accel::tcg;
}

namespace {

std::string machine_arg(const DomainSpec& spec, Accel accel) {
  if (spec.xen) return spec.xen->pv ? "xenpv" : "xenfv";  // both imply accel=xen
  return std::string(to_string(spec.machine)) + ",accel=" + std::string(to_string(accel));
}

}  // namespace

std::vector<std::string> Launcher::command_line(const DomainSpec& spec, Accel accel,
                                                const FdHandover* cold,
                                                const std::vector<std::string>& extra) const {
  std::vector<std::string> a = {
      config_.qemu.binary,
      "-name", "guest=" + spec.name + ",debug-threads=on",
      "-machine", machine_arg(spec, accel),
      "-m", std::to_string(spec.memory_mib),
      "-smp", std::to_string(spec.vcpus),
      "-nodefaults", "-no-user-config", "-display", "none",
      // Seccomp: no obsolete syscalls, no privilege changes, no exec/fork, no cgroup/sched games.
      "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
      "-chardev", "socket,id=qmp,fd=" + std::to_string(kQmpFd) + ",server=on,wait=off",
      // Start paused: the broker hands over fds and then sends `cont`.
      "-S",
  };
  if (spec.xen) {
    // The hypervisor runs the guest; QEMU emulates its devices, restricted to its domid.
    a.insert(a.end(), {"-xen-domid", std::to_string(spec.xen->domid), "-xen-domid-restrict"});
    if (spec.xen->pv) a.push_back("-xen-attach");
  }
  auto monitor = monitor_args(config_.qemu, "qmp");
  a.insert(a.end(), monitor.begin(), monitor.end());
  for (const auto& dir : config_.qemu.data_dirs) a.insert(a.end(), {"-L", dir});
  if (spec.machine == Machine::q35) {
    // A VNC display with no listener, so one can be handed over later (display-update).
    a.insert(a.end(), {"-vnc", "none"});
    a.insert(a.end(), {"-chardev",
                       "socket,id=console,fd=" + std::to_string(kConsoleFd) + ",server=on,wait=off",
                       "-serial", "chardev:console"});
    if (!spec.kernel.empty()) a.insert(a.end(), {"-kernel", kKernelInJail});
    if (!spec.initrd.empty()) a.insert(a.end(), {"-initrd", kInitrdInJail});
    if (!spec.append.empty()) a.insert(a.end(), {"-append", spec.append});
    // The devices of boot_order carry their bootindex; strict: none other is booted from.
    if (!spec.boot_order.empty()) a.insert(a.end(), {"-boot", "strict=on"});
    // A Xen machine (xenfv, xenpv) has no PCIe root complex to hang ports on.
    for (std::uint32_t i = 1; !spec.xen && i <= spec.pci_slots; ++i) {
      a.insert(a.end(), {"-device", "pcie-root-port,id=rp" + std::to_string(i) +
                                        ",chassis=" + std::to_string(i) + ",bus=pcie.0"});
    }
  }
  if (cold != nullptr) {
    auto add_fds = cold->spawn_args(kFirstColdFd);
    a.insert(a.end(), add_fds.begin(), add_fds.end());
  }
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

std::vector<std::string> Launcher::expire_logs(const std::set<std::string>& live,
                                              std::chrono::milliseconds retention) {
  std::vector<std::string> removed;
  const std::string dir = config_.run_dir + "/log";
  const auto now = std::chrono::system_clock::now();
  for (const auto& file : list_dir(dir)) {
    std::string name = file;
    if (name.ends_with(".1")) name.resize(name.size() - 2);
    if (!name.ends_with(".log")) continue;
    name.resize(name.size() - 4);
    // A pooled QEMU's log is the pool's: it goes when the QEMU is discarded or taken.
    if (live.contains(name) || name.starts_with(kPoolPrefix)) continue;
    const std::string path = dir + "/" + file;
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    const auto written = std::chrono::system_clock::time_point(
        std::chrono::seconds(st.st_mtim.tv_sec) + std::chrono::nanoseconds(st.st_mtim.tv_nsec));
    if (now - written < retention) continue;
    if (::unlink(path.c_str()) == 0) removed.push_back(path);
  }
  return removed;
}

void Launcher::remove_log(const std::string& name) {
  const std::string path = config_.run_dir + "/log/" + name + ".log";
  ::unlink(path.c_str());
  ::unlink((path + ".1").c_str());
}

void Launcher::remove_files(const std::string& name) {
  for (const char* sub : {"/qmp/", "/console/"}) {
    ::unlink((config_.run_dir + sub + name + ".sock").c_str());
  }
}

namespace {

// The run directory's parts. The jail mount point must be reachable (traversable) only by root.
Result<void> make_run_dirs(const std::string& run_dir) {
  for (const char* sub : {"/qmp", "/console", "/log", "/jail"}) {
    if (auto ec = make_dirs(run_dir + sub, 0700)) return make_error(ec, "creating " + run_dir + sub);
  }
  ::chmod((run_dir + "/jail").c_str(), 0700);
  return {};
}

Result<FileStamp> stamp_of(fdpass::BorrowedFd fd) {
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return make_error(errno_code(), "fstat of a boot file");
  auto ns = [](const timespec& t) { return std::int64_t{t.tv_sec} * 1'000'000'000 + t.tv_nsec; };
  return FileStamp{st.st_dev, st.st_ino, st.st_size, ns(st.st_mtim), ns(st.st_ctim)};
}

// The kernel and initrd of `spec`, opened beneath the image roots with the broker's credentials,
// with their stamps.
Result<std::vector<std::pair<fdpass::UniqueFd, FileStamp>>> open_boot_files(
    const DomainSpec& spec, const fdpass::ImageRoots& roots) {
  std::vector<std::pair<fdpass::UniqueFd, FileStamp>> files;
  for (auto [path, field] : {std::pair{&spec.kernel, "kernel"}, std::pair{&spec.initrd, "initrd"}}) {
    if (path->empty()) continue;
    auto opened = roots.open(*path, {});
    if (!opened) {
      Error e(opened.error(), std::string(field) + ": " + *path + ": " + opened.error().message());
      e.field = field;
      return e;
    }
    auto stamp = stamp_of(opened->fd);
    if (!stamp) return stamp.error();
    files.emplace_back(std::move(opened->fd), *stamp);
  }
  return files;
}

// The kernel and initrd turned into detached read-only mounts of the inodes opened, at their jail
// paths; their stamps go to `stamps`.
Result<void> mount_boot_files(const DomainSpec& spec, const fdpass::ImageRoots& roots,
                              std::vector<fdpass::UniqueFd>& mounts, JailLayout& layout,
                              std::vector<FileStamp>& stamps) {
  auto files = open_boot_files(spec, roots);
  if (!files) return files.error();
  const char* targets[] = {kKernelInJail, kInitrdInJail};
  for (std::size_t i = 0; i < files->size(); ++i) {
    auto& [fd, stamp] = (*files)[i];
    stamps.push_back(stamp);
    auto tree = detached_mount(fd);
    if (!tree) return tree.error();
    mounts.push_back(std::move(*tree));
    layout.fd_mounts.emplace_back(mounts.back(), targets[i]);
  }
  return {};
}

// What QEMU gets at fds 3 and 4 and as stdout/stderr: the QMP and console listeners the broker
// binds, and the write end of its log pipe (the broker keeps the read end, broker/domain/qemu_log).
struct Endpoints {
  fdpass::UniqueFd qmp;
  fdpass::UniqueFd console;
  fdpass::UniqueFd log_write;
  fdpass::UniqueFd log_read;
};

Result<Endpoints> open_endpoints(const Instance& inst) {
  auto qmp = fdpass::listen_unix(inst.qmp_path, 0600, 0, 0, 4);
  if (!qmp) return make_error(qmp.error(), "QMP listener " + inst.qmp_path);
  auto console = fdpass::listen_unix(inst.console_path, 0600, 0, 0, 4);
  if (!console) return make_error(console.error(), "console listener " + inst.console_path);
  // Non-blocking, as QEMU needs them. QEMU 7.2 moves the QMP chardev into its monitor thread
  // while the main loop may already watch the listener: both can wake for one connection, and
  // the one that loses the accept blocks in it when the listener blocks. When that is the main
  // thread, QMP greets but never answers qmp_capabilities. parallel_bench hit it about once in
  // 750 starts, raw QEMUs and jailed ones alike; with O_NONBLOCK the loser gets EAGAIN.
  for (int fd : {qmp->get(), console->get()}) {
    const int flags = ::fcntl(fd, F_GETFL);
    if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) {
      return make_error(errno_code(), "making the QMP and console listeners non-blocking");
    }
  }
  // The log file of an earlier QEMU of the name starts over; the broker appends to it.
  fdpass::UniqueFd file(::open(inst.log_path.c_str(),
                               O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (!file) return make_error(errno_code(), "QEMU log " + inst.log_path);
  ::unlink((inst.log_path + ".1").c_str());
  int ends[2];
  if (::pipe2(ends, O_CLOEXEC) != 0) return make_error(errno_code(), "QEMU log pipe");
  return Endpoints{std::move(*qmp), std::move(*console), fdpass::UniqueFd(ends[1]),
                   fdpass::UniqueFd(ends[0])};
}

// What a QEMU that failed to start wrote into its log pipe, as far as it is there now.
std::string read_pipe_now(fdpass::BorrowedFd pipe) {
  std::string out;
  const int flags = ::fcntl(pipe.get(), F_GETFL);
  if (flags < 0 || ::fcntl(pipe.get(), F_SETFL, flags | O_NONBLOCK) != 0) return out;
  char buf[4096];
  ssize_t n = 0;
  while (out.size() < 4096 && (n = ::read(pipe.get(), buf, sizeof buf)) > 0) {
    out.append(buf, static_cast<std::size_t>(n));
  }
  ::fcntl(pipe.get(), F_SETFL, flags);
  return out;
}

}  // namespace

Result<void> Launcher::make_cgroup(const DomainSpec& spec, Instance& inst) {
  if (!config_.use_cgroup) return {};
  if (!cgroups_.available()) {
    log::info("domain " + spec.name + ": no cgroup (" + cgroups_.why_unavailable() + ")");
    return {};
  }
  CgroupLimits limits;
  // Guest RAM plus room for QEMU itself.
  limits.memory_bytes = (static_cast<std::uint64_t>(spec.memory_mib) + 256) << 20;
  limits.pids = config_.limits.nproc;
  // Named after the domain, not the uid (in shared-uid mode every domain has the same uid), and
  // fresh for this instance: never one an earlier QEMU of the same name may still occupy.
  auto cg = cgroups_.create(fresh_cgroup_name(spec.name), limits);
  if (!cg) return cg.error();
  inst.cgroup = std::move(*cg);
  inst.cgroup_name = inst.cgroup.name();
  return {};
}

Result<SpawnedChild> Launcher::spawn(const DomainSpec& spec, Instance& inst, const FdHandover* cold,
                                     const std::vector<std::string>& extra_args,
                                     std::array<fdpass::BorrowedFd, 3> qmp_console_log,
                                     JailLayout layout) {
  const auto [qmp, console, log] = qmp_console_log;
  SpawnRequest req;
  req.executable = config_.qemu.binary;
  req.argv = command_line(spec, inst.accel, cold, extra_args);
  req.pass = {qmp, console};
  if (cold != nullptr) {
    for (auto fd : cold->spawn_fds()) req.pass.push_back(fd);
  }
  req.output = log;
  req.jail = std::move(layout);
  req.uid = inst.uid;
  req.gid = inst.uid;
  if (inst.accel == Accel::kvm) {
    struct stat st {};
    if (::stat(config_.kvm_device.c_str(), &st) == 0) req.groups.push_back(st.st_gid);
  }
  req.limits = config_.limits;
  req.pdeathsig = config_.pdeathsig;
  req.cgroup = inst.cgroup.dir();
  auto child = spawn_jailed(req);
  if (!child) {
    auto e = child.error();
    if (auto said = read_pipe_now(inst.log_pipe); !said.empty()) e.message += "; QEMU said: " + said;
    return e;
  }
  inst.argv = std::move(req.argv);
  return child;
}

void StartTrace::mark(std::string name) {
  const auto now = Clock::now();
  steps_.push_back({std::move(name), std::chrono::duration_cast<std::chrono::microseconds>(now - last_)});
  last_ = now;
}

std::chrono::microseconds StartTrace::total() const {
  std::chrono::microseconds sum{0};
  for (const auto& s : steps_) sum += s.took;
  return sum;
}

std::string StartTrace::describe() const {
  std::string out;
  char ms[32];
  for (const auto& s : steps_) {
    std::snprintf(ms, sizeof ms, " %.1f ms, ", static_cast<double>(s.took.count()) / 1000);
    out += s.name + ms;
  }
  std::snprintf(ms, sizeof ms, "total %.1f ms", static_cast<double>(total().count()) / 1000);
  return out + ms;
}

Result<Instance> Launcher::start(const DomainSpec& spec, FdHandover* cold,
                                 const std::vector<std::string>& extra_args) {
  return start_as(spec, spec.name, cold, extra_args);
}

Result<Instance> Launcher::start_pooled(const DomainSpec& spec, const std::string& pool_name,
                                        bool incoming) {
  if (!pool_name.starts_with(kPoolPrefix) || !valid_name(pool_name.substr(1))) {
    return Error(make_error_code(errc::invalid_spec), "'" + pool_name + "' is not a pool name");
  }
  if (incoming) return start_as(spec, pool_name, nullptr, {"-incoming", "defer"});
  return start_as(spec, pool_name, nullptr, {});
}

bool Launcher::boot_files_current(const Instance& inst, const DomainSpec& spec) const {
  auto files = open_boot_files(spec, roots_);
  if (!files || files->size() != inst.boot_files.size()) return false;
  for (std::size_t i = 0; i < files->size(); ++i) {
    if (!((*files)[i].second == inst.boot_files[i])) return false;
  }
  return true;
}

Result<void> Launcher::hand_over(Instance& inst, const std::string& name) {
  if (!valid_name(name)) {
    return Error(make_error_code(errc::invalid_spec), "'" + name + "' is not a domain name");
  }
  // The uid first: from here on a restarted broker that finds no record of the domain reclaims
  // the uid, kills the QEMU and removes the files of either name.
  if (auto ok = uids_.reassign(inst.uid, name); !ok) return ok.error();
  const std::string qmp = config_.run_dir + "/qmp/" + name + ".sock";
  const std::string console = config_.run_dir + "/console/" + name + ".sock";
  const std::string log = config_.run_dir + "/log/" + name + ".log";
  // rename replaces what a gone domain of the name left, as listen_unix does for a new one. A
  // failure puts back what was renamed, so the instance is the pool's whole again.
  const std::pair<const std::string*, const std::string*> moves[] = {
      {&inst.qmp_path, &qmp}, {&inst.console_path, &console}, {&inst.log_path, &log}};
  for (std::size_t i = 0; i < std::size(moves); ++i) {
    if (::rename(moves[i].first->c_str(), moves[i].second->c_str()) == 0) continue;
    // A log removed by hand is made again by the domain's log, which opens it with O_CREAT.
    if (errno == ENOENT && moves[i].first == &inst.log_path) continue;
    Error e = make_error(errno_code(), "renaming " + *moves[i].first + " to " + *moves[i].second);
    while (i-- > 0) ::rename(moves[i].second->c_str(), moves[i].first->c_str());
    (void)uids_.reassign(inst.uid, inst.name);
    return e;
  }
  ::unlink((log + ".1").c_str());
  inst.name = name;
  inst.qmp_path = qmp;
  inst.console_path = console;
  inst.log_path = log;
  return {};
}

Result<Instance> Launcher::start_as(const DomainSpec& spec, const std::string& file_name,
                                    FdHandover* cold, const std::vector<std::string>& extra_args) {
  if (auto ok = validate(spec); !ok) return ok.error();
  if (config_.xen_only && !spec.xen) {
    Error e(make_error_code(errc::invalid_spec),
            "this broker runs in Xen mode (--xen): its uids belong to Xen domids, so only a Xen "
            "domain's device model can start");
    e.field = "xen";
    return e;
  }
  // The undo steps refer to `inst`, so it is declared first and outlives them on every return.
  Instance inst;
  inst.trace.begin();
  Rollback undo;
  inst.name = file_name;
  // Under Xen the hypervisor runs the guest: no KVM device in the jail.
  inst.accel = spec.xen ? Accel::tcg : detect_accel(spec.accel);
  if (auto ok = make_run_dirs(config_.run_dir); !ok) return ok.error();

  // Step 1: the firmware, before a uid is taken: a missing OVMF or a bad store costs nothing.
  FdHandover own;
  FdHandover* fds = cold != nullptr ? cold : &own;
  std::vector<std::string> args = extra_args;
  if (spec.firmware == Firmware::uefi) {
    auto uefi = hand_over_uefi(spec, config_.firmware, roots_, *fds);
    if (!uefi) return uefi.error();
    args.insert(args.end(), uefi->begin(), uefi->end());
    inst.trace.mark("firmware");
  }

  // Step 2: a uid, swept and recorded before anything runs under it.
  // A Xen device model's uid is fixed by its domid; the sweep is its kill before reuse.
  auto uid = uids_.allocate(file_name, spec.xen ? std::optional<uid_t>(spec.xen->uid) : std::nullopt);
  if (!uid) return uid.error();
  inst.uid = *uid;
  undo.push([this, u = *uid] { (void)uids_.release(u); });
  inst.trace.mark("uid sweep+record");

  // Step 3: open everything with the broker's credentials.
  std::vector<fdpass::UniqueFd> mounts;
  JailLayout layout = default_qemu_layout(config_.run_dir + "/jail", inst.accel == Accel::kvm);
  auto install = jail_binds_of(config_.qemu);
  layout.ro_dirs.insert(layout.ro_dirs.end(), install.exec_dirs.begin(), install.exec_dirs.end());
  layout.ro_data_dirs = std::move(install.data_dirs);
  if (spec.xen) layout.device_binds = spec.xen->device_nodes;
  if (auto ok = mount_boot_files(spec, roots_, mounts, layout, inst.boot_files); !ok) {
    return ok.error();
  }
  inst.trace.mark("boot files");
  inst.qmp_path = config_.run_dir + "/qmp/" + file_name + ".sock";
  inst.console_path = config_.run_dir + "/console/" + file_name + ".sock";
  inst.log_path = config_.run_dir + "/log/" + file_name + ".log";
  undo.push([this, name = file_name] { remove_files(name); });
  auto io = open_endpoints(inst);
  if (!io) return io.error();
  struct stat pipe_st {};
  if (::fstat(io->log_read.get(), &pipe_st) == 0) inst.log_pipe_inode = pipe_st.st_ino;
  inst.log_pipe = std::move(io->log_read);
  inst.trace.mark("listeners");
  if (auto ok = make_cgroup(spec, inst); !ok) return ok.error();
  if (inst.cgroup.valid()) undo.push([this, &inst] { cgroups_.retire(inst.cgroup); });
  inst.trace.mark("cgroup");

  // Step 4: spawn.
  FdHandover* spawn_fds = fds->entries().empty() ? nullptr : fds;
  auto child = spawn(spec, inst, spawn_fds, args, {io->qmp, io->console, io->log_write}, std::move(layout));
  if (!child) return child.error();
  inst.pid = child->pid;
  inst.pidfd = std::move(child->pidfd);
  inst.trace.mark("clone+jail+exec");
  inst.start_time = process_start_time(config_.proc_root, inst.pid);
  if (spawn_fds != nullptr) spawn_fds->spawned();
  undo.disarm();
  return inst;
}

Result<KillReport> Launcher::destroy(Instance& inst) {
  const auto start = std::chrono::steady_clock::now();
  std::string method;
  // 1. cgroup.kill: everything in the cgroup, whatever uid it switched to.
  if (inst.cgroup.valid() && inst.cgroup.kill()) method += "cgroup.kill+";
  // 2. The pid-namespace init: its death takes every process of the namespace with it.
  if (inst.pidfd && ::syscall(SYS_pidfd_send_signal, inst.pidfd.get(), SIGKILL, nullptr, 0) == 0) {
    method += "pidns-init+";
  }
  KillReport report;
  if (uids_.is_shared()) {
    // 3'. Shared uid: a kill by uid would take every domain down. The pid namespace's init is
    //     dead, which kills everything in the namespace; wait for that and check the cgroup.
    if (!inst.pidfd && !inst.cgroup.valid()) {
      Error e(make_error_code(errc::kill_failed),
              "shared uid, and neither a pidfd nor a cgroup for domain " + inst.name +
                  ": nothing safe to kill by");
      return e;
    }
    reap(inst.pidfd);
    inst.pidfd.reset();
    for (int i = 0; i < 1000 && inst.cgroup.valid() && inst.cgroup.populated(); ++i) {
      ::usleep(1000);
    }
    if (inst.cgroup.valid() && inst.cgroup.populated()) {
      Error e(make_error_code(errc::survivors), "cgroup of domain " + inst.name + " still populated");
      return e;
    }
    report.uid = inst.uid;
    report.found = 1;
    report.rounds = 0;
    method += "shared-uid";
  } else {
    // 3. By uid, for anything that escaped both (never skipped when the uid is known): the
    //    first round goes out now, while QEMU is still dying.
    const bool round_sent = !uids_.reaper().send_round(inst.uid);
    // The init's exit ends the namespace, and the kernel lets it exit only once every other
    // process in it has: waiting for that on the pidfd (bounded) wakes exactly when QEMU is
    // gone, where the scan below would poll /proc for it.
    wait_exit(inst.pidfd, std::chrono::milliseconds(2000));
    // kill_uid returns only once its last /proc scan saw no live process of the uid: that scan
    // is the check. A first round that failed is sent again there, and its error reported.
    auto killed = uids_.reaper().kill_uid(inst.uid, round_sent);
    if (!killed) return killed.error();
    report = *killed;
    // 4. Reap our child, so not even a zombie of the uid remains.
    reap(inst.pidfd);
    inst.pidfd.reset();
    method += "uid";
    if (report.by_pid > 0) method += "+pid";  // holders of the uid kill(-1) cannot reach
  }
  cgroups_.retire(inst.cgroup);
  if (auto released = uids_.release(inst.uid); !released) return released.error();
  remove_files(inst.name);
  report.method = method;
  report.duration = std::chrono::duration_cast<std::chrono::microseconds>(
      std::chrono::steady_clock::now() - start);
  return report;
}

void Launcher::reattach(Instance& inst) {
  if (inst.cgroup_name.empty()) return;
  if (auto cg = cgroups_.open(inst.cgroup_name)) inst.cgroup = std::move(*cg);
}

void Launcher::sweep_cgroups(const std::vector<const Instance*>& live) {
  std::set<std::string> keep;
  for (const auto* inst : live) {
    if (!inst->cgroup_name.empty()) keep.insert(inst->cgroup_name);
  }
  cgroups_.sweep(kCgroupPrefix, keep);
}

std::vector<uid_t> Launcher::reclaim_uids(const std::vector<const Instance*>& live) {
  std::set<uid_t> running;
  std::set<std::string> names;
  for (const auto* inst : live) {
    running.insert(inst->uid);
    names.insert(inst->name);
  }
  std::vector<uid_t> released;
  // In shared-uid mode a kill by uid would take the live domains down with the orphan.
  if (uids_.is_shared() && !running.empty()) return released;
  const auto recorded = uids_.in_use();  // a copy: release() changes it
  for (const auto& [uid, owner] : recorded) {
    // Only what an earlier broker left: a start of this one may be running beside the reclaim,
    // its uid recorded before its domain can show it.
    if (running.contains(uid) || !uids_.inherited().contains(uid)) continue;
    auto killed = uids_.reaper().kill_uid(uid);
    if (!killed) {
      log::error("uid " + std::to_string(uid) + " (recorded for " + owner +
                 "): " + killed.error().describe() + "; it stays recorded");
      continue;
    }
    if (auto ok = uids_.release(uid); !ok) {
      log::error("uid " + std::to_string(uid) + ": " + ok.error().describe());
      continue;
    }
    // The start that recorded the uid may have bound its listeners already; a live domain of the
    // same name owns the same paths, so they stay for it.
    if (!names.contains(owner)) {
      remove_files(owner);
      remove_log(owner);  // of a start no one was ever told of
    }
    log::warn("uid " + std::to_string(uid) + " was recorded for " + owner +
              " without a domain to go with it: killed " + std::to_string(killed->found) +
              " process(es) and released it");
    released.push_back(uid);
  }
  // The sockets and logs of warm-pool QEMUs: no pool outlives its broker, and a crash between a
  // pooled QEMU's uid record naming its domain and the renames leaves them under the pool name.
  for (const char* sub : {"/qmp", "/console", "/log"}) {
    const std::string dir = config_.run_dir + sub;
    for (const auto& file : list_dir(dir)) {
      if (file.starts_with(kPoolPrefix)) ::unlink((dir + "/" + file).c_str());
    }
  }
  return released;
}

}  // namespace broker::lifecycle
