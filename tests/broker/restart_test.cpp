// Restart recovery at the Broker level: a broker that goes away without tearing anything down
// (as after SIGKILL) leaves its domains running; the next broker on the same state directory
// re-adopts each one whose QEMU still runs (pid + start time + uid, QMP through the listener the
// QEMU holds) and tears down by uid each one whose QEMU is gone. No uid, file or process leaks.
#include <signal.h>
#include <sys/wait.h>

#include <filesystem>
#include <memory>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/json.hpp>

#include "broker/control/broker.hpp"
#include "broker/core/atomic_file.hpp"
#include "broker/core/errc.hpp"
#include "broker/lifecycle/proc.hpp"
#include "lifecycle_fixture.hpp"
#include "support/asio_run.hpp"

using namespace std::chrono_literals;
namespace fs = std::filesystem;
using broker::lifecycle::live_processes_of_uid;
using broker::lifecycle::processes_of_uid;

using qbtest::fds_on;

namespace {

constexpr uid_t kAdoptBase = 3'101'200;
constexpr uid_t kDeadBase = 3'101'300;
constexpr uid_t kOrphanBase = 3'101'400;
constexpr uid_t kStoppedBase = 3'101'600;
constexpr uid_t kMediumBase = 3'101'700;
constexpr uid_t kFinishBase = 3'101'900;
constexpr uid_t kSaveBase = 3'108'040;
constexpr uid_t kRestoreBase = 3'108'050;
constexpr uid_t kUpdateBase = 3'108'070;

// Everything one broker process would own, on shared state and run directories.
struct Stack {
  broker::lifecycle::ForkingUidKiller killer;
  broker::lifecycle::Reaper reaper;
  broker::lifecycle::UidPool uids;
  broker::lifecycle::CgroupManager cgroups;
  fdpass::ImageRoots roots;
  broker::lifecycle::Launcher launcher;
  boost::asio::io_context io;
  std::unique_ptr<broker::Broker> broker;

  // `images`: an image root besides the test guest's directory.
  Stack(uid_t base, const std::string& state, const std::string& run,
        broker::BrokerConfig config = {}, const std::string& images = {})
      : reaper(killer, base),
        uids({base, 8}, state, reaper),
        cgroups({}, qbtest::LifecycleFixture::cgroup_group(base)),
        roots(*fdpass::ImageRoots::open(images.empty() ? std::vector<std::string>{qbtest::guest_dir()}
                                                       : std::vector<std::string>{qbtest::guest_dir(), images})),
        launcher(qbtest::LifecycleFixture::make_config(run), uids, cgroups, roots) {
    uids.load();
    broker::BrokerConfig c = std::move(config);
    c.records_dir = state + "/domains";
    broker = std::make_unique<broker::Broker>(io.get_executor(), c, launcher, roots);
  }
  ~Stack() {
    broker.reset();
    cgroups.remove_base_if_empty();
  }
  template <class T>
  T run(boost::asio::awaitable<T> t) {
    return qbtest::run(io, std::move(t));
  }
};

broker::CreateDomain guest(const std::string& name) {
  broker::CreateDomain c;
  c.spec = qbtest::LifecycleFixture::guest_spec(name);
  return c;
}

// `record` (a domain record's text) as a broker that died in the middle of `kind` on `target`
// left it: the job journaled, the devices as they were before it.
void write_interrupted(const std::string& file, const std::string& record, const std::string& kind,
                       const std::string& target, boost::json::object args = {}) {
  auto o = boost::json::parse(record).as_object();
  boost::json::object job{{"kind", kind}, {"target", target}};
  if (!args.empty()) job["args"] = std::move(args);
  o["job"] = std::move(job);
  qbtest::write_file(file, boost::json::serialize(o));
}

// The medium the API shows in CD drive `id`, "" for none.
std::string medium_of(Stack& s, const std::string& domain, const std::string& id) {
  auto info = s.run(s.broker->info(domain, false));
  REQUIRE(info);
  for (const auto& cd : info->devices.at("cdroms").as_array()) {
    if (cd.at("id").as_string() != id) continue;
    const auto& m = cd.at("medium");
    return m.is_string() ? std::string(m.as_string()) : std::string();
  }
  FAIL("no CD drive " << id);
  return {};
}

}  // namespace

