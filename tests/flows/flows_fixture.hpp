// A Broker for the flow tests: like tests/broker/BrokerFixture, plus an image root of the test's
// own (and /dev, for loop devices), a transcript of every QMP line sent to QEMU, and helpers to
// boot the test guest, query QEMU and snapshot what it holds.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>

#include <chrono>
#include <cstdlib>
#include <functional>
#include <future>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/json.hpp>

#include "broker/control/broker.hpp"
#include "broker/lifecycle/cgroup.hpp"
#include "broker/lifecycle/launcher.hpp"
#include "broker/lifecycle/reaper.hpp"
#include "broker/lifecycle/uid_pool.hpp"
#include "fdpass/opener.hpp"
#include "support/asio_run.hpp"
#include "support/broker_printers.hpp"
#include "support/request_specs.hpp"
#include "support/qemu.hpp"
#include "support/support.hpp"

namespace qbtest {

using namespace std::chrono_literals;

struct FlowsFixture {
  TempDir images;  // the test's own image root
  TempDir state;
  TempDir run_dir;
  broker::lifecycle::ForkingUidKiller killer;
  broker::lifecycle::Reaper reaper;
  broker::lifecycle::UidPool uids;
  broker::lifecycle::CgroupManager cgroups;
  fdpass::ImageRoots roots;
  broker::lifecycle::Launcher launcher;
  std::vector<std::string> transcript;  // every line sent to QEMU, in order
  boost::asio::io_context io;
  broker::Broker broker;

  // `base` must be unique per test case; the range is base..base+7. `ovmf_dir`: where OVMF is.
  // `more_roots`: image roots beyond these, made before the broker whose config names them.
  explicit FlowsFixture(uid_t base, broker::BrokerConfig config = {},
                        const std::string& ovmf_dir = broker::lifecycle::FirmwareConfig{}.ovmf_dir,
                        std::vector<std::string> more_roots = {})
      : reaper(killer, base),
        uids({base, 8}, state.path(), reaper),
        cgroups({}, "qbroker-" + std::to_string(base)),  // a subtree per range, as qbrokerd has
        roots(*fdpass::ImageRoots::open(with_roots({guest_dir(), images.path(), "/dev"}, more_roots))),
        launcher(launcher_config(run_dir.path(), ovmf_dir), uids, cgroups, roots),
        broker(io.get_executor(), with_state(std::move(config)), launcher, roots) {
    become_subreaper();
    uids.load();
  }
  ~FlowsFixture() { cgroups.remove_base_if_empty(); }

  static broker::lifecycle::LauncherConfig launcher_config(
      const std::string& dir,
      const std::string& ovmf_dir = broker::lifecycle::FirmwareConfig{}.ovmf_dir) {
    broker::lifecycle::LauncherConfig c;
    c.qemu = {qemu_binary(), qemu_data_dirs(), false};
    c.run_dir = dir;
    c.firmware.ovmf_dir = ovmf_dir;
    c.firmware.nvram_dir = dir + "/nvram";  // UEFI variable stores, the test's own
    return c;
  }

  static std::vector<std::string> with_roots(std::vector<std::string> roots,
                                             const std::vector<std::string>& more) {
    roots.insert(roots.end(), more.begin(), more.end());
    return roots;
  }

  broker::BrokerConfig with_state(broker::BrokerConfig c) {
    c.records_dir = state.path() + "/domains";
    c.transcript = [this](qmp::Direction d, std::string_view line, bool) {
      if (d == qmp::Direction::to_qemu) transcript.emplace_back(line);
    };
    return c;
  }

  template <class T>
  T run(boost::asio::awaitable<T> task) {
    return qbtest::run(io, std::move(task));
  }

  // Runs the io_context until `f` is ready (a client talking to a listener the broker serves).
  template <class T>
  T run_until(std::future<T>& f, std::chrono::milliseconds timeout = 20s) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (f.wait_for(0ms) != std::future_status::ready &&
           std::chrono::steady_clock::now() < deadline) {
      io.restart();
      io.run_for(5ms);
    }
    return f.get();
  }

