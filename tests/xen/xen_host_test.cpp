// The Xen mode against the fake xenstored (tests/fakes), through the real libxenstore: every
// xenstore path written and read, transactions retried on conflict, watches; and, as root,
// device models started in the jail under libxl's uids, killed by uid when their domain is
// released, killed before a uid is reused, and killed from xenstore by a restarted broker. The
// device model is a stand-in (fake_dm.c): QEMU's Xen machine needs a hypervisor.
#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "broker/lifecycle/proc.hpp"
#include "broker/xen/backend_disk.hpp"
#include "broker/xen/device_model.hpp"
#include "broker/xen/host.hpp"
#include "broker/xen/store.hpp"
#include "fake_xenstored.hpp"
#include "lifecycle_fixture.hpp"
#include "support/qemu.hpp"
#include "support/support.hpp"

using namespace broker;
using namespace broker::xen;
using namespace std::chrono_literals;

namespace {

// A fake xenstored and a real libxenstore connection to it.
struct Xenstore {
  qbtest::TempDir dir;
  qbtest::FakeXenstored server{dir / "xenstored.sock"};
  Store store = open();

  Store open() {
    ::setenv("XENSTORED_PATH", server.socket_path().c_str(), 1);
    auto s = Store::open();
    ::unsetenv("XENSTORED_PATH");
    REQUIRE(s.has_value());
    return std::move(*s);
  }
};

// Waits (bounded) until `fd` is readable: a watch event is queued.
bool readable(int fd) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, 5000) == 1;
}

}  // namespace

TEST_CASE("the store reads, writes, lists, removes and sets permissions through libxenstore",
          "[xen]") {
  Xenstore xs;
  auto& s = xs.store;
  CHECK(s.read("/local/domain/3/name").value() == std::nullopt);
  REQUIRE(s.write("/local/domain/3/name", "guest").has_value());
  CHECK(s.read("/local/domain/3/name").value() == std::optional<std::string>("guest"));
  CHECK(xs.server.read("/local/domain/3/name") == std::optional<std::string>("guest"));
  REQUIRE(s.mkdir("/local/domain/3/device").has_value());
  CHECK(s.directory("/local/domain/3").value() == std::vector<std::string>{"device", "name"});
  CHECK(s.directory("/nowhere").value().empty());
  REQUIRE(s.set_perms("/local/domain/3", {{'n', 0}, {'r', 3}, {'b', 5}}).has_value());
  CHECK(xs.server.perms("/local/domain/3") == std::optional<std::string>("n0,r3,b5"));
  CHECK(s.perms("/local/domain/3").value() == std::vector<Perm>{{'n', 0}, {'r', 3}, {'b', 5}});
  CHECK(to_string(s.perms("/local/domain/3").value()) == "n0,r3,b5");
  REQUIRE(s.rm("/local/domain/3").has_value());
  CHECK(xs.server.read("/local/domain/3/name") == std::nullopt);
  CHECK(s.rm("/local/domain/3").has_value());  // already gone: not an error
  CHECK(s.perms("/nowhere").has_error());
}

TEST_CASE("a transaction xenstored refuses with EAGAIN runs again, and gives up in time",
          "[xen]") {
  Xenstore xs;
  int bodies = 0;
  auto body = [&](Tx tx) -> Result<void> {
    ++bodies;
    auto v = xs.store.read("/counter", tx);
    if (!v) return v.error();
    const int n = *v ? std::stoi(**v) : 0;
    return xs.store.write("/counter", std::to_string(n + 1), tx);
  };
  xs.server.fail_next_commits(2);
  auto tries = xs.store.transact(body);
  REQUIRE(tries.has_value());
  CHECK(*tries == 3);
  CHECK(bodies == 3);
  CHECK(xs.server.read("/counter") == std::optional<std::string>("1"));
  CHECK(xs.server.conflicts() == 2);

  // A real conflict: another writer changes what the transaction read, between its read and its
  // commit; the retry sees the other writer's value.
  bodies = 0;
  auto racing = [&](Tx tx) -> Result<void> {
    auto v = xs.store.read("/counter", tx);
    if (!v) return v.error();
    if (bodies++ == 0) xs.server.write("/counter", "10");
    return xs.store.write("/counter", std::to_string(std::stoi(**v) + 1), tx);
  };
  CHECK(xs.store.transact(racing).value() == 2);
  CHECK(xs.server.read("/counter") == std::optional<std::string>("11"));

  xs.server.fail_next_commits(100);
  auto gave_up = xs.store.transact(body, 4);
  REQUIRE(gave_up.has_error());
  CHECK(gave_up.error().message.find("4 commits") != std::string::npos);
  CHECK(xs.server.read("/counter") == std::optional<std::string>("11"));
  xs.server.fail_next_commits(0);

  // An error in the body aborts: nothing it wrote is committed.
  auto failing = xs.store.transact([&](Tx tx) -> Result<void> {
    (void)xs.store.write("/half", "written", tx);
    return Error(std::make_error_code(std::errc::invalid_argument), "stop");
  });
  CHECK(failing.has_error());
  CHECK(xs.server.read("/half") == std::nullopt);
}