TEST_CASE("a restarted broker re-adopts a running domain and can still destroy it",
          "[broker][restart][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::become_subreaper();
  qbtest::TempDir state, run;
  pid_t pid = 0;
  {
    Stack first(kAdoptBase, state.path(), run.path());
    auto info = first.run(first.broker->create(guest("r1")));
    REQUIRE(info);
    pid = info->pid;
  }  // the broker is gone; nothing was torn down
  REQUIRE(::kill(pid, 0) == 0);
  CHECK(live_processes_of_uid("/proc", kAdoptBase + 1) >= 1);

  qbtest::FdLeakCheck leaks;
  {
    Stack second(kAdoptBase, state.path(), run.path());
    auto report = second.run(second.broker->recover());
    REQUIRE(report.adopted == std::vector<std::string>{"r1"});
    CHECK(report.torn_down.empty());
    auto info = second.run(second.broker->info("r1"));
    REQUIRE(info);
    CHECK(info->pid == pid);
    CHECK(info->qemu_status == "running");
    REQUIRE(second.run(second.broker->pause("r1")));
    CHECK(second.run(second.broker->info("r1"))->qemu_status == "paused");

    auto killed = second.run(second.broker->destroy("r1"));
    REQUIRE(killed);
    CHECK(killed->method.find("pidns-init") != std::string::npos);  // the pidfd was re-opened
    CHECK(killed->method.find("cgroup.kill") != std::string::npos);  // and the cgroup
  }
  qbtest::reap_exited_children();
  CHECK(processes_of_uid("/proc", kAdoptBase + 1).empty());
  CHECK(fs::is_empty(state / "uids"));
  CHECK(fs::is_empty(state / "domains"));
  CHECK_FALSE(fs::exists(run / "qmp/r1.sock"));
}

TEST_CASE("a restarted broker tears down by uid a domain whose QEMU died meanwhile",
          "[broker][restart][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::become_subreaper();
  qbtest::TempDir state, run;
  uid_t uid = 0;
  {
    Stack first(kDeadBase, state.path(), run.path());
    auto info = first.run(first.broker->create(guest("r2")));
    REQUIRE(info);
    uid = info->uid;
    ::kill(info->pid, SIGKILL);  // QEMU dies while no broker watches
  }
  // A process the dead QEMU left behind under its uid (as if it had forked before dying).
  pid_t straggler = qbtest::fork_as_uid(uid);
  REQUIRE(straggler > 0);
  qbtest::ChildGuard straggler_guard(straggler);
  qbtest::reap_exited_children();

  Stack second(kDeadBase, state.path(), run.path());
  auto report = second.run(second.broker->recover());
  CHECK(report.adopted.empty());
  REQUIRE(report.torn_down == std::vector<std::string>{"r2"});
  int status = 0;
  REQUIRE(::waitpid(straggler, &status, 0) == straggler);
  straggler_guard.reaped();
  CHECK(WIFSIGNALED(status));
  CHECK(live_processes_of_uid("/proc", uid) == 0);
  CHECK_FALSE(second.broker->exists("r2"));
  CHECK(fs::is_empty(state / "uids"));
  CHECK(fs::is_empty(state / "domains"));
}

TEST_CASE("a restarted broker kills and releases a uid recorded without a domain",
          "[broker][restart][privileged]") {
  QB_REQUIRE_ROOT();
  qbtest::become_subreaper();
  qbtest::TempDir state, run;
  const uid_t uid = kOrphanBase + 3;
  // An earlier broker recorded the uid and died before it recorded the domain; something of the
  // uid runs (as if the QEMU had started).
  fs::create_directories(state / "uids");
  qbtest::write_file(state / ("uids/" + std::to_string(uid)), "ghost");
  // ... and had bound its QMP and console listeners.
  fs::create_directories(run / "qmp");
  fs::create_directories(run / "console");
  qbtest::write_file(run / "qmp/ghost.sock", "");
  qbtest::write_file(run / "console/ghost.sock", "");
  pid_t orphan = qbtest::fork_as_uid(uid);
  REQUIRE(orphan > 0);
  qbtest::ChildGuard orphan_guard(orphan);
  REQUIRE(live_processes_of_uid("/proc", uid) == 1);

  Stack second(kOrphanBase, state.path(), run.path());
  auto report = second.run(second.broker->recover());
  CHECK(report.adopted.empty());
  CHECK(report.torn_down.empty());
  CHECK(report.reclaimed_uids == std::vector<uid_t>{uid});
  int status = 0;
  REQUIRE(::waitpid(orphan, &status, 0) == orphan);
  orphan_guard.reaped();
  CHECK(WIFSIGNALED(status));
  CHECK(live_processes_of_uid("/proc", uid) == 0);
  CHECK(fs::is_empty(state / "uids"));
  CHECK(second.uids.in_use().empty());
  CHECK_FALSE(fs::exists(run / "qmp/ghost.sock"));
  CHECK_FALSE(fs::exists(run / "console/ghost.sock"));
}

