// The warm pool against a real QEMU (TCG): a create of a pooled shape takes a QEMU the pool
// spawned before it was asked, plugs the disk and CD over QMP and boots from them in the order
// asked for; the pool refills; a create the pool cannot serve (direct kernel boot, another shape)
// spawns its own; a pooled QEMU that dies is discarded, its uid swept of what it left; a stopped
// pool leaves no process, uid record or file; a shape kept for restores serves a restore,
// whose guest goes on where it was saved, and no create; and a shape with a kernel serves the
// direct kernel boots and restores of that kernel file, until the file is replaced.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>

#include <boost/json.hpp>

#include "broker/domain/warm_pool.hpp"
#include "broker/lifecycle/proc.hpp"
#include "flows_fixture.hpp"

using namespace std::chrono_literals;
namespace fs = std::filesystem;
namespace json = boost::json;
using broker::lifecycle::Firmware;
using broker::lifecycle::processes_of_uid;
using qbtest::FlowsFixture;

namespace {

constexpr uid_t kHitBase = 3'170'000;
constexpr uid_t kDeadBase = 3'170'100;
constexpr uid_t kRestoreBase = 3'170'500;

broker::BrokerConfig pooled(std::uint32_t memory_mib, std::uint32_t count) {
  broker::BrokerConfig c;
  broker::PoolShape shape;
  shape.memory_mib = memory_mib;
  shape.count = count;
  c.pool = {shape};
  return c;
}

bool has_words(const std::vector<std::string>& words, const std::string& a, const std::string& b) {
  for (std::size_t i = 0; i + 1 < words.size(); ++i) {
    if (words[i] == a && words[i + 1] == b) return true;
  }
  return false;
}

// Runs the broker's io_context until `pred` holds or `timeout` passes.
bool run_until(FlowsFixture& fx, auto pred, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    fx.io.restart();
    fx.io.run_for(20ms);
  }
  return true;
}

// The pool's ready QEMUs of its one shape.
json::array ready(FlowsFixture& fx) {
  return fx.broker.pool().to_json().at("shapes").as_array().at(0).at("ready").as_array();
}

// Stops the pool (as qbrokerd does on SIGTERM).
boost::asio::awaitable<bool> stop_pool(broker::WarmPool& pool) {
  co_await pool.stop();
  co_return true;
}

}  // namespace