TEST_CASE("the device-model record is libxl's, with the kill uid, and is read back exactly",
          "[xen]") {
  Xenstore xs;
  xs.server.write("/local/domain/7/name", "guest7");
  REQUIRE(record_device_model(xs.store, {7, GuestType::hvm, 131079}).has_value());
  CHECK(xs.server.read("/local/domain/7/image/device-model-kill-uid") ==
        std::optional<std::string>("131079"));
  CHECK(xs.server.read("/libxl/7/dm-version") == std::optional<std::string>("qemu_xen"));
  CHECK(xs.server.read("/libxl/7/type") == std::optional<std::string>("hvm"));
  CHECK(xs.server.read("/local/domain/0/device-model/7") == std::optional<std::string>(""));
  CHECK(xs.server.perms("/local/domain/0/device-model/7") == std::optional<std::string>("n0,r7"));
  CHECK(xs.server.commits() == 1);  // one transaction
  REQUIRE(record_pid(xs.store, 7, 4242).has_value());
  CHECK(xs.server.read("/local/domain/7/image/device-model-pid") == std::optional<std::string>("4242"));

  auto r = read_record(xs.store, 7);
  REQUIRE(r.has_value());
  CHECK(r->kill_uid == std::optional<uid_t>(131079));
  CHECK(r->pid == std::optional<pid_t>(4242));
  CHECK(r->dm_version == std::optional<std::string>("qemu_xen"));
  CHECK(recorded_domids(xs.store).value() == std::vector<std::uint32_t>{7});

  REQUIRE(remove_record(xs.store, 7).has_value());
  for (const auto& p : {"/local/domain/7/image/device-model-kill-uid",
                        "/local/domain/7/image/device-model-pid", "/libxl/7",
                        "/local/domain/0/device-model/7"}) {
    CHECK(xs.server.read(p) == std::nullopt);
  }
  CHECK(xs.server.read("/local/domain/7/name") == std::optional<std::string>("guest7"));
  CHECK(recorded_domids(xs.store).value().empty());
}

TEST_CASE("a shared device-model uid writes no kill uid; a malformed one is an error", "[xen]") {
  Xenstore xs;
  REQUIRE(record_device_model(xs.store, {4, GuestType::pv, std::nullopt}).has_value());
  CHECK(xs.server.read("/local/domain/4/image/device-model-kill-uid") == std::nullopt);
  CHECK(xs.server.read("/libxl/4/type") == std::optional<std::string>("pv"));
  CHECK(read_record(xs.store, 4)->kill_uid == std::nullopt);
  for (const char* bad : {"0", "-5", "12x", " 12", "012", "99999999999", ""}) {
    xs.server.write("/local/domain/4/image/device-model-kill-uid", bad);
    auto r = read_record(xs.store, 4);
    REQUIRE(r.has_error());
    CHECK(r.error().message.find("device-model-kill-uid") != std::string::npos);
  }
}

