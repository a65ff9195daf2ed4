// The Broker's own operations against a real QEMU: create, query, run state, passthrough,
// destroy, and what is left afterwards.
#include <fcntl.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/wait.h>

#include <algorithm>
#include <filesystem>
#include <set>
#include <vector>

#include <boost/asio/co_spawn.hpp>

#include <boost/json.hpp>

#include "broker/core/atomic_file.hpp"
#include "broker/core/errc.hpp"
#include "broker/lifecycle/errc.hpp"
#include "broker/lifecycle/proc.hpp"
#include "broker_fixture.hpp"

using namespace std::chrono_literals;
namespace fs = std::filesystem;
namespace json = boost::json;

namespace {
constexpr uid_t kBase = 3'101'000;
constexpr uid_t kDupBase = 3'101'100;
constexpr uid_t kFullBase = 3'101'500;
constexpr uid_t kStuckBase = 3'101'800;

// A tmpfs of a few pages mounted over `dir` and filled to the last byte, unmounted at scope exit.
class FullFilesystem {
 public:
  explicit FullFilesystem(const std::string& dir) : dir_(dir) {
    mounted_ = ::mount("qbtest-full", dir.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "size=16k") == 0;
    if (!mounted_) return;
    fdpass::UniqueFd fill(::open((dir + "/fill").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600));
    const std::string block(4096, 'x');
    while (fill && ::write(fill.get(), block.data(), block.size()) > 0) {
    }
  }
  ~FullFilesystem() {
    if (mounted_) ::umount2(dir_.c_str(), MNT_DETACH);
  }
  bool mounted() const { return mounted_; }

 private:
  std::string dir_;
  bool mounted_ = false;
};

}  // namespace

TEST_CASE("a domain is created, runs, pauses, resumes and is destroyed by uid",
          "[broker][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  {
    qbtest::BrokerFixture fx(kBase);
    auto events = fx.broker.events().subscribe("vm1");
    auto info = fx.run(fx.broker.create(qbtest::BrokerFixture::guest("vm1")));
    REQUIRE(info);
    CHECK(info->state == broker::RunState::running);
    CHECK(info->uid == kBase + 1);
    CHECK(fs::exists(fx.state / "domains/vm1.json"));

    auto live = fx.run(fx.broker.info("vm1"));
    REQUIRE(live);
    CHECK(live->qemu_status == "running");

    // The record says what the domain is in, and no job once the create is over.
    auto record = [&] {
      auto text = broker::read_small_file(fx.state / "domains/vm1.json");
      REQUIRE(text);
      return json::parse(*text).as_object();
    };
    CHECK(record().at("state") == "running");
    CHECK_FALSE(record().contains("job"));
    REQUIRE(fx.run(fx.broker.pause("vm1")));
    CHECK(fx.run(fx.broker.info("vm1"))->qemu_status == "paused");
    CHECK(record().at("state") == "paused");
    auto again = fx.run(fx.broker.pause("vm1"));
    REQUIRE_FALSE(again);
    CHECK(again.error().code == broker::errc::wrong_state);
    REQUIRE(fx.run(fx.broker.resume("vm1")));
    CHECK(fx.run(fx.broker.info("vm1"))->qemu_status == "running");
    CHECK(record().at("state") == "running");

    auto command = [](std::string_view text) {
      return broker::parse_qmp_passthrough(json::parse(text)).value();
    };
    auto qmp = fx.run(fx.broker.qmp_passthrough("vm1", command(R"({"execute":"query-status"})")));
    REQUIRE(qmp);
    CHECK(qmp->as_object().at("status") == "running");
    auto refused =
        broker::parse_qmp_passthrough(json::parse(R"({"execute":"getfd","arguments":{"fdname":"x"}})"));
    REQUIRE_FALSE(refused);
    CHECK(refused.error().code == broker::errc::forbidden);
    CHECK(refused.error().field == "execute");
    // A name QMP cannot carry is refused by the encoder with its own code (400 in the error map).
    auto unencodable = fx.run(fx.broker.qmp_passthrough("vm1", command(R"({"execute":"bad name"})")));
    REQUIRE_FALSE(unencodable);
    CHECK(unencodable.error().code == qmp::errc::invalid_command);
    auto bad = fx.run(fx.broker.qmp_passthrough("vm1", command(R"({"execute":"no-such-command"})")));
    REQUIRE_FALSE(bad);
    CHECK(bad.error().code == qmp::errc::command_failed);
    CHECK(bad.error().qmp_class == "CommandNotFound");

    auto report = fx.run(fx.broker.destroy("vm1"));
    REQUIRE(report);
    CHECK(report->survivors == 0);
    CHECK(broker::lifecycle::live_processes_of_uid("/proc", kBase + 1) == 0);
    CHECK_FALSE(fx.broker.exists("vm1"));
    CHECK_FALSE(fs::exists(fx.state / "domains/vm1.json"));
    CHECK(fx.uids.in_use().empty());
    auto gone = fx.run(fx.broker.info("vm1"));
    REQUIRE_FALSE(gone);
    CHECK(gone.error().code == broker::errc::not_found);

    std::vector<std::string> names;
    while (auto e = fx.run(events->next(std::chrono::steady_clock::now()))) names.push_back(e->name);
    CHECK(std::find(names.begin(), names.end(), "created") != names.end());
    CHECK(std::find(names.begin(), names.end(), "STOP") != names.end());
    CHECK(std::find(names.begin(), names.end(), "RESUME") != names.end());
    CHECK(std::find(names.begin(), names.end(), "destroyed") != names.end());
  }
}