TEST_CASE("a restarted broker adopts the others at once while a stopped QEMU stays unresponsive",
          "[broker][restart][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::become_subreaper();
  qbtest::TempDir state, run;
  pid_t stopped = 0;
  {
    Stack first(kStoppedBase, state.path(), run.path());
    REQUIRE(first.run(first.broker->create(guest("s1"))));
    auto info = first.run(first.broker->create(guest("s2")));
    REQUIRE(info);
    stopped = info->pid;
  }
  REQUIRE(::kill(stopped, SIGSTOP) == 0);

  broker::BrokerConfig quick;
  quick.adopt_timeout = 1s;
  Stack second(kStoppedBase, state.path(), run.path(), quick);
  const auto start = std::chrono::steady_clock::now();
  auto report = second.run(second.broker->recover());
  const auto took = std::chrono::steady_clock::now() - start;
  CHECK(report.adopted == std::vector<std::string>{"s1"});
  CHECK(report.unresponsive == std::vector<std::string>{"s2"});
  CHECK(report.torn_down.empty());
  CHECK(took < 5s);  // the adopt timeout (1 s), not the start timeout (30 s)
  CHECK(::kill(stopped, 0) == 0);  // never killed for being slow
  auto info = second.run(second.broker->info("s2", false));
  REQUIRE(info);
  CHECK(info->state == broker::RunState::unresponsive);
  auto refused = second.run(second.broker->pause("s2"));
  REQUIRE_FALSE(refused);
  CHECK(refused.error().code == broker::errc::wrong_state);
  REQUIRE(second.run(second.broker->pause("s1")));  // the other domain is served meanwhile

  // Once it runs again, the background retry adopts it.
  REQUIRE(::kill(stopped, SIGCONT) == 0);
  auto answered = second.run([&]() -> boost::asio::awaitable<bool> {
    for (int i = 0; i < 100; ++i) {
      auto now = co_await second.broker->info("s2", false);
      if (now && now->state == broker::RunState::running) co_return true;
      boost::asio::steady_timer t(second.io, 100ms);
      co_await t.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
    }
    co_return false;
  }());
  CHECK(answered);
  CHECK(second.run(second.broker->info("s2"))->qemu_status == "running");

  REQUIRE(second.run(second.broker->destroy("s1")));
  REQUIRE(second.run(second.broker->destroy("s2")));
  qbtest::reap_exited_children();
  CHECK(live_processes_of_uid("/proc", kStoppedBase + 1) == 0);
  CHECK(live_processes_of_uid("/proc", kStoppedBase + 2) == 0);
}

TEST_CASE("a restarted broker records the CD medium QEMU holds after an interrupted change",
          "[broker][restart][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::become_subreaper();
  qbtest::TempDir state, run, images;
  const std::string a = images / "a.iso", b = images / "b.iso";
  for (const auto& path : {a, b}) {
    qbtest::write_file(path, "QB-MEDIUM");
    fs::resize_file(path, 1 << 20);
  }
  const std::string file = state / "domains/m1.json";
  std::string before;
  pid_t qemu = 0;
  {
    Stack first(kMediumBase, state.path(), run.path(), {}, images.path());
    auto c = guest("m1");
    c.cdroms.push_back(broker::CdromSpec{"cd0", a});
    auto info = first.run(first.broker->create(std::move(c)));
    REQUIRE(info);
    qemu = info->pid;
    auto text = broker::read_small_file(file);
    REQUIRE(text);
    before = *text;
    REQUIRE(first.run(first.broker->insert_medium("m1", "cd0", {b, false})));
    REQUIRE(fds_on(qemu, b) > 0);
  }
  // The broker died after QEMU took the new medium and before the record said so.
  write_interrupted(file, before, "cdrom-insert", "cd0", {{"path", b}});
  {
    Stack second(kMediumBase, state.path(), run.path(), {}, images.path());
    auto report = second.run(second.broker->recover());
    REQUIRE(report.adopted == std::vector<std::string>{"m1"});
    CHECK(medium_of(second, "m1", "cd0") == b);
    auto now = broker::read_small_file(file);
    REQUIRE(now);
    CHECK(now->find("cdrom-insert") == std::string::npos);
    CHECK(now->find(b) != std::string::npos);
    CHECK(fds_on(qemu, a) == 0);
    // The medium is the broker's again: an eject takes it out and QEMU lets go of it.
    REQUIRE(second.run(second.broker->eject_medium("m1", "cd0", false)));
    CHECK(medium_of(second, "m1", "cd0").empty());
    CHECK(fds_on(qemu, b) == 0);
    auto text = broker::read_small_file(file);
    REQUIRE(text);
    before = *text;
  }
  // The broker died before an insert reached QEMU: the drive stays empty and nothing is left.
  write_interrupted(file, before, "cdrom-insert", "cd0", {{"path", a}});
  {
    Stack third(kMediumBase, state.path(), run.path(), {}, images.path());
    auto report = third.run(third.broker->recover());
    REQUIRE(report.adopted == std::vector<std::string>{"m1"});
    CHECK(medium_of(third, "m1", "cd0").empty());
    CHECK(fds_on(qemu, a) == 0);
    REQUIRE(third.run(third.broker->destroy("m1")));
  }
  qbtest::reap_exited_children();
  CHECK(live_processes_of_uid("/proc", kMediumBase + 1) == 0);
}