TEST_CASE("a create of a pooled shape boots a QEMU the pool spawned, in the order asked, and the pool refills",
          "[flows][pool][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  FlowsFixture fx(kHitBase, pooled(256, 1));
  fx.run(fx.broker.recover());  // the pool starts filling once recovery is done
  REQUIRE(run_until(fx, [&] { return ready(fx).size() == 1; }, 60s));
  const auto first = ready(fx).at(0).as_object();
  const auto pool_pid = first.at("pid").to_number<pid_t>();
  const auto pool_uid = first.at("uid").to_number<uid_t>();
  // Spawned ahead: paused, under its own uid, before any create.
  CHECK(broker::lifecycle::process_state("/proc", pool_pid) != 0);
  CHECK_FALSE(processes_of_uid("/proc", pool_uid).empty());

  // A hit: the same QEMU, now the domain's, boots from the disk the create named first.
  {
    auto console = fx.boot(qbtest::firmware_domain("p1", Firmware::bios, {"d0", "cd0"}));
    auto info = fx.run(fx.broker.info("p1", false));
    REQUIRE(info);
    CHECK(info->pooled);
    CHECK(info->pid == pool_pid);
    CHECK(info->uid == pool_uid);
    CHECK(qbtest::guest_says(*console, "cat /proc/cmdline").find("qb_boot=disk") != std::string::npos);
    // Its sockets and log carry the domain's name now; none of the pool's is left.
    CHECK(fs::exists(fx.run_dir / "qmp/p1.sock"));
    CHECK(fs::exists(fx.run_dir / "console/p1.sock"));
    CHECK_FALSE(fs::exists(fx.run_dir / "qmp/_pool-1.sock"));
    CHECK_FALSE(fs::exists(fx.run_dir / "console/_pool-1.sock"));
    CHECK_FALSE(fs::exists(fx.run_dir / "log/_pool-1.log"));
    CHECK(fs::exists(fx.run_dir / "log/p1.log"));
    CHECK(fx.broker.pool().to_json().at("hits").to_number<int>() == 1);
  }

  // The pool refilled behind it, under another uid; the next hit boots from the CD first.
  REQUIRE(run_until(fx, [&] { return ready(fx).size() == 1; }, 60s));
  const auto second_uid = ready(fx).at(0).at("uid").to_number<uid_t>();
  CHECK(second_uid != pool_uid);
  {
    auto console = fx.boot(qbtest::firmware_domain("p2", Firmware::bios, {"cd0", "d0"}));
    auto info = fx.run(fx.broker.info("p2", false));
    REQUIRE(info);
    CHECK(info->pooled);
    CHECK(info->uid == second_uid);
    CHECK(qbtest::guest_says(*console, "cat /proc/cmdline").find("qb_boot=cd") != std::string::npos);
  }

  // What the pool cannot serve spawns its own: a direct kernel boot, and another memory size.
  REQUIRE(run_until(fx, [&] { return ready(fx).size() == 1; }, 60s));
  {
    auto console = fx.boot(FlowsFixture::guest("k1"));
    auto info = fx.run(fx.broker.info("k1", false));
    REQUIRE(info);
    CHECK_FALSE(info->pooled);
    auto other = qbtest::firmware_domain("p3", Firmware::bios, {"d0"});
    other.spec.memory_mib = 192;
    auto c3 = fx.boot(std::move(other));
    auto info3 = fx.run(fx.broker.info("p3", false));
    REQUIRE(info3);
    CHECK_FALSE(info3->pooled);
    CHECK(qbtest::guest_says(*c3, "cat /proc/cmdline").find("qb_boot=disk") != std::string::npos);
  }
  CHECK(ready(fx).size() == 1);
  const auto left_uid = ready(fx).at(0).at("uid").to_number<uid_t>();

  for (const char* name : {"p1", "p2", "k1", "p3"}) REQUIRE(fx.run(fx.broker.destroy(name)));
  // Stopped, the pool kills its QEMU by uid and leaves nothing of it.
  REQUIRE(fx.run(stop_pool(fx.broker.pool())));
  qbtest::reap_exited_children();
  CHECK(processes_of_uid("/proc", left_uid).empty());
  CHECK(fs::is_empty(fx.state / "uids"));
  CHECK(fs::is_empty(fx.run_dir / "qmp"));
  CHECK(fs::is_empty(fx.run_dir / "console"));
  CHECK(fx.broker.pool().size() == 0);
}

TEST_CASE("a pooled QEMU that dies is discarded, its uid swept of what it left, and replaced",
          "[flows][pool][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  FlowsFixture fx(kDeadBase, pooled(128, 1));
  fx.run(fx.broker.recover());
  REQUIRE(run_until(fx, [&] { return ready(fx).size() == 1; }, 60s));
  const auto pid = ready(fx).at(0).at("pid").to_number<pid_t>();
  const auto uid = ready(fx).at(0).at("uid").to_number<uid_t>();
  // Something the QEMU left under its uid, as if it had forked before it died.
  pid_t straggler = qbtest::fork_as_uid(uid);
  REQUIRE(straggler > 0);
  qbtest::ChildGuard guard(straggler);
  REQUIRE(::kill(pid, SIGKILL) == 0);

  auto discarded = [&] { return fx.broker.pool().to_json().at("discarded").to_number<int>() == 1; };
  REQUIRE(run_until(fx, discarded, 30s));
  int status = 0;
  REQUIRE(::waitpid(straggler, &status, 0) == straggler);
  guard.reaped();
  CHECK(WIFSIGNALED(status));
  REQUIRE(run_until(fx, [&] { return ready(fx).size() == 1; }, 60s));
  CHECK(ready(fx).at(0).at("pid").to_number<pid_t>() != pid);

  REQUIRE(fx.run(stop_pool(fx.broker.pool())));
  qbtest::reap_exited_children();
  CHECK(processes_of_uid("/proc", uid).empty());
  CHECK(fs::is_empty(fx.state / "uids"));
}