TEST_CASE("a backend disk is published with its number and diskseq in one transaction", "[xen]") {
  Xenstore xs;
  BackendDisk disk;
  disk.rdev = makedev(7, 0x1f);
  disk.diskseq = 0x2a;
  disk.node = "/dev/loop31";
  const std::string be = backend_path(5, 51712);
  CHECK(be == "/local/domain/0/backend/vbd/5/51712");
  REQUIRE(publish_backend_disk(xs.store, disk, be).has_value());
  CHECK(xs.server.read(be + "/params") == std::optional<std::string>("/dev/loop31"));
  CHECK(xs.server.read(be + "/physical-device") == std::optional<std::string>("7:1f"));
  CHECK(xs.server.read(be + "/diskseq") == std::optional<std::string>("000000000000002a"));
  CHECK(xs.server.commits() == 1);
  CHECK(backend_connected(xs.store, be).value() == false);
  xs.server.write(be + "/state", "2");
  CHECK(backend_connected(xs.store, be).value() == false);
  xs.server.write(be + "/state", "4");
  CHECK(backend_connected(xs.store, be).value() == true);
}

TEST_CASE("watch events are taken without blocking, @releaseDomain only when fired", "[xen]") {
  Xenstore xs;
  REQUIRE(xs.store.watch("@releaseDomain", kReleaseToken).has_value());
  REQUIRE(readable(xs.store.fileno()));
  auto first = xs.store.take_events();
  REQUIRE(first.has_value());
  REQUIRE(first->size() == 1);  // the event every new watch gets
  CHECK((*first)[0].path == "@releaseDomain");
  CHECK((*first)[0].token == kReleaseToken);
  CHECK(xs.store.take_events().value().empty());
  xs.server.write("/local/domain/3/name", "x");  // not a special path: no event
  CHECK(xs.store.read("/local/domain/3/name").has_value());  // a round trip: events came before
  CHECK(xs.store.take_events().value().empty());
  xs.server.fire("@releaseDomain");
  REQUIRE(readable(xs.store.fileno()));
  auto fired = xs.store.take_events();
  REQUIRE(fired->size() == 1);
  CHECK((*fired)[0].path == "@releaseDomain");
  REQUIRE(xs.store.unwatch("@releaseDomain", kReleaseToken).has_value());
  CHECK(xs.server.watched().empty());
}

// ---- As root: device models in the jail ----

namespace {

constexpr uid_t kBase = 3'112'000;  // the range base user; domids 1.. are kBase + domid

class Users final : public UserDb {
 public:
  std::optional<uid_t> uid_of(const std::string& user) const override {
    if (user == kRangeBaseUser) return kBase;
    return std::nullopt;
  }
  bool has_entry(uid_t uid) const override { return uid == kBase; }
};

class Domains final : public DomainList {
 public:
  std::vector<DomainInfo> now;
  int lists = 0;
  Result<std::vector<DomainInfo>> list() override {
    ++lists;
    return now;
  }
};

// One broker's Xen parts over a shared fake xenstored and state directory: a second Broker over
// the same ones is a restarted broker.
struct Broker {
  Store store;
  lifecycle::ForkingUidKiller killer;
  lifecycle::Reaper reaper{killer, kBase};
  lifecycle::UidPool uids;
  lifecycle::CgroupManager cgroups{{}, "qbroker-" + std::to_string(kBase)};
  fdpass::ImageRoots roots;
  lifecycle::Launcher launcher;
  Users users;
  Host host;

  Broker(Store s, const std::string& state, const std::string& run, const std::string& dev,
         Domains& domains)
      : store(std::move(s)),
        uids({kBase, kFirstReservedDomid}, state, reaper),
        roots(*fdpass::ImageRoots::open({run})),
        launcher(config(run), uids, cgroups, roots),
        host(store, domains, launcher, uids, users, HostConfig{dev, run + "/xen", false}) {
    uids.load();
  }

