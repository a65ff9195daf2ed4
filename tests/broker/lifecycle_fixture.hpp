// A launcher wired to temporary directories and a uid range of the test's own, so tests running
// in parallel never sweep each other's uids.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>

#include "broker/lifecycle/cgroup.hpp"
#include "broker/lifecycle/launcher.hpp"
#include "broker/lifecycle/reaper.hpp"
#include "broker/lifecycle/uid_pool.hpp"
#include "fdpass/opener.hpp"
#include "support/qemu.hpp"
#include "support/broker_printers.hpp"
#include "support/support.hpp"

namespace qbtest {

// A real kill(-1), and the base class's kill_holder, which kills nothing: a process that holds
// a uid only as its effective uid then survives every sweep, as when a kill by pid fails.
class UidOnlyKiller final : public broker::lifecycle::UidKiller {
 public:
  std::error_code kill_all(uid_t reaper_uid, uid_t uid) override {
    return real_.kill_all(reaper_uid, uid);
  }

 private:
  broker::lifecycle::ForkingUidKiller real_;
};

struct LifecycleFixture {
  TempDir state;
  TempDir run;
  broker::lifecycle::ForkingUidKiller real_killer;
  broker::lifecycle::UidKiller* killer;
  broker::lifecycle::Reaper reaper;
  broker::lifecycle::UidPool uids;
  broker::lifecycle::CgroupManager cgroups;
  fdpass::ImageRoots roots;
  broker::lifecycle::Launcher launcher;

  // `base` must be unique per test case; the range is base..base+7.
  explicit LifecycleFixture(uid_t base, broker::lifecycle::UidKiller* custom_killer = nullptr)
      : killer(custom_killer != nullptr ? custom_killer : &real_killer),
        reaper(*killer, base),
        uids({base, 8}, state.path(), reaper),
        cgroups({}, cgroup_group(base)),
        roots(*fdpass::ImageRoots::open({guest_dir()})),
        launcher(make_config(run.path()), uids, cgroups, roots) {
    become_subreaper();
    uids.load();
  }
  ~LifecycleFixture() { cgroups.remove_base_if_empty(); }

  // A cgroup subtree per uid range, as qbrokerd has: a sweep of one test's broker at its start
  // must never reach the cgroup another test is about to start a QEMU in.
  static std::string cgroup_group(uid_t base) { return "qbroker-" + std::to_string(base); }

  static broker::lifecycle::LauncherConfig make_config(const std::string& run_dir) {
    broker::lifecycle::LauncherConfig c;
    c.qemu = {qemu_binary(), qemu_data_dirs(), false};
    c.run_dir = run_dir;
    c.firmware.nvram_dir = run_dir + "/nvram";  // UEFI variable stores, the test's own
    return c;
  }

  static broker::lifecycle::DomainSpec guest_spec(const std::string& name) {
    broker::lifecycle::DomainSpec s;
    s.name = name;
    s.kernel = guest_kernel();
    s.initrd = guest_initrd();
    s.append = kGuestAppend;
    s.memory_mib = 128;
    return s;
  }

  static broker::lifecycle::DomainSpec tiny_spec(const std::string& name) {
    broker::lifecycle::DomainSpec s;
    s.name = name;
    s.machine = broker::lifecycle::Machine::none;
    s.memory_mib = 16;
    s.pci_slots = 0;
    return s;
  }
};

}  // namespace qbtest