  static broker::CreateDomain guest(const std::string& name) {
    broker::CreateDomain c;
    c.spec.name = name;
    c.spec.kernel = guest_kernel();
    c.spec.initrd = guest_initrd();
    c.spec.append = kGuestAppend;
    c.spec.memory_mib = 128;
    return c;
  }

  // Creates the domain paused, connects its console, resumes it and waits for the guest's
  // prompt (connecting after a running create would miss the ready marker).
  std::unique_ptr<GuestConsole> boot(broker::CreateDomain c) {
    c.spec.paused = true;
    std::string name = c.spec.name;
    auto info = run(broker.create(std::move(c)));
    REQUIRE(info);
    auto fd = connect_retry(info->console, 10s);
    REQUIRE(fd);
    auto console = std::make_unique<GuestConsole>(std::move(fd));
    REQUIRE(run(broker.resume(name)));
    REQUIRE(console->wait_ready(90s));
    return console;
  }

  // A QMP query through the administrators' passthrough.
  boost::json::value qmp(const std::string& domain, const std::string& command,
                         boost::json::object args = {}) {
    auto r = run(broker.qmp_passthrough(domain, broker::QmpPassthrough{command, std::move(args)}));
    INFO(command << ": " << (r ? std::string("ok") : r.error().describe()));
    REQUIRE(r);
    return *r;
  }

  // The fdsets the API says QEMU still holds for closing (a paused domain's unplugged images).
  std::set<std::int64_t> reported_held(const std::string& domain) {
    std::set<std::int64_t> out;
    auto i = run(broker.info(domain));
    REQUIRE(i);
    for (const auto& f : i->devices.at("fdsets_to_close").as_array()) {
      out.insert(f.at("fdset").to_number<std::int64_t>());
    }
    return out;
  }

  pid_t pid_of(const std::string& domain) {
    auto i = run(broker.info(domain, false));
    REQUIRE(i);
    return i->pid;
  }

  // What QEMU holds, as the leak checks read it.
  struct Snapshot {
    std::set<std::string> devices;   // qom-list /machine/peripheral children
    std::set<std::string> nodes;     // query-named-block-nodes
    std::set<std::string> backends;  // query-block: qdev=node
    std::set<std::string> fdsets;    // query-fdsets: id:fd:opaque
    bool operator==(const Snapshot&) const = default;
  };
  Snapshot snapshot(const std::string& domain) {
    Snapshot s;
    const auto props = qmp(domain, "qom-list", {{"path", "/machine/peripheral"}});
    for (const auto& p : props.as_array()) {
      std::string type(p.at("type").as_string());
      if (type.rfind("child<", 0) == 0) s.devices.insert(std::string(p.at("name").as_string()));
    }
    const auto nodes = qmp(domain, "query-named-block-nodes");
    for (const auto& n : nodes.as_array()) {
      s.nodes.insert(std::string(n.at("node-name").as_string()));
    }
    const auto block = qmp(domain, "query-block");
    for (const auto& b : block.as_array()) {
      const auto& o = b.as_object();
      std::string qdev = o.contains("qdev") ? std::string(o.at("qdev").as_string()) : "";
      std::string node = o.contains("inserted")
                             ? std::string(o.at("inserted").at("node-name").as_string())
                             : "-";
      s.backends.insert(qdev + "=" + node);
    }
    const auto fdsets = qmp(domain, "query-fdsets");
    for (const auto& f : fdsets.as_array()) {
      for (const auto& fd : f.at("fds").as_array()) {
        const auto& o = fd.as_object();
        s.fdsets.insert(std::to_string(f.at("fdset-id").to_number<std::int64_t>()) + ":" +
                        std::to_string(o.at("fd").to_number<std::int64_t>()) + ":" +
                        (o.contains("opaque") ? std::string(o.at("opaque").as_string()) : ""));
      }
    }
    return s;
  }
};

