// broker/lifecycle starts and ends jailed QEMUs: uids, cgroups, the jail spawner, kill by uid.
//
// Starting and destroying one jailed QEMU: lifecycle steps 2-4 and 6 of docs/lifecycle.md.
// (Step 1, parsing, is spec.hpp; step 5, QMP, belongs to the domain, which owns the client.)
//
// start(): allocate + sweep + record a uid → open the boot files under the image roots → make the
// QMP and console listeners → cgroup → spawn in the jail with `-S`. QEMU gets the listeners as
// fds 3 and 4, boot files as read-only mounts of the opened inodes, cold fds with -add-fd; no
// host path reaches its command line. Every step is undone if a later one fails.
//
// destroy(): cgroup.kill → SIGKILL the pid-namespace init → kill(-1) as the uid → reap → verify
// /proc → release the uid. Never a kill by pid alone when the uid is known.
#pragma once

#include <sys/stat.h>

#include <sys/types.h>

#include <array>
#include <chrono>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "broker/core/error.hpp"
#include "broker/lifecycle/cgroup.hpp"
#include "broker/lifecycle/fd_handover.hpp"
#include "broker/lifecycle/firmware.hpp"
#include "broker/lifecycle/qemu_install.hpp"
#include "broker/lifecycle/reaper.hpp"
#include "broker/lifecycle/spawner.hpp"
#include "broker/lifecycle/spec.hpp"
#include "broker/lifecycle/uid_pool.hpp"
#include "fdpass/opener.hpp"

namespace broker::lifecycle {

struct LauncherConfig {
  QemuInstall qemu;
  std::string run_dir = "/run/qbroker";  // sockets, logs, the jail mount point
  JailLimits limits;
  int pdeathsig = 0;
  std::string proc_root = "/proc";
  std::string kvm_device = "/dev/kvm";
  bool use_cgroup = true;
  FirmwareConfig firmware;  // OVMF and the UEFI variable stores
  // The Xen mode: the uid range is libxl's, one uid per domid, so only Xen device models start.
  bool xen_only = false;
};

// Where a start's time went, step by step (docs/lifecycle.md lists the steps): the launcher's
// steps, then those of the flow that brings the domain up. Kept for the debug log line and the
// benchmarks; nothing decides on it.
class StartTrace {
 public:
  using Clock = std::chrono::steady_clock;
  struct Step {
    std::string name;
    std::chrono::microseconds took{0};
  };
  void begin() { last_ = Clock::now(); }
  // Ends the step `name`: the time since the previous step ended (or begin()).
  void mark(std::string name);
  const std::vector<Step>& steps() const { return steps_; }
  std::chrono::microseconds total() const;
  // "uid 1.2 ms, mounts 0.3 ms, ..., total 190.4 ms".
  std::string describe() const;

 private:
  Clock::time_point last_ = Clock::now();
  std::vector<Step> steps_;
};

// What a boot file (kernel, initrd) was when QEMU loaded it: a file replaced since, or rewritten in
// place, compares unequal.
struct FileStamp {
  dev_t dev = 0;
  ino_t ino = 0;
  off_t size = 0;
  std::int64_t mtime_ns = 0;
  std::int64_t ctime_ns = 0;
  bool operator==(const FileStamp&) const = default;
};

struct Instance {
  std::string name;
  uid_t uid = 0;
  pid_t pid = 0;
  fdpass::UniqueFd pidfd;
  unsigned long long start_time = 0;  // /proc/<pid>/stat field 22, for re-adoption
  Cgroup cgroup;
  std::string cgroup_name;  // recorded, so a restarted broker re-opens this instance's cgroup
  Accel accel = Accel::tcg;
  std::string qmp_path;      // the listener QEMU holds; the broker connects here
  std::string console_path;  // serial console listener
  std::string log_path;      // the file the broker keeps of QEMU's stdout/stderr
  fdpass::UniqueFd log_pipe;  // the read end of QEMU's stdout/stderr, until the broker takes it
  unsigned long long log_pipe_inode = 0;  // recorded: a restarted broker re-opens this pipe
  std::vector<std::string> argv;
  bool pooled = false;  // spawned by the warm pool before its domain asked for it
  std::vector<FileStamp> boot_files;  // the kernel and initrd QEMU loaded at its spawn, in order
  StartTrace trace;  // from the call to start() until the domain runs
};

// True when a domain's uid, which is neither root nor in root's group, can open the KVM device
// `st` describes once it is given the device's group: a char device with group read and write
// for a group other than root's, or world read and write. A 0600 root:root /dev/kvm (a host
// without udev's rule) is not, and domains then run under TCG.
bool kvm_open_to_domains(const struct stat& st);

class Launcher {
 public:
  Launcher(LauncherConfig config, UidPool& uids, CgroupManager& cgroups,
           const fdpass::ImageRoots& roots);