  static lifecycle::LauncherConfig config(const std::string& run) {
    lifecycle::LauncherConfig c;
    c.qemu = {QB_FAKE_DM, {}, false};
    c.run_dir = run;
    c.xen_only = true;
    return c;
  }
};

lifecycle::DomainSpec dm_spec(const std::string& name) {
  lifecycle::DomainSpec s;
  s.name = name;
  s.memory_mib = 128;
  return s;
}

std::size_t alive(uid_t uid) { return lifecycle::live_processes_of_uid("/proc", uid); }

// What the stand-in device model wrote to its log pipe, up to its "ready" line (bounded).
std::string drain_log(const lifecycle::Instance& inst) {
  std::string out;
  char buf[4096];
  for (int i = 0; i < 500 && out.find("ready\n") == std::string::npos; ++i) {
    pollfd p{inst.log_pipe.get(), POLLIN, 0};
    if (::poll(&p, 1, 10) != 1) continue;
    const ssize_t n = ::read(inst.log_pipe.get(), buf, sizeof buf);
    if (n <= 0) break;
    out.append(buf, static_cast<std::size_t>(n));
  }
  return out;
}

struct Fixture {
  Xenstore xs;
  qbtest::TempDir state;
  qbtest::TempDir run;
  qbtest::TempDir dev;
  Domains domains;

  Fixture() {
    qbtest::become_subreaper();
    struct stat null_st {};
    REQUIRE(::stat("/dev/null", &null_st) == 0);
    for (const char* name : {"privcmd", "evtchn", "gntdev"}) {
      REQUIRE(::mknod((dev / name).c_str(), S_IFCHR | 0600, null_st.st_rdev) == 0);
    }
  }
  // The brokers' cgroup subtree goes with the test once nothing is left in it.
  ~Fixture() {
    lifecycle::CgroupManager({}, "qbroker-" + std::to_string(kBase)).remove_base_if_empty();
  }
  std::unique_ptr<Broker> broker() {
    return std::make_unique<Broker>(xs.open(), state.path(), run.path(), dev.path(), domains);
  }
};

void reap(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
}

}  // namespace

TEST_CASE("a device model runs jailed under base + domid, with its own Xen nodes, recorded first",
          "[xen][privileged]") {
  QB_REQUIRE_ROOT();
  Fixture fx;
  auto b = fx.broker();
  fx.domains.now = {{0, false, false}, {7, false, false}};
  const uid_t uid = kBase + 7;
  auto dm = b->host.start(dm_spec("xen7"), 7, GuestType::hvm);
  REQUIRE(dm.has_value());
  auto& inst = *(*dm)->instance;
  const pid_t pid = inst.pid;
  CHECK((*dm)->uid == uid);
  CHECK(fx.xs.server.read("/local/domain/7/image/device-model-kill-uid") ==
        std::optional<std::string>(std::to_string(uid)));
  CHECK(fx.xs.server.read("/local/domain/7/image/device-model-pid") ==
        std::optional<std::string>(std::to_string(pid)));
  CHECK(fx.xs.server.read("/libxl/7/dm-version") == std::optional<std::string>("qemu_xen"));
  std::vector<std::string> steps;
  for (const auto& step : inst.trace.steps()) steps.push_back(step.name);
  CHECK(steps == std::vector<std::string>{"uid sweep+record", "boot files", "listeners", "cgroup",
                                          "clone+jail+exec"});
  // QEMU's Xen words reached the command line.
  CHECK(std::find(inst.argv.begin(), inst.argv.end(), "-xen-domid-restrict") != inst.argv.end());

  const std::string out = drain_log(inst);
  CHECK(out.find("open privcmd\n") != std::string::npos);
  CHECK(out.find("open evtchn\n") != std::string::npos);
  CHECK(out.find("open gntdev\n") != std::string::npos);
  auto procs = lifecycle::processes_of_uid("/proc", uid);
  CHECK(procs.size() == 2);  // the device model and its child
  // Inside the jail, /dev/xen/privcmd is the private copy: the uid's, mode 0600.
  struct stat st {};
  REQUIRE(::stat(("/proc/" + std::to_string(pid) + "/root/dev/xen/privcmd").c_str(), &st) == 0);
  CHECK(st.st_uid == uid);
  CHECK((st.st_mode & 07777) == 0600);

  // Sealed once QEMU has restricted its handles: the uid can open no new one.
  REQUIRE(b->host.seal(7).has_value());
  REQUIRE(::stat(("/proc/" + std::to_string(pid) + "/root/dev/xen/privcmd").c_str(), &st) == 0);
  CHECK(st.st_uid == 0u);
  CHECK((st.st_mode & 07777) == 0);

  auto killed = b->host.stop(7);
  REQUIRE(killed.has_value());
  CHECK(killed->uid == uid);
  CHECK(alive(uid) == 0);
  CHECK(fx.xs.server.read("/local/domain/7/image/device-model-kill-uid") == std::nullopt);
  CHECK(fx.xs.server.read("/libxl/7") == std::nullopt);
  CHECK(::access((fx.run / "xen/7").c_str(), F_OK) != 0);
  CHECK_FALSE(b->uids.in_use().contains(uid));
}