inline std::string describe(const FlowsFixture::Snapshot& s) {
  std::string out;
  auto list = [&](const char* what, const std::set<std::string>& v) {
    out += what;
    out += ":";
    for (const auto& x : v) out += " " + x;
    out += "\n";
  };
  list("devices", s.devices);
  list("nodes", s.nodes);
  list("backends", s.backends);
  list("fdsets", s.fdsets);
  return out;
}

// An image file of `size` bytes with `marker` at offset 0 (and more markers at given offsets).
inline void make_image(const std::string& path, std::size_t size, const std::string& marker,
                       const std::vector<std::pair<std::size_t, std::string>>& more = {}) {
  std::string data(size, '\0');
  data.replace(0, marker.size(), marker);
  for (const auto& [off, m] : more) data.replace(off, m.size(), m);
  write_file(path, data);
}

inline std::string read_at(const std::string& path, std::size_t offset, std::size_t n) {
  std::string out(n, '\0');
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  ssize_t got = ::pread(fd, out.data(), n, static_cast<off_t>(offset));
  ::close(fd);
  REQUIRE(got == static_cast<ssize_t>(n));
  return out;
}

inline int sh(const std::string& cmd) { return std::system(cmd.c_str()); }

// Runs `cmd` in the guest (no single quotes: the console wraps it in eval '...').
inline GuestConsole::Output guest(GuestConsole& con, const std::string& cmd,
                                  std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
  auto out = con.run(cmd, timeout);
  INFO("guest: " << cmd);
  REQUIRE(out);
  return *out;
}

// The guest block device whose first bytes are `marker`, waiting for it to appear.
inline std::string find_disk(GuestConsole& con, const std::string& marker) {
  const std::string cmd = "for d in /dev/sd? /dev/vd?; do [ -b $d ] && [ \"$(head -c " +
                          std::to_string(marker.size()) + " $d 2>/dev/null)\" = \"" + marker +
                          "\" ] && echo $d; done";
  for (int i = 0; i < 100; ++i) {
    auto out = guest(con, cmd);
    if (!out.text.empty()) return out.text;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  FAIL("the guest never saw a disk starting with " << marker);
  return {};
}

// Waits until `cmd` prints `want` in the guest.
inline bool guest_eventually(GuestConsole& con, const std::string& cmd, const std::string& want) {
  for (int i = 0; i < 100; ++i) {
    if (guest(con, cmd).text == want) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

// Waits until `pred` holds on the host.
inline bool host_eventually(const std::function<bool()>& pred,
                            std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return pred();
}

// A domain booting through `firmware` from the test guest's boot disk (d0, read-only) and CD
// (cd0), in `order`.
inline broker::CreateDomain firmware_domain(const std::string& name, broker::lifecycle::Firmware firmware,
                                            std::vector<std::string> order,
                                            broker::DiskBus bus = broker::DiskBus::scsi) {
  broker::CreateDomain c;
  c.spec.name = name;
  c.spec.memory_mib = 256;
  c.spec.firmware = firmware;
  c.spec.boot_order = order;
  c.cdroms.push_back(broker::CdromSpec{"cd0", guest_boot_iso(), std::nullopt});
  c.disks.push_back(disk("d0", guest_boot_disk(), broker::DiskFormat::raw, bus, true));
  for (std::uint32_t i = 0; i < order.size(); ++i) {
    if (order[i] == "cd0") c.cdroms[0].bootindex = i + 1;
    if (order[i] == "d0") c.disks[0].bootindex = i + 1;
  }
  return c;
}

// What the guest prints for `cmd` on its console; the test fails when it does not answer.
inline std::string guest_says(GuestConsole& con, const std::string& cmd) {
  auto out = con.run(cmd, 30s);
  INFO("guest: " << cmd);
  REQUIRE(out);
  return out->text;
}

}  // namespace qbtest