  // `cold` holds fds QEMU gets at spawn with -add-fd (each an fdset with its id set); once start
  // succeeds QEMU holds them and the broker's copies are closed. `extra_args` are further QEMU
  // words built by the device layers (never host paths).
  Result<Instance> start(const DomainSpec& spec, FdHandover* cold = nullptr,
                         const std::vector<std::string>& extra_args = {});

  // A warm-pool QEMU (docs/pool.md): `spec` started as start() would, with no devices, its
  // uid, sockets and log under `pool_name`, which must begin with kPoolPrefix. A domain name
  // never does (valid_name), so the two cannot meet in the run directory. `incoming`: it waits
  // for a restore (-incoming defer).
  static constexpr std::string_view kPoolPrefix = "_pool-";
  Result<Instance> start_pooled(const DomainSpec& spec, const std::string& pool_name,
                                bool incoming = false);

  // True when `spec`'s kernel and initrd, opened now as a spawn would open them, are the files
  // `instance` loaded at its spawn (a pooled QEMU keeps the kernel it started with).
  bool boot_files_current(const Instance& instance, const DomainSpec& spec) const;

  // Gives a pooled instance to domain `name`: the uid is recorded for it, and the QMP and
  // console sockets and the log take its name. QEMU notices nothing: it holds the listeners by
  // fd, not by path.
  Result<void> hand_over(Instance& instance, const std::string& name);

  // Kills everything of the instance's uid, reaps, verifies and releases the uid and the files.
  Result<KillReport> destroy(Instance& instance);

  // Removes QEMU's log of domain `name` (RUN/log/NAME.log). A destroy keeps it, so the log of a
  // QEMU that exited on its own or failed to start outlives its domain; the caller removes it
  // when the domain went because it was asked to.
  void remove_log(const std::string& name);

  // Removes the logs (RUN/log/NAME.log and its rotated NAME.log.1) of every name not in `live`
  // last written longer than `retention` ago. Returns the files removed.
  std::vector<std::string> expire_logs(const std::set<std::string>& live,
                                       std::chrono::milliseconds retention);

  // Re-opens the cgroup of an instance recorded by an earlier broker.
  void reattach(Instance& instance);

  // Removes the domain cgroups left by an earlier broker that belong to none of `live`.
  void sweep_cgroups(const std::vector<const Instance*>& live);

  // Kills and releases every recorded uid that none of `live` runs as (an earlier broker died
  // between recording a uid and recording its domain, or the domain's record was unreadable).
  // Returns the uids released; a uid whose processes survive stays recorded.
  std::vector<uid_t> reclaim_uids(const std::vector<const Instance*>& live);

  // Sweeps the quarantined uids again (UidPool::retry_quarantined); returns those freed.
  std::vector<uid_t> retry_quarantined() { return uids_.retry_quarantined(); }

  const LauncherConfig& config() const { return config_; }
  Accel detect_accel(Accel wanted) const;
  std::vector<std::string> command_line(const DomainSpec& spec, Accel accel,
                                        const FdHandover* cold,
                                        const std::vector<std::string>& extra_args) const;

 private:
  void remove_files(const std::string& name);
  // start() under `file_name` (the domain's name, or a pool name).
  Result<Instance> start_as(const DomainSpec& spec, const std::string& file_name, FdHandover* cold,
                            const std::vector<std::string>& extra_args);
  // The instance's own cgroup, when cgroups are in use and available.
  Result<void> make_cgroup(const DomainSpec& spec, Instance& inst);
  // Clones the jailed child and execs QEMU with the QMP and console listeners at fds 3 and 4,
  // the cold fds after them, and `log` as stdout and stderr.
  Result<SpawnedChild> spawn(const DomainSpec& spec, Instance& inst, const FdHandover* cold,
                             const std::vector<std::string>& extra_args,
                             std::array<fdpass::BorrowedFd, 3> qmp_console_log, JailLayout layout);

  LauncherConfig config_;
  UidPool& uids_;
  CgroupManager& cgroups_;
  const fdpass::ImageRoots& roots_;
};

}  // namespace broker::lifecycle
