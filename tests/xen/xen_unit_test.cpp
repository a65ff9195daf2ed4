// The Xen mode's pure parts: libxl's uid convention, the reaper lock, which domains count as
// released, QEMU's Xen command line, and the device state handed over through fdsets (against the
// scripted QMP peer). No xenstore, no root.
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <boost/json/parse.hpp>
#include <catch2/catch.hpp>
#include <map>
#include <string>
#include <vector>

#include "support/asio_run.hpp"
#include "broker/lifecycle/launcher.hpp"
#include "broker/xen/devices_state.hpp"
#include "broker/xen/domains.hpp"
#include "broker/xen/store.hpp"
#include "broker/xen/uids.hpp"
#include "fake_qmp_server.hpp"
#include "qmp/commands.hpp"
#include "support/support.hpp"

using namespace broker;
using namespace broker::xen;
using namespace std::chrono_literals;

namespace {

class Users final : public UserDb {
 public:
  std::map<std::string, uid_t> names;
  std::vector<uid_t> taken;  // uids with a passwd entry of their own
  std::optional<uid_t> uid_of(const std::string& user) const override {
    auto it = names.find(user);
    if (it == names.end()) return std::nullopt;
    return it->second;
  }
  bool has_entry(uid_t uid) const override {
    for (auto [n, u] : names) {
      if (u == uid) return true;
    }
    for (auto u : taken) {
      if (u == uid) return true;
    }
    return false;
  }
};

}  // namespace

TEST_CASE("the device-model uid is the range base plus the domid", "[xen]") {
  Users users;
  users.names[kRangeBaseUser] = 131072;
  auto uid = device_model_uid(users, 7, false);
  REQUIRE(uid.has_value());
  CHECK(uid->uid == 131079);
  CHECK_FALSE(uid->shared);
  // The shared user is ignored while the range base exists.
  users.names[kSharedUser] = 5000;
  CHECK(device_model_uid(users, 7, true)->uid == 131079);
}

TEST_CASE("a device-model uid is refused for dom0, reserved domids, root and real users", "[xen]") {
  Users users;
  users.names[kRangeBaseUser] = 131072;
  for (std::uint32_t domid : {0u, 0x7ff0u, 0x7fffu, 0xffffffffu}) {
    auto uid = device_model_uid(users, domid, false);
    REQUIRE(uid.has_error());
    CHECK(uid.error().field == "xen.domid");
  }
  CHECK(device_model_uid(users, 0x7fef, false).has_value());
  users.taken.push_back(131072 + 9);
  auto taken = device_model_uid(users, 9, false);
  REQUIRE(taken.has_error());
  CHECK(taken.error().message.find("belongs to a user") != std::string::npos);
  users.names[kRangeBaseUser] = 0;
  CHECK(device_model_uid(users, 3, false).has_error());
}

TEST_CASE("the shared device-model uid is used only when allowed", "[xen]") {
  Users users;
  auto none = device_model_uid(users, 3, true);
  REQUIRE(none.has_error());
  CHECK(none.error().message.find(kRangeBaseUser) != std::string::npos);
  users.names[kSharedUser] = 5000;
  auto refused = device_model_uid(users, 3, false);
  REQUIRE(refused.has_error());
  CHECK(refused.error().message.find("--xen-shared-uid") != std::string::npos);
  auto shared = device_model_uid(users, 3, true);
  REQUIRE(shared.has_value());
  CHECK(shared->uid == 5000);
  CHECK(shared->shared);
  users.names[kSharedUser] = 0;
  CHECK(device_model_uid(users, 3, true).has_error());
}

TEST_CASE("the reaper is xen-qemuuser-reaper, else the range base, never root", "[xen]") {
  Users users;
  CHECK(reaper_uid(users).has_error());
  users.names[kRangeBaseUser] = 131072;
  CHECK(reaper_uid(users).value() == 131072);
  users.names[kReaperUser] = 131000;
  CHECK(reaper_uid(users).value() == 131000);
  users.names[kReaperUser] = 0;
  auto root = reaper_uid(users);
  REQUIRE(root.has_error());
  CHECK(root.error().message.find("root") != std::string::npos);
}