TEST_CASE("a restarted broker finishes a hotplug that got as far as plugging the device",
          "[broker][restart][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::become_subreaper();
  qbtest::TempDir state, run, images;
  const std::string img = images / "d0.img";
  qbtest::write_file(img, "QB-FINISH");
  fs::resize_file(img, 1 << 20);
  const std::string file = state / "domains/f1.json";
  std::string before;
  pid_t qemu = 0;
  broker::DiskSpec disk;
  disk.id = "d0";
  disk.path = img;
  disk.bus = broker::DiskBus::virtio;
  {
    Stack first(kFinishBase, state.path(), run.path(), {}, images.path());
    auto c = guest("f1");
    c.spec.paused = true;  // a guest that could not answer an unplug
    auto info = first.run(first.broker->create(std::move(c)));
    REQUIRE(info);
    qemu = info->pid;
    before = *broker::read_small_file(file);
    REQUIRE(first.run(first.broker->add_disk("f1", disk)));
  }
  // The broker died after device_add and before the record said so.
  write_interrupted(file, before, "disk-add", "d0", broker::to_json(disk));
  Stack second(kFinishBase, state.path(), run.path(), {}, images.path());
  auto report = second.run(second.broker->recover());
  REQUIRE(report.adopted == std::vector<std::string>{"f1"});
  auto info = second.run(second.broker->info("f1", false));
  REQUIRE(info);
  const auto& disks = info->devices.at("disks").as_array();
  REQUIRE(disks.size() == 1);
  CHECK(disks[0].at("id") == "d0");
  CHECK(disks[0].at("bus") == "virtio");
  CHECK(fds_on(qemu, img) > 0);
  auto record = boost::json::parse(*broker::read_small_file(file)).as_object();
  CHECK_FALSE(record.contains("job"));
  CHECK(record.at("slots").as_object().at("rp1") == "d0");  // the port the flow had taken
  // It is the broker's disk now: a second one takes the next port, and destroy frees all.
  broker::DiskSpec other = disk;
  other.id = "d1";
  qbtest::write_file(images / "d1.img", "QB-OTHER");
  fs::resize_file(images / "d1.img", 1 << 20);
  other.path = images / "d1.img";
  REQUIRE(second.run(second.broker->add_disk("f1", other)));
  REQUIRE(second.run(second.broker->destroy("f1")));
  qbtest::reap_exited_children();
  CHECK(live_processes_of_uid("/proc", kFinishBase + 1) == 0);
}

TEST_CASE("a broker killed in the last pass of a save leaves the domain running and no partial file",
          "[broker][restart][privileged][qemu][save]") {
  QB_REQUIRE_ROOT();
  qbtest::become_subreaper();
  qbtest::TempDir state, run, saves;
  broker::BrokerConfig config;
  config.save_root = saves.path();
  const std::string file = state / "domains/s1.json";
  const std::string target = saves / "s1.state";
  const std::string partial = saves / ".s1.state.s1.part";
  std::string before;
  pid_t qemu = 0;
  {
    Stack first(kSaveBase, state.path(), run.path(), config);
    auto info = first.run(first.broker->create(guest("s1")));
    REQUIRE(info);
    qemu = info->pid;
    auto text = broker::read_small_file(file);
    REQUIRE(text);
    before = *text;
    // QEMU stops the guest for a save's last pass; the broker died there, its copy half written.
    REQUIRE(first.run(first.broker->qmp_passthrough("s1", {"stop", {}})));
  }
  qbtest::write_file(partial, "QBSAVE\r\n half a save");
  write_interrupted(file, before, "save", "",
                    {{"path", target}, {"keep_running", false}, {"was_running", true}});
  {
    Stack second(kSaveBase, state.path(), run.path(), config);
    auto report = second.run(second.broker->recover());
    REQUIRE(report.adopted == std::vector<std::string>{"s1"});
    // Exactly once, running, and the same QEMU; nothing of the save is left.
    auto info = second.run(second.broker->info("s1"));
    REQUIRE(info);
    CHECK(info->pid == qemu);
    CHECK(info->state == broker::RunState::running);
    CHECK(info->qemu_status == "running");
    CHECK_FALSE(fs::exists(partial));
    CHECK_FALSE(fs::exists(target));
    auto now = broker::read_small_file(file);
    REQUIRE(now);
    CHECK(now->find("\"save\"") == std::string::npos);
    REQUIRE(second.run(second.broker->destroy("s1")));
  }
  qbtest::reap_exited_children();
  CHECK(live_processes_of_uid("/proc", kSaveBase + 1) == 0);
}