namespace {

// A save root, made before the broker that is configured with it, and a pool kept for restores.
struct SaveRoot {
  qbtest::TempDir saves;
};

struct RestorePoolFixture : SaveRoot, FlowsFixture {
  RestorePoolFixture() : FlowsFixture(kRestoreBase, config(saves.path())) {}
  static broker::BrokerConfig config(const std::string& saves) {
    broker::BrokerConfig c = pooled(256, 1);
    c.pool[0].use = broker::PoolUse::restore;
    c.save_root = saves;
    return c;
  }
};

}  // namespace

TEST_CASE("a shape kept for restores serves a restore of a saved firmware domain and no create",
          "[flows][pool][privileged][qemu][save]") {
  QB_REQUIRE_ROOT();
  RestorePoolFixture fx;
  fx.run(fx.broker.recover());
  REQUIRE(run_until(fx, [&] { return ready(fx).size() == 1; }, 60s));
  CHECK(fx.broker.pool().to_json().at("shapes").as_array().at(0).at("for") == "restore");
  const auto pool_pid = ready(fx).at(0).at("pid").to_number<pid_t>();
  const auto pool_uid = ready(fx).at(0).at("uid").to_number<uid_t>();
  // It waits for a migration stream, which a create could never give it.
  CHECK(has_words(qbtest::cmdline_words(pool_pid), "-incoming", "defer"));

  // A create of the same shape spawns its own.
  auto console = fx.boot(qbtest::firmware_domain("r1", Firmware::bios, {"d0", "cd0"}));
  auto created = fx.run(fx.broker.info("r1", false));
  REQUIRE(created);
  CHECK_FALSE(created->pooled);
  CHECK(created->uid != pool_uid);
  CHECK(fx.broker.pool().to_json().at("hits").to_number<int>() == 0);
  REQUIRE(run_until(fx, [&] { return ready(fx).size() == 1; }, 60s));
  CHECK(ready(fx).at(0).at("pid").to_number<pid_t>() == pool_pid);

  // A mark in the guest's RAM (its root is a tmpfs), which a new boot would not have.
  REQUIRE(qbtest::guest(*console, "echo QB-SAVED-$((40 + 2)) > /tmp/mark").rc == 0);
  const std::string file = fx.saves / "r1.state";
  auto saved = fx.run(fx.broker.save("r1", {file, false}));
  INFO((saved ? "" : saved.error().describe()));
  REQUIRE(saved);
  console.reset();

  // The restore takes the pooled QEMU: its pid and uid, now the domain's, running the guest
  // where it was saved, booted from the disk it had.
  auto restored = fx.run(fx.broker.restore({file, "r2", false}));
  INFO((restored ? "" : restored.error().describe()));
  REQUIRE(restored);
  CHECK(restored->pooled);
  CHECK(restored->pid == pool_pid);
  CHECK(restored->uid == pool_uid);
  CHECK(restored->state == broker::RunState::running);
  CHECK(qbtest::fds_on(restored->pid, file) == 0);
  CHECK(fx.broker.pool().to_json().at("hits").to_number<int>() == 1);
  auto fd = qbtest::connect_retry(restored->console, 10s);
  REQUIRE(fd);
  qbtest::GuestConsole again(std::move(fd));
  CHECK(qbtest::guest_says(again, "cat /tmp/mark").find("QB-SAVED-42") != std::string::npos);
  CHECK(qbtest::guest_says(again, "cat /proc/cmdline").find("qb_boot=disk") != std::string::npos);
  CHECK_FALSE(fs::exists(fx.run_dir / "qmp/_pool-1.sock"));
  CHECK(fs::exists(fx.run_dir / "qmp/r2.sock"));
  for (const auto& line : fx.transcript) {
    INFO(line);
    CHECK(line.find(fx.saves.path()) == std::string::npos);
  }

  // The pool refills under another uid; the domain goes, then the pool, and nothing is left.
  REQUIRE(run_until(fx, [&] { return ready(fx).size() == 1; }, 60s));
  const auto next_uid = ready(fx).at(0).at("uid").to_number<uid_t>();
  CHECK(next_uid != pool_uid);
  REQUIRE(fx.run(fx.broker.destroy("r2")));
  REQUIRE(fx.run(stop_pool(fx.broker.pool())));
  qbtest::reap_exited_children();
  CHECK(processes_of_uid("/proc", pool_uid).empty());
  CHECK(processes_of_uid("/proc", next_uid).empty());
  CHECK(fs::is_empty(fx.state / "uids"));
  CHECK(fs::is_empty(fx.run_dir / "qmp"));
}