namespace {

// Records whether libxl's reaper lock was held while it was asked to kill.
class LockProbe final : public lifecycle::UidKiller {
 public:
  explicit LockProbe(std::string path) : path_(std::move(path)) {}
  std::error_code kill_all(uid_t reaper, uid_t uid) override {
    calls.emplace_back(reaper, uid);
    fdpass::UniqueFd other(::open(path_.c_str(), O_RDWR | O_CLOEXEC));
    // A second open file description: flock conflicts with the killer's own.
    held = other.valid() && ::flock(other.get(), LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK;
    return {};
  }
  std::vector<std::pair<uid_t, uid_t>> calls;
  bool held = false;

 private:
  std::string path_;
};

}  // namespace

TEST_CASE("each kill round runs under libxl's reaper lock, released afterwards", "[xen]") {
  qbtest::FdLeakCheck leaks;
  qbtest::TempDir dir;
  const std::string lock = dir / "dm-reaper-lock";
  LockProbe probe(lock);
  LockingUidKiller killer(probe, lock);
  CHECK_FALSE(killer.kill_all(131072, 131079));
  CHECK(probe.held);
  REQUIRE(probe.calls.size() == 1);
  CHECK(probe.calls[0] == std::pair<uid_t, uid_t>(131072, 131079));
  fdpass::UniqueFd after(::open(lock.c_str(), O_RDWR | O_CLOEXEC));
  REQUIRE(after.valid());
  CHECK(::flock(after.get(), LOCK_EX | LOCK_NB) == 0);
  struct stat st {};
  REQUIRE(::stat(lock.c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0600);
}

TEST_CASE("a lock that cannot be opened fails the kill without running it", "[xen]") {
  qbtest::TempDir dir;
  LockProbe probe(dir / "none");
  LockingUidKiller killer(probe, dir / "missing-dir/dm-reaper-lock");
  CHECK(killer.kill_all(131072, 131079));
  CHECK(probe.calls.empty());
}

TEST_CASE("a tracked domain is released when it is gone or dying, not when shut down", "[xen]") {
  std::vector<DomainInfo> now = {{0, false, false}, {3, true, false}, {4, false, true}, {6, false, false}};
  CHECK(released({3, 4, 5, 6}, now) == std::vector<std::uint32_t>{3, 5});
  CHECK(released({}, now).empty());
  CHECK(released({1, 2}, {}) == std::vector<std::uint32_t>{1, 2});
}

namespace {

std::vector<std::string> xen_command_line(bool pv) {
  lifecycle::LauncherConfig config;
  config.qemu.binary = "/usr/bin/qemu-system-x86_64";
  lifecycle::UidRange range{131072, 0x7ff0};
  lifecycle::ForkingUidKiller killer;
  lifecycle::Reaper reaper(killer, 131072);
  lifecycle::UidPool uids(range, "/nonexistent", reaper);
  lifecycle::CgroupManager cgroups("/nonexistent");
  qbtest::TempDir root;
  auto roots = fdpass::ImageRoots::open({root.path()});
  REQUIRE(roots.has_value());
  lifecycle::Launcher launcher(config, uids, cgroups, *roots);
  lifecycle::DomainSpec spec;
  spec.name = "guest";
  spec.xen = lifecycle::XenPart{12, pv, 131084, {}};
  return launcher.command_line(spec, lifecycle::Accel::tcg, nullptr, {});
}

bool has_pair(const std::vector<std::string>& a, std::string_view k, std::string_view v) {
  for (std::size_t i = 0; i + 1 < a.size(); ++i) {
    if (a[i] == k && a[i + 1] == v) return true;
  }
  return false;
}

bool has(const std::vector<std::string>& a, std::string_view w) {
  return std::find(a.begin(), a.end(), w) != a.end();
}

}  // namespace

TEST_CASE("an HVM device model runs xenfv restricted to its domid, with no PCIe ports", "[xen]") {
  auto a = xen_command_line(false);
  CHECK(has_pair(a, "-machine", "xenfv"));
  CHECK(has_pair(a, "-xen-domid", "12"));
  CHECK(has(a, "-xen-domid-restrict"));
  CHECK_FALSE(has(a, "-xen-attach"));
  CHECK(has(a, "-S"));
  for (const auto& w : a) {
    CHECK(w.find("accel=") == std::string::npos);
    CHECK(w.find("pcie-root-port") == std::string::npos);
  }
}

TEST_CASE("a PV domain's backends run xenpv attached to the domain", "[xen]") {
  auto a = xen_command_line(true);
  CHECK(has_pair(a, "-machine", "xenpv"));
  CHECK(has_pair(a, "-xen-domid", "12"));
  CHECK(has(a, "-xen-domid-restrict"));
  CHECK(has(a, "-xen-attach"));
}

namespace {

using qbfake::FakeQmpPeer;
using qbfake::Script;

std::unique_ptr<qmp::Client> connect(boost::asio::io_context& io, FakeQmpPeer& peer) {
  auto c = qbtest::run(io, qmp::Client::connect(io.get_executor(), peer.client_end(),
                                                qmp::after(5s)));
  REQUIRE(c.has_value());
  return std::move(*c);
}

ino_t inode_of(int fd) {
  struct stat st {};
  REQUIRE(::fstat(fd, &st) == 0);
  return st.st_ino;
}

}  // namespace

TEST_CASE("device state is saved into the fd the broker opened, passed in an fdset", "[xen][qmp]") {
  qbtest::FdLeakCheck leaks;
  qbtest::TempDir dir;
  fdpass::UniqueFd file(::open((dir / "state").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600));
  REQUIRE(file.valid());
  boost::asio::io_context io;
  Script s;
  s.handshake();
  s.expect("add-fd").reply(boost::json::parse(R"({"fdset-id": 4, "fd": 30})"));
  s.expect("xen-save-devices-state").reply();
  s.expect("remove-fd").reply();
  s.wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect(io, peer);
  auto r = qbtest::run(io, save_devices_state(*c, file, true, qmp::after(5s)));
  CHECK(r.has_value());
  c.reset();
  auto report = peer.join();
  CHECK(report.errors.empty());
  REQUIRE(report.commands.size() == 4);
  REQUIRE(report.commands[1].fds.size() == 1);
  CHECK(inode_of(report.commands[1].fds[0].get()) == inode_of(file.get()));
  const auto& save = report.commands[2].args;
  CHECK(save.at("filename") == "/dev/fdset/4");
  CHECK(save.at("live") == true);
  CHECK(report.commands[3].args.at("fdset-id") == 4);
}

TEST_CASE("a refused device-state load keeps QEMU's error and still removes the fdset",
          "[xen][qmp]") {
  qbtest::FdLeakCheck leaks;
  qbtest::TempDir dir;
  qbtest::write_file(dir / "state", "not a device state");
  fdpass::UniqueFd file(::open((dir / "state").c_str(), O_RDONLY | O_CLOEXEC));
  boost::asio::io_context io;
  Script s;
  s.handshake();
  s.expect("add-fd").reply(boost::json::parse(R"({"fdset-id": 0, "fd": 31})"));
  s.expect("xen-load-devices-state").reply_error("GenericError", "Error -22 while loading VM state");
  s.expect("remove-fd").reply();
  s.wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect(io, peer);
  auto r = qbtest::run(io, load_devices_state(*c, file, qmp::after(5s)));
  REQUIRE(r.has_error());
  CHECK(r.error().qmp_class == "GenericError");
  CHECK(r.error().message.find("xen-load-devices-state") != std::string::npos);
  c.reset();
  auto report = peer.join();
  CHECK(report.errors.empty());
  REQUIRE(report.commands.size() == 4);
  CHECK(report.commands[2].args.at("filename") == "/dev/fdset/0");
  CHECK_FALSE(report.commands[2].args.contains("live"));
  CHECK(report.commands[3].name == "remove-fd");
}

TEST_CASE("without a hypervisor the real libxenctrl is reported absent, in one message", "[xen]") {
  struct stat st {};
  if (::stat("/dev/xen/privcmd", &st) == 0) {
    WARN("skipped: this host has a Xen control interface");
    return;
  }
  qbtest::FdLeakCheck leaks;
  auto xc = XcDomainList::open();
  REQUIRE(xc.has_error());
  CHECK(xc.error().message.find("Xen control interface") != std::string::npos);
  CHECK(xc.error().code == std::errc::no_such_file_or_directory);
}

TEST_CASE("with no xenstored to reach, the real libxenstore is reported absent", "[xen]") {
  qbtest::FdLeakCheck leaks;
  qbtest::TempDir dir;
  const std::string socket = dir / "no-xenstored";
  ::setenv("XENSTORED_PATH", socket.c_str(), 1);
  auto xs = Store::open();
  ::unsetenv("XENSTORED_PATH");
  REQUIRE(xs.has_error());
  CHECK(xs.error().message.find(socket) != std::string::npos);
}