TEST_CASE("a record xenstored will not take stops the start before anything runs",
          "[xen][privileged]") {
  QB_REQUIRE_ROOT();
  Fixture fx;
  auto b = fx.broker();
  fx.xs.server.fail_next_commits(1000);
  auto dm = b->host.start(dm_spec("xen8"), 8, GuestType::hvm);
  REQUIRE(dm.has_error());
  fx.xs.server.fail_next_commits(0);
  CHECK(alive(kBase + 8) == 0);
  CHECK(b->host.models().empty());
  CHECK_FALSE(b->uids.in_use().contains(kBase + 8));
  CHECK(::access((fx.run / "xen/8").c_str(), F_OK) != 0);
  CHECK(fx.xs.server.read("/libxl/8") == std::nullopt);
}

TEST_CASE("a failed start leaves no record, node, uid or process", "[xen][privileged]") {
  QB_REQUIRE_ROOT();
  Fixture fx;
  auto b = fx.broker();
  auto bad = dm_spec("bad/name");  // refused by the launcher, after the record was written
  auto dm = b->host.start(bad, 9, GuestType::hvm);
  REQUIRE(dm.has_error());
  CHECK(dm.error().field == "name");
  CHECK(fx.xs.server.read("/local/domain/9/image/device-model-kill-uid") == std::nullopt);
  CHECK(fx.xs.server.read("/libxl/9") == std::nullopt);
  CHECK(::access((fx.run / "xen/9").c_str(), F_OK) != 0);
  CHECK(alive(kBase + 9) == 0);
  // A domid out of range is refused by field before anything.
  auto zero = b->host.start(dm_spec("dom0"), 0, GuestType::hvm);
  REQUIRE(zero.has_error());
  CHECK(zero.error().field == "xen.domid");
}

TEST_CASE("@releaseDomain kills the released domain's device model by uid, and only its",
          "[xen][privileged]") {
  QB_REQUIRE_ROOT();
  Fixture fx;
  auto b = fx.broker();
  fx.domains.now = {{0, false, false}, {5, false, false}, {6, false, false}};
  auto five = b->host.start(dm_spec("xen5"), 5, GuestType::hvm);
  REQUIRE(five.has_value());
  const pid_t pid5 = (*five)->instance->pid;
  auto six = b->host.start(dm_spec("xen6"), 6, GuestType::pv);
  REQUIRE(six.has_value());
  const pid_t pid6 = (*six)->instance->pid;
  drain_log(*b->host.models().at(5).instance);
  drain_log(*b->host.models().at(6).instance);
  CHECK(fx.xs.server.read("/libxl/6/type") == std::optional<std::string>("pv"));
  REQUIRE(b->host.watch().has_value());
  // The event every new watch gets: both domains still run, nothing is stopped.
  REQUIRE(readable(b->host.fileno()));
  CHECK(b->host.on_events().value().empty());
  CHECK(alive(kBase + 5) == 2);

  // Domain 5 dies (dying first, as Xen shows it), domain 6 shuts down but stays.
  fx.domains.now = {{0, false, false}, {5, true, false}, {6, false, true}};
  fx.xs.server.fire("@releaseDomain");
  REQUIRE(readable(b->host.fileno()));
  const int lists = fx.domains.lists;
  auto stopped = b->host.on_events();
  REQUIRE(stopped.has_value());
  CHECK(*stopped == std::vector<std::uint32_t>{5});
  CHECK(fx.domains.lists == lists + 1);  // the event named no domain: the list was read
  CHECK(alive(kBase + 5) == 0);
  CHECK(alive(kBase + 6) == 2);
  CHECK(fx.xs.server.read("/libxl/5") == std::nullopt);
  CHECK(fx.xs.server.read("/libxl/6/type") == std::optional<std::string>("pv"));
  reap(pid5);

  fx.domains.now = {{0, false, false}};
  fx.xs.server.fire("@releaseDomain");
  REQUIRE(readable(b->host.fileno()));
  CHECK(b->host.on_events().value() == std::vector<std::uint32_t>{6});
  CHECK(alive(kBase + 6) == 0);
  CHECK(b->host.models().empty());
  reap(pid6);
}