namespace {

constexpr uid_t kKernelBase = 3'170'700;

// An image root of its own holding a copy of the guest's kernel, which the test replaces, and a
// save root; both made before the broker whose config names them.
struct KernelDir {
  qbtest::TempDir dir;
  qbtest::TempDir saves;
  std::string kernel = dir / "vmlinuz";
  KernelDir() { fs::copy_file(qbtest::guest_kernel(), kernel); }
};

// Pool shapes with the copied kernel, the guest's initrd and its append line: one kept for
// creates and one for restores.
struct KernelPoolFixture : KernelDir, FlowsFixture {
  KernelPoolFixture()
      : FlowsFixture(kKernelBase, config(kernel, saves.path()),
                     broker::lifecycle::FirmwareConfig{}.ovmf_dir, {dir.path()}) {}
  static broker::BrokerConfig config(const std::string& kernel, const std::string& saves) {
    broker::BrokerConfig c = pooled(128, 1);
    c.pool[0].kernel = kernel;
    c.pool[0].initrd = qbtest::guest_initrd();
    c.pool[0].append = qbtest::kGuestAppend;
    broker::PoolShape restores = c.pool[0];
    restores.use = broker::PoolUse::restore;
    c.pool.push_back(restores);
    c.save_root = saves;
    return c;
  }
  // The test guest booted from the copied kernel.
  broker::CreateDomain domain(const std::string& name) const {
    auto c = FlowsFixture::guest(name);
    c.spec.kernel = kernel;
    return c;
  }
  json::array ready_of(std::size_t shape) {
    return broker.pool().to_json().at("shapes").as_array().at(shape).at("ready").as_array();
  }
};

}  // namespace