TEST_CASE("a second domain with the same name is refused, and a QEMU that dies is torn down by uid",
          "[broker][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::BrokerFixture fx(kDupBase);
  auto first = fx.run(fx.broker.create(qbtest::BrokerFixture::guest("dup")));
  REQUIRE(first);
  auto second = fx.run(fx.broker.create(qbtest::BrokerFixture::guest("dup")));
  REQUIRE_FALSE(second);
  CHECK(second.error().code == broker::errc::already_exists);
  CHECK(second.error().field == "name");

  // Kill QEMU behind the broker's back: the broker notices and cleans up the uid.
  auto events = fx.broker.events().subscribe("dup");
  ::kill(first->pid, SIGKILL);
  std::optional<broker::BusEvent> exited;
  for (int i = 0; i < 100 && !exited; ++i) {
    auto e = fx.run(events->next(std::chrono::steady_clock::now() + 100ms));
    if (e && e->name == "exited") exited = e;
  }
  REQUIRE(exited);
  CHECK_FALSE(fx.broker.exists("dup"));
  CHECK(fx.uids.in_use().empty());
  CHECK(broker::lifecycle::processes_of_uid("/proc", kDupBase + 1).empty());
}

TEST_CASE("a domain whose record cannot be written is not created, and nothing of it is left",
          "[broker][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  qbtest::BrokerFixture fx(kFullBase);
  FullFilesystem full(fx.state / "domains");
  REQUIRE(full.mounted());
  auto created = fx.run(fx.broker.create(qbtest::BrokerFixture::guest("full1")));
  REQUIRE_FALSE(created);
  INFO(created.error().describe());
  CHECK(created.error().code == std::error_code(ENOSPC, std::system_category()));
  CHECK(created.error().message.find("record") != std::string::npos);
  CHECK_FALSE(fx.broker.exists("full1"));
  CHECK(broker::lifecycle::live_processes_of_uid("/proc", kFullBase + 1) == 0);
  CHECK(fx.uids.in_use().empty());
}