TEST_CASE("a domid that comes back gets its uid only after the uid is swept",
          "[xen][privileged]") {
  QB_REQUIRE_ROOT();
  Fixture fx;
  auto b = fx.broker();
  const uid_t uid = kBase + 4;
  // Something left running under domid 4's uid (a device model an earlier owner of the domid
  // left, or a process planted by someone who could switch to the uid).
  const pid_t planted = qbtest::fork_as_uid(uid);
  REQUIRE(planted > 0);
  qbtest::ChildGuard guard(planted);
  CHECK(alive(uid) == 1);
  fx.domains.now = {{0, false, false}, {4, false, false}};
  auto dm = b->host.start(dm_spec("xen4"), 4, GuestType::hvm);
  REQUIRE(dm.has_value());
  int status = 0;
  REQUIRE(::waitpid(planted, &status, 0) == planted);
  guard.reaped();
  CHECK(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGKILL);
  drain_log(*(*dm)->instance);
  const pid_t pid = (*dm)->instance->pid;
  REQUIRE(b->host.stop(4).has_value());
  reap(pid);
}

TEST_CASE("a restarted broker kills by uid from xenstore, and tracks what still runs",
          "[xen][privileged]") {
  QB_REQUIRE_ROOT();
  Fixture fx;
  fx.domains.now = {{0, false, false}, {2, false, false}, {3, false, false}};
  pid_t pid2 = 0;
  pid_t pid3 = 0;
  {
    auto first = fx.broker();
    auto two = first->host.start(dm_spec("xen2"), 2, GuestType::hvm);
    REQUIRE(two.has_value());
    pid2 = (*two)->instance->pid;
    auto three = first->host.start(dm_spec("xen3"), 3, GuestType::hvm);
    REQUIRE(three.has_value());
    pid3 = (*three)->instance->pid;
    drain_log(*first->host.models().at(2).instance);
    drain_log(*first->host.models().at(3).instance);
    // The broker goes away without a teardown; its device models keep running.
  }
  CHECK(alive(kBase + 2) == 2);
  CHECK(alive(kBase + 3) == 2);
  // Domain 2 died while no broker watched.
  fx.domains.now = {{0, false, false}, {3, false, false}};
  // Something libxl recorded with a kill uid outside this broker's range is not its to kill.
  fx.xs.server.write("/libxl/40/dm-version", "qemu_xen");
  fx.xs.server.write("/local/domain/40/image/device-model-kill-uid", "4000040");
  // A device model libxl started under the same convention (kill uid = base + domid), whose
  // domain has died: the broker kills it by uid, and leaves libxl's record to libxl's destroy.
  const pid_t libxl_dm = qbtest::fork_as_uid(kBase + 11);
  REQUIRE(libxl_dm > 0);
  qbtest::ChildGuard libxl_guard(libxl_dm);
  fx.xs.server.write("/libxl/11/dm-version", "qemu_xen");
  fx.xs.server.write("/local/domain/11/image/device-model-kill-uid", std::to_string(kBase + 11));
  fx.xs.server.write("/local/domain/11/image/device-model-pid", std::to_string(libxl_dm));

  auto second = fx.broker();
  std::vector<Error> failed;
  auto reaped = second->host.recover(&failed);
  REQUIRE(reaped.has_value());
  CHECK(failed.empty());
  CHECK(*reaped == std::vector<std::uint32_t>{2, 11});
  CHECK(alive(kBase + 2) == 0);
  CHECK(fx.xs.server.read("/libxl/2") == std::nullopt);
  reap(pid2);
  CHECK(alive(kBase + 11) == 0);
  reap(libxl_dm);
  libxl_guard.reaped();
  CHECK(fx.xs.server.read("/libxl/11/dm-version") == std::optional<std::string>("qemu_xen"));
  CHECK(fx.xs.server.read("/local/domain/11/image/device-model-kill-uid") ==
        std::optional<std::string>(std::to_string(kBase + 11)));
  // Domain 3 still runs: adopted, with no instance, killed by uid once it is released.
  REQUIRE(second->host.models().contains(3));
  CHECK_FALSE(second->host.models().at(3).instance.has_value());
  CHECK_FALSE(second->host.models().contains(40));
  CHECK(alive(kBase + 3) == 2);
  REQUIRE(second->host.watch().has_value());
  REQUIRE(readable(second->host.fileno()));
  CHECK(second->host.on_events().value().empty());
  fx.domains.now = {{0, false, false}};
  fx.xs.server.fire("@releaseDomain");
  REQUIRE(readable(second->host.fileno()));
  CHECK(second->host.on_events().value() == std::vector<std::uint32_t>{3});
  CHECK(alive(kBase + 3) == 0);
  CHECK(fx.xs.server.read("/libxl/3") == std::nullopt);
  CHECK(fx.xs.server.read("/libxl/40/dm-version") == std::optional<std::string>("qemu_xen"));
  // A second release: the record libxl has not removed yet is not killed again.
  fx.xs.server.fire("@releaseDomain");
  REQUIRE(readable(second->host.fileno()));
  CHECK(second->host.on_events().value().empty());
  // libxl's destroy removes its record and a new domain 11 gets a new device model (another
  // pid) before the broker looks again: that one is adopted.
  fx.xs.server.rm("/libxl/11");
  fx.xs.server.write("/libxl/11/dm-version", "qemu_xen");
  fx.xs.server.write("/local/domain/11/image/device-model-pid", "999999");
  fx.domains.now = {{0, false, false}, {11, false, false}};
  fx.xs.server.fire("@releaseDomain");
  REQUIRE(readable(second->host.fileno()));
  CHECK(second->host.on_events().value().empty());
  CHECK(second->host.models().contains(11));
  CHECK_FALSE(second->host.models().at(11).ours);
  reap(pid3);
  CHECK(::access((fx.run / "xen/2").c_str(), F_OK) != 0);
  CHECK(::access((fx.run / "xen/3").c_str(), F_OK) != 0);
  // The adopted device model's cgroup went with it, or waits as retired for its last zombie.
  if (second->cgroups.available()) {
    const auto retired = second->cgroups.retired();
    for (const auto& e : std::filesystem::directory_iterator(second->cgroups.base())) {
      const std::string name = e.path().filename().string();
      if (!name.starts_with("dom-xen3-")) continue;
      INFO(name);
      CHECK(std::find(retired.begin(), retired.end(), name) != retired.end());
    }
    second->launcher.sweep_cgroups({});
    CHECK(second->cgroups.retired().empty());
  }
}