TEST_CASE("a shape with a kernel serves the direct kernel boots and restores of it, and not once the file is replaced",
          "[flows][pool][privileged][qemu][save]") {
  QB_REQUIRE_ROOT();
  KernelPoolFixture fx;
  fx.run(fx.broker.recover());
  auto both_ready = [&] { return fx.ready_of(0).size() == 1 && fx.ready_of(1).size() == 1; };
  REQUIRE(run_until(fx, both_ready, 90s));
  const auto create_pid = fx.ready_of(0).at(0).at("pid").to_number<pid_t>();
  const auto restore_pid = fx.ready_of(1).at(0).at("pid").to_number<pid_t>();
  // The kernel was loaded at the spawn, from the jail's mount of the file, never its host path.
  const auto words = qbtest::cmdline_words(create_pid);
  CHECK(has_words(words, "-kernel", "/boot/kernel"));
  CHECK(has_words(words, "-append", qbtest::kGuestAppend));
  CHECK(fx.broker.pool().to_json().at("shapes").as_array().at(0).at("kernel") == json::value(fx.kernel));

  // A create of that kernel takes the pooled QEMU and boots the guest.
  auto console = fx.boot(fx.domain("k1"));
  auto k1 = fx.run(fx.broker.info("k1", false));
  REQUIRE(k1);
  CHECK(k1->pooled);
  CHECK(k1->pid == create_pid);
  CHECK(qbtest::guest_says(*console, "cat /proc/cmdline").find("cryptomgr.notests") != std::string::npos);

  // Saved and restored: the restore shape's QEMU takes the guest where it was.
  REQUIRE(qbtest::guest(*console, "echo QB-KERNEL-$((40 + 2)) > /tmp/mark").rc == 0);
  const std::string file = fx.saves / "k1.state";
  auto saved = fx.run(fx.broker.save("k1", {file, false}));
  INFO((saved ? "" : saved.error().describe()));
  REQUIRE(saved);
  console.reset();
  auto restored = fx.run(fx.broker.restore({file, "k1r", false}));
  INFO((restored ? "" : restored.error().describe()));
  REQUIRE(restored);
  CHECK(restored->pooled);
  CHECK(restored->pid == restore_pid);
  {
    auto fd = qbtest::connect_retry(restored->console, 10s);
    REQUIRE(fd);
    qbtest::GuestConsole again(std::move(fd));
    CHECK(qbtest::guest_says(again, "cat /tmp/mark").find("QB-KERNEL-42") != std::string::npos);
  }
  REQUIRE(fx.run(fx.broker.destroy("k1r")));

  // Another kernel path is another shape: the create spawns its own.
  {
    auto own = fx.boot(FlowsFixture::guest("k2"));
    auto k2 = fx.run(fx.broker.info("k2", false));
    REQUIRE(k2);
    CHECK_FALSE(k2->pooled);
    REQUIRE(fx.run(fx.broker.destroy("k2")));
  }

  // The file replaced after the refill's spawn: that QEMU holds the old kernel, so the next
  // create spawns its own and the stale QEMU is discarded; its replacement loads the new file.
  REQUIRE(run_until(fx, both_ready, 90s));
  const auto stale_pid = fx.ready_of(0).at(0).at("pid").to_number<pid_t>();
  fs::copy_file(qbtest::guest_kernel(), fx.kernel + ".new");
  fs::rename(fx.kernel + ".new", fx.kernel);
  {
    auto c3 = fx.boot(fx.domain("k3"));
    auto k3 = fx.run(fx.broker.info("k3", false));
    REQUIRE(k3);
    CHECK_FALSE(k3->pooled);
    REQUIRE(fx.run(fx.broker.destroy("k3")));
  }
  auto discarded = [&] { return fx.broker.pool().to_json().at("discarded").to_number<int>() == 1; };
  REQUIRE(run_until(fx, discarded, 30s));
  qbtest::reap_exited_children();
  CHECK(::kill(stale_pid, 0) == -1);  // killed by uid and reaped; the uid may serve the refill
  REQUIRE(run_until(fx, both_ready, 90s));
  const auto fresh_pid = fx.ready_of(0).at(0).at("pid").to_number<pid_t>();
  CHECK(fresh_pid != stale_pid);
  {
    auto c4 = fx.boot(fx.domain("k4"));
    auto k4 = fx.run(fx.broker.info("k4", false));
    REQUIRE(k4);
    CHECK(k4->pooled);
    CHECK(k4->pid == fresh_pid);
    REQUIRE(fx.run(fx.broker.destroy("k4")));
  }

  REQUIRE(fx.run(stop_pool(fx.broker.pool())));
  qbtest::reap_exited_children();
  CHECK(fs::is_empty(fx.state / "uids"));
  CHECK(fs::is_empty(fx.run_dir / "qmp"));
  CHECK(fs::is_empty(fx.run_dir / "console"));
  for (const auto& line : fx.transcript) {
    INFO(line);
    CHECK(line.find(fx.dir.path()) == std::string::npos);
  }
}