TEST_CASE("a teardown the sweep cannot finish is retried, by DELETE and in the background",
          "[broker][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::UidOnlyKiller killer;  // the holder below then survives every sweep
  qbtest::BrokerFixture fx(kStuckBase, {}, &killer);
  auto info = fx.run(fx.broker.create(qbtest::BrokerFixture::guest("stuck")));
  REQUIRE(info);
  const uid_t uid = info->uid;
  // Something kill(-1) as the domain's uid cannot reach holds it: its effective uid alone, and
  // the kill by pid fails.
  pid_t holder = ::fork();
  if (holder == 0) {
    if (::setresuid(kStuckBase + 30, uid, kStuckBase + 30) != 0) ::_exit(99);
    for (;;) ::pause();
  }
  REQUIRE(holder > 0);
  qbtest::ChildGuard guard(holder);

  auto failed = fx.run(fx.broker.destroy("stuck"));
  REQUIRE_FALSE(failed);
  INFO(failed.error().describe());
  CHECK(failed.error().message.find(std::to_string(holder)) != std::string::npos);
  REQUIRE(fx.broker.exists("stuck"));
  CHECK(fx.run(fx.broker.info("stuck", false))->state == broker::RunState::stopping);
  // A DELETE may try again (it is not "already being destroyed"), and fails the same way.
  auto again = fx.run(fx.broker.destroy("stuck"));
  REQUIRE_FALSE(again);
  CHECK(again.error().code != broker::errc::busy);
  CHECK(fx.run(fx.broker.retry_stuck()).torn_down.empty());
  CHECK(fx.uids.in_use().contains(uid));

  // Once the holder is gone, the background pass finishes the teardown and frees the uid.
  REQUIRE(::kill(holder, SIGKILL) == 0);
  REQUIRE(::waitpid(holder, nullptr, 0) == holder);
  guard.reaped();
  auto retried = fx.run(fx.broker.retry_stuck());
  CHECK(retried.torn_down == std::vector<std::string>{"stuck"});
  CHECK_FALSE(fx.broker.exists("stuck"));
  CHECK(fx.uids.in_use().empty());
  CHECK(broker::lifecycle::live_processes_of_uid("/proc", uid) == 0);
  CHECK_FALSE(fs::exists(fx.state / "domains/stuck.json"));
}

TEST_CASE("independent domains start and stop at once, each under its own swept uid",
          "[broker][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  constexpr uid_t kParallelBase = 3'150'000;
  qbtest::FdLeakCheck leaks;
  qbtest::BrokerFixture fx(kParallelBase);
  // Something left under one uid of the range: whichever start gets that uid kills it first.
  const pid_t planted = qbtest::fork_as_uid(kParallelBase + 3);
  REQUIRE(planted > 0);
  qbtest::ChildGuard guard(planted);

  constexpr int kDomains = 7;  // every uid of the range
  std::vector<std::optional<broker::Result<broker::DomainInfo>>> created(kDomains);
  for (int i = 0; i < kDomains; ++i) {
    broker::CreateDomain c;
    c.spec = qbtest::LifecycleFixture::tiny_spec("p" + std::to_string(i));
    boost::asio::co_spawn(fx.io, fx.broker.create(std::move(c)),
                          [&created, i](std::exception_ptr, broker::Result<broker::DomainInfo> r) {
                            created[i].emplace(std::move(r));
                          });
  }
  auto all_done = [](const auto& results) {
    return std::all_of(results.begin(), results.end(), [](const auto& r) { return r.has_value(); });
  };
  while (!all_done(created)) fx.io.run_one();
  std::set<uid_t> uids;
  for (const auto& r : created) {
    REQUIRE(*r);
    CHECK((**r).state == broker::RunState::running);
    uids.insert((**r).uid);
  }
  CHECK(uids.size() == kDomains);
  CHECK(*uids.begin() == kParallelBase + 1);
  CHECK(*uids.rbegin() == kParallelBase + kDomains);
  int status = 0;
  REQUIRE(::waitpid(planted, &status, 0) == planted);
  guard.reaped();
  CHECK(WIFSIGNALED(status));
  // The range is full: one more start is refused, not given a uid in use.
  auto more = fx.run(fx.broker.create([] {
    broker::CreateDomain c;
    c.spec = qbtest::LifecycleFixture::tiny_spec("p-more");
    return c;
  }()));
  REQUIRE_FALSE(more);
  CHECK(more.error().code == broker::lifecycle::errc::uid_exhausted);

  std::vector<std::optional<broker::Result<broker::lifecycle::KillReport>>> destroyed(kDomains);
  for (int i = 0; i < kDomains; ++i) {
    boost::asio::co_spawn(
        fx.io, fx.broker.destroy("p" + std::to_string(i)),
        [&destroyed, i](std::exception_ptr, broker::Result<broker::lifecycle::KillReport> r) {
          destroyed[i].emplace(std::move(r));
        });
  }
  while (!all_done(destroyed)) fx.io.run_one();
  for (const auto& r : destroyed) {
    REQUIRE(*r);
    CHECK((**r).survivors == 0);
  }
  for (uid_t uid : uids) CHECK(broker::lifecycle::live_processes_of_uid("/proc", uid) == 0);
  CHECK(fx.uids.in_use().empty());
  CHECK(fx.broker.list().empty());
}