namespace {

std::string first_line(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "r");
  if (f == nullptr) return {};
  char buf[512] = {};
  const bool got = std::fgets(buf, sizeof buf, f) != nullptr;
  std::fclose(f);
  std::string s = got ? buf : "";
  if (!s.empty() && s.back() == '\n') s.pop_back();
  return s;
}

// Where the kernel shows what a loop device is bound to; absent once it is detached.
std::string backing_file_of(const Backend& b) {
  return "/sys/dev/block/" + std::to_string(major(b.disk.rdev)) + ":" +
         std::to_string(minor(b.disk.rdev)) + "/loop/backing_file";
}

bool gone(const std::string& path) {
  for (int i = 0; i < 200; ++i) {
    if (::access(path.c_str(), F_OK) != 0) return true;
    ::usleep(5000);
  }
  return false;
}

}  // namespace

TEST_CASE("a backend disk is held until its backend is Connected, then left to blkback",
          "[xen][privileged]") {
  QB_REQUIRE_ROOT();
  Fixture fx;
  auto b = fx.broker();
  fx.domains.now = {{0, false, false}, {12, false, false}};
  auto dm = b->host.start(dm_spec("xen12"), 12, GuestType::hvm);
  REQUIRE(dm.has_value());
  const pid_t pid = (*dm)->instance->pid;
  const std::string image = fx.run / "disk.img";
  qbtest::write_file(image, std::string(1 << 20, 'd'));
  fdpass::UniqueFd file(::open(image.c_str(), O_RDWR | O_CLOEXEC));
  REQUIRE(file.valid());
  REQUIRE(b->host.watch().has_value());

  auto attached = b->host.attach_disk(12, 51712, file, image, false);
  REQUIRE(attached.has_value());
  const Backend& disk = **attached;
  const std::string be = "/local/domain/0/backend/vbd/12/51712";
  CHECK(disk.path == be);
  CHECK(fx.xs.server.read(be + "/physical-device") == std::optional<std::string>(physical_device(disk.disk.rdev)));
  CHECK(fx.xs.server.read(be + "/diskseq") == std::optional<std::string>(diskseq_hex(disk.disk.diskseq)));
  CHECK(fx.xs.server.read(be + "/params") == std::optional<std::string>(disk.disk.node));
  const std::string backing = backing_file_of(disk);
  file.reset();  // the caller's fd goes: the loop device is the broker's alone to hold
  CHECK(first_line(backing) == image);
  // A second disk with the same devid is refused by field.
  fdpass::UniqueFd again(::open(image.c_str(), O_RDONLY | O_CLOEXEC));
  auto twice = b->host.attach_disk(12, 51712, again, image, true);
  REQUIRE(twice.has_error());
  CHECK(twice.error().field == "devid");
  again.reset();

  // Initialising, then InitWait: still held.
  REQUIRE(readable(b->host.fileno()));
  (void)b->host.on_events();
  fx.xs.server.write(be + "/state", "2");
  REQUIRE(readable(b->host.fileno()));
  CHECK(b->host.on_events().value().empty());
  CHECK(b->host.models().at(12).backends.at(0).state == "2");
  CHECK(b->host.models().at(12).backends.at(0).held());
  CHECK(first_line(backing) == image);
  auto view = to_json(b->host.models().at(12));
  CHECK(view.at("domid") == 12);
  CHECK(view.at("uid") == kBase + 12);
  CHECK(view.at("pid") == pid);
  CHECK(view.at("started_by") == "qbroker");
  CHECK(view.at("sealed") == false);
  const auto& bv = view.at("backends").as_array().at(0).as_object();
  CHECK(bv.at("state") == "2");
  CHECK(bv.at("held") == true);
  CHECK(bv.at("diskseq").as_string() == diskseq_hex(disk.disk.diskseq).c_str());

  // Connected: blkback holds the device (here nobody does, so autoclear detaches it).
  fx.xs.server.write(be + "/state", "4");
  REQUIRE(readable(b->host.fileno()));
  CHECK(b->host.on_events().value().empty());
  CHECK_FALSE(b->host.models().at(12).backends.at(0).held());
  CHECK(gone(backing));

  fx.domains.now = {{0, false, false}};
  fx.xs.server.fire("@releaseDomain");
  REQUIRE(readable(b->host.fileno()));
  CHECK(b->host.on_events().value() == std::vector<std::uint32_t>{12});
  CHECK(fx.xs.server.read(be + "/params") == std::nullopt);
  CHECK(fx.xs.server.watched() == std::vector<std::string>{"@releaseDomain"});
  reap(pid);
}

TEST_CASE("a disk of a domain whose device model dies is let go with it", "[xen][privileged]") {
  QB_REQUIRE_ROOT();
  Fixture fx;
  auto b = fx.broker();
  fx.domains.now = {{0, false, false}, {13, false, false}};
  auto dm = b->host.start(dm_spec("xen13"), 13, GuestType::hvm);
  REQUIRE(dm.has_value());
  const pid_t pid = (*dm)->instance->pid;
  const std::string image = fx.run / "disk13.img";
  qbtest::write_file(image, std::string(1 << 16, 'e'));
  fdpass::UniqueFd file(::open(image.c_str(), O_RDONLY | O_CLOEXEC));
  auto attached = b->host.attach_disk(13, 768, file, image, true);
  REQUIRE(attached.has_value());
  const std::string backing = backing_file_of(**attached);
  file.reset();
  CHECK(first_line(backing) == image);
  // Never Connected: stopping the device model lets the loop device go.
  REQUIRE(b->host.stop(13).has_value());
  CHECK(gone(backing));
  CHECK(fx.xs.server.read("/local/domain/0/backend/vbd/13/768") == std::nullopt);
  reap(pid);
}