TEST_CASE("a broker killed mid-restore leaves no half-restored domain after its restart",
          "[broker][restart][privileged][qemu][save]") {
  QB_REQUIRE_ROOT();
  qbtest::become_subreaper();
  qbtest::TempDir state, run, saves;
  broker::BrokerConfig config;
  config.save_root = saves.path();
  const std::string file = state / "domains/r1.json";
  std::string before;
  {
    Stack first(kRestoreBase, state.path(), run.path(), config);
    auto c = guest("r1");
    c.spec.paused = true;  // as a restore waits for its stream
    REQUIRE(first.run(first.broker->create(std::move(c))));
    auto text = broker::read_small_file(file);
    REQUIRE(text);
    before = *text;
  }
  write_interrupted(file, before, "restore", "", {{"path", saves / "r1.state"}});
  {
    Stack second(kRestoreBase, state.path(), run.path(), config);
    auto report = second.run(second.broker->recover());
    CHECK(report.torn_down == std::vector<std::string>{"r1"});
    CHECK_FALSE(second.broker->exists("r1"));
    CHECK_FALSE(fs::exists(file));
    CHECK(second.uids.in_use().empty());
  }
  qbtest::reap_exited_children();
  CHECK(live_processes_of_uid("/proc", kRestoreBase + 1) == 0);
}

TEST_CASE("a broker killed mid live update keeps the old QEMU, running, under its own names",
          "[broker][restart][privileged][qemu][update]") {
  QB_REQUIRE_ROOT();
  qbtest::become_subreaper();
  qbtest::TempDir state, run;
  const std::string file = state / "domains/u1.json";
  std::string before;
  pid_t qemu = 0;
  {
    Stack first(kUpdateBase, state.path(), run.path());
    auto info = first.run(first.broker->create(guest("u1")));
    REQUIRE(info);
    qemu = info->pid;
    // The update had renamed the old QEMU's listeners and log aside and recorded so, and QEMU
    // had stopped the guest for the last pass.
    REQUIRE(first.run(first.broker->qmp_passthrough("u1", {"stop", {}})));
    auto text = broker::read_small_file(file);
    REQUIRE(text);
    auto o = boost::json::parse(*text).as_object();
    auto& inst = o["instance"].as_object();
    for (const char* k : {"qmp", "console", "log"}) {
      std::string path(inst[k].as_string());
      std::string aside = path.substr(0, path.rfind('.')) + ".old" + path.substr(path.rfind('.'));
      fs::rename(path, aside);
      inst[k] = aside;
    }
    before = boost::json::serialize(o);
  }
  write_interrupted(file, before, "live-update", "", {{"was_running", true}});
  {
    Stack second(kUpdateBase, state.path(), run.path());
    auto report = second.run(second.broker->recover());
    REQUIRE(report.adopted == std::vector<std::string>{"u1"});
    auto info = second.run(second.broker->info("u1"));
    REQUIRE(info);
    CHECK(info->pid == qemu);
    CHECK(info->qemu_status == "running");
    CHECK(info->console == run / "console/u1.sock");
    CHECK(fs::exists(run / "qmp/u1.sock"));
    CHECK_FALSE(fs::exists(run / "qmp/u1.old.sock"));
    auto now = broker::read_small_file(file);
    REQUIRE(now);
    CHECK(now->find("live-update") == std::string::npos);
    CHECK(now->find(".old.") == std::string::npos);
    REQUIRE(second.run(second.broker->destroy("u1")));
  }
  qbtest::reap_exited_children();
  CHECK(live_processes_of_uid("/proc", kUpdateBase + 1) == 0);
  CHECK_FALSE(fs::exists(run / "qmp/u1.sock"));
}
