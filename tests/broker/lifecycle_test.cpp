// The security core against a real QEMU: jail properties read from /proc, kill by uid under a
// fork storm, kill before reuse, no pid fallback, quarantine, and a failed spawn step naming
// itself. [privileged]: needs root.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <linux/filter.h>
#include <linux/securebits.h>
#include <netinet/in.h>
#include <sys/fsuid.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

#include "broker/lifecycle/errc.hpp"
#include "broker/lifecycle/proc.hpp"
#include "broker/lifecycle/spawner.hpp"
#include "fdpass/devices.hpp"
#include "lifecycle_fixture.hpp"

using namespace broker::lifecycle;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

// Distinct uid ranges per test case (ctest runs cases in parallel).
constexpr uid_t kJailBase = 3'100'000;
constexpr uid_t kStormBase = 3'100'100;
constexpr uid_t kReuseBase = 3'100'200;
constexpr uid_t kNoFallbackBase = 3'100'300;
constexpr uid_t kQuarantineBase = 3'100'400;
constexpr uid_t kBadKernelBase = 3'100'500;
constexpr uid_t kColdBase = 3'100'600;
constexpr uid_t kSharedBase = 3'100'700;
constexpr uid_t kStepUid = 3'100'801;
constexpr uid_t kEuidOnlyBase = 3'100'900;
constexpr uid_t kRetryBase = 3'100'960;
constexpr uid_t kLogRetentionBase = 3'100'970;
constexpr uid_t kHolderBase = 3'106'020;
constexpr uid_t kMountsBase = 3'106'000;
constexpr uid_t kCapsBase = 3'106'010;
constexpr uid_t kProberBase = 3'106'040;  // the QEMU at +1, the prober at +9
constexpr uid_t kReclaimBesideBase = 3'106'050;

std::string proc_field(pid_t pid, const std::string& key) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) {
      auto v = line.substr(key.size() + 1);
      v.erase(0, v.find_first_not_of(" \t"));
      return v;
    }
  }
  return {};
}

std::string link(const std::string& path) {
  std::error_code ec;
  return fs::read_symlink(path, ec).string();
}

// Forks a child that becomes `uid` and then runs `body`; returns its pid.
template <class F>
pid_t fork_as(uid_t uid, F body) {
  pid_t pid = ::fork();
  if (pid == 0) {
    if (::setresgid(uid, uid, uid) != 0 || ::setresuid(uid, uid, uid) != 0) ::_exit(99);
    body();
    ::_exit(0);
  }
  return pid;
}

// The storm (tests/broker/fork_storm.c): double-fork, setsid, ignore SIGTERM, fork forever,
// capped near 300 processes by RLIMIT_NPROC.
pid_t plant_fork_storm(uid_t uid) {
  return fork_as(uid, [] {
    const char* argv[] = {QB_FORK_STORM, "300", nullptr};
    ::execv(argv[0], const_cast<char* const*>(argv));
  });
}

pid_t plant_sleeper(uid_t uid) {
  return fork_as(uid, [] {
    for (;;) ::pause();
  });
}

bool wait_until(auto pred, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

bool alive(pid_t pid) {
  int status = 0;
  return ::waitpid(pid, &status, WNOHANG) == 0;
}

class NoopKiller final : public UidKiller {
 public:
  std::error_code kill_all(uid_t, uid_t) override { return {}; }
};

class FailingKiller final : public UidKiller {
 public:
  std::error_code kill_all(uid_t, uid_t) override { return {EPERM, std::system_category()}; }
};

// A request that passes every spawn step up to exec: a jail holding only /dev/null (jail_stdio
// needs it) on a fresh mount point, nothing passed, an unprivileged uid, and an executable the
// jail does not have.
SpawnRequest failing_request(const std::string& mountpoint) {
  SpawnRequest req;
  req.executable = "/no-such-binary";
  req.argv = {"no-such-binary"};
  req.jail.mountpoint = mountpoint;
  req.jail.devices = {"/dev/null"};
  req.uid = kStepUid;
  req.gid = kStepUid;
  return req;
}

std::uint64_t nr_open() {
  std::ifstream in("/proc/sys/fs/nr_open");
  std::uint64_t n = 0;
  in >> n;
  return n;
}

}  // namespace

TEST_CASE("a failed spawn step comes back as its own code, naming the step and errno",
          "[lifecycle][privileged]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  qbtest::TempDir mountpoint;
  SpawnRequest req = failing_request(mountpoint.path());
  errc expected{};
  std::string step, err;
  SECTION("exec: the jail has no such binary") {
    expected = errc::step_exec;
    step = "'exec'";
    err = "ENOENT";
  }
  SECTION("mount_tmpfs: the mount point does not exist") {
    req.jail.mountpoint = mountpoint / "missing";
    expected = errc::step_mount_tmpfs;
    step = "'mount_tmpfs'";
    err = "ENOENT";
  }
  SECTION("populate_root: a read-only bind of a host directory that does not exist") {
    req.jail.ro_dirs = {"/no-such-dir-for-a-jail"};
    expected = errc::step_bind_ro;
    step = "'populate_root'";
    err = "ENOENT";
  }
  SECTION("jail_stdio: the jail has no /dev/null") {
    req.jail.devices.clear();
    expected = errc::step_open_jail_null;
    step = "'jail_stdio': open(/dev/null)";
    err = "ENOENT";
  }
  SECTION("rlimits: NOFILE above what the kernel allows, even to root") {
    req.limits.nofile = nr_open() + 1;
    expected = errc::step_setrlimit_nofile;
    step = "'rlimits': setrlimit(RLIMIT_NOFILE)";
    err = "EPERM";
  }
  SECTION("credentials: more supplementary groups than the kernel takes") {
    req.groups.assign(NGROUPS_MAX + 1, kStepUid);
    expected = errc::step_setgroups;
    step = "'credentials': setgroups";
    err = "EINVAL";
  }
  auto child = spawn_jailed(req);
  if (child) {  // never expected; do not leave it running
    ::syscall(SYS_pidfd_send_signal, child->pidfd.get(), SIGKILL, nullptr, 0);
    siginfo_t info{};
    ::waitid(P_PIDFD, static_cast<id_t>(child->pidfd.get()), &info, WEXITED);
  }
  REQUIRE_FALSE(child);
  INFO(child.error().describe());
  CHECK(child.error().code == expected);
  CHECK(child.error().message.find("spawn step " + step) != std::string::npos);
  CHECK(child.error().message.find(": " + err + " (") != std::string::npos);
  // The parent reaped the failed child: nothing of the uid is left, not even a zombie.
  CHECK(processes_of_uid("/proc", kStepUid).empty());
  // The tmpfs and everything mounted in it lived only in the child's mount namespace.
  CHECK(fs::is_empty(mountpoint.path()));
}

TEST_CASE("a spawn while the broker starts and ends threads still reaches its exec",
          "[lifecycle][privileged]") {
  QB_REQUIRE_ROOT();
  qbtest::TempDir mountpoint;
  // Threads start and end all the time in the broker (its pools, Asio's resolver): a clone that
  // lands while one is being created must not leave the child waiting for it. glibc's set*id
  // wrappers did, in the credentials step, until the spawn deadline killed the child.
  struct Churn {
    std::atomic<bool> stop{false};
    std::thread thread{[this] {
      while (!stop.load()) std::thread([] {}).join();
    }};
    ~Churn() {
      stop = true;
      thread.join();
    }
  } churn;
  int reached_exec = 0;
  for (int i = 0; i < 200; ++i) {
    SpawnRequest req = failing_request(mountpoint.path());
    req.groups = {kStepUid};
    req.exec_deadline = std::chrono::milliseconds(5000);
    auto child = spawn_jailed(req);
    REQUIRE_FALSE(child);
    INFO(child.error().describe());
    REQUIRE(child.error().code == errc::step_exec);  // the missing binary, past every other step
    ++reached_exec;
  }
  CHECK(reached_exec == 200);
  CHECK(processes_of_uid("/proc", kStepUid).empty());
}

TEST_CASE("a child that has not exec'd by its deadline is killed by pid and reaped",
          "[lifecycle][privileged]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  qbtest::TempDir mountpoint, binds;
  SpawnRequest req = failing_request(mountpoint.path());
  // A jail set-up of some milliseconds (100 directory binds) against a deadline of none: the
  // parent stops waiting long before the child could reach exec.
  for (int i = 0; i < 100; ++i) {
    const std::string dir = binds / std::to_string(i);
    REQUIRE(::mkdir(dir.c_str(), 0755) == 0);
    req.jail.ro_data_dirs.push_back(dir);
  }
  req.exec_deadline = std::chrono::milliseconds(0);
  auto child = spawn_jailed(req);
  REQUIRE_FALSE(child);
  INFO(child.error().describe());
  CHECK(child.error().code == errc::child_died);
  const std::string& message = child.error().message;
  CHECK(message.find("within 0 ms (") != std::string::npos);
  CHECK(message.find("), and was killed") != std::string::npos);
  // Where the child was when the parent gave up, from the page it shares with the parent.
  CHECK((message.find("in step '") != std::string::npos ||
         message.find("before its first step") != std::string::npos));
  // Reaped: this process has no child left, not even a zombie.
  siginfo_t info{};
  CHECK(::waitid(P_ALL, 0, &info, WEXITED | WNOHANG) == -1);
  CHECK(errno == ECHILD);
  CHECK(processes_of_uid("/proc", kStepUid).empty());
  CHECK(fs::is_empty(mountpoint.path()));
}

TEST_CASE("a started domain runs jailed: uid, groups, seccomp, namespaces, root, limits, fds",
          "[lifecycle][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  qbtest::LifecycleFixture fx(kJailBase);
  auto inst = fx.launcher.start(qbtest::LifecycleFixture::guest_spec("jail1"));
  REQUIRE(inst);
  const pid_t pid = inst->pid;
  const uid_t uid = inst->uid;
  CHECK(uid == kJailBase + 1);

  auto qmp = qbtest::connect_retry(inst->qmp_path, 5s);
  REQUIRE(qmp);
  REQUIRE(qbtest::qmp_handshake(qmp.get(), 20s));  // start-up is finished only after this

  SECTION("credentials") {
    std::string u = std::to_string(uid);
    std::string all = u + "\t" + u + "\t" + u + "\t" + u;
    CHECK(proc_field(pid, "Uid") == all);
    CHECK(proc_field(pid, "Gid") == all);
    CHECK(proc_field(pid, "Groups").empty());  // TCG: not even the kvm group
    CHECK(proc_field(pid, "NoNewPrivs") == "1");
    CHECK(proc_field(pid, "Seccomp") == "2");
    CHECK(proc_field(pid, "CapEff") == "0000000000000000");
    CHECK(proc_field(pid, "CapPrm") == "0000000000000000");
  }
  SECTION("namespaces differ from the broker's") {
    for (const char* ns : {"mnt", "ipc", "net", "pid", "uts"}) {
      INFO(ns);
      std::string mine = link(std::string("/proc/self/ns/") + ns);
      std::string theirs = link("/proc/" + std::to_string(pid) + "/ns/" + ns);
      REQUIRE_FALSE(theirs.empty());
      CHECK(mine != theirs);
    }
    CHECK(proc_field(pid, "NSpid").find("\t1") != std::string::npos);  // init of its pid ns
  }
  SECTION("the root is the jail and holds nothing of the host's data") {
    std::string root = "/proc/" + std::to_string(pid) + "/root";
    std::set<std::string> entries;
    for (const auto& e : fs::directory_iterator(root)) entries.insert(e.path().filename());
    // A QEMU outside /usr (the second test QEMU) adds the top directory of its install.
    std::set<std::string> expected{"bin", "boot", "dev", "etc", "lib", "lib64", "usr"};
    const fs::path bin = qbtest::qemu_binary();
    const std::string install_top =
        bin.string().starts_with("/usr/") ? "" : std::next(bin.begin())->string();
    if (!install_top.empty()) expected.insert(install_top);
    CHECK(entries == expected);
    std::set<std::string> etc;
    for (const auto& e : fs::directory_iterator(root + "/etc")) etc.insert(e.path().filename());
    CHECK(etc == std::set<std::string>{"ld.so.cache"});
    for (const char* absent : {"/etc/shadow", "/etc/passwd", "/home", "/var", "/root", "/tmp",
                               "/proc", "/sys", "/run"}) {
      INFO(absent);
      // The install's directories: the mount test checks each of them.
      if (!install_top.empty() && absent == "/" + install_top) continue;
      CHECK_FALSE(fs::exists(root + absent));
    }
    std::set<std::string> dev;
    for (const auto& e : fs::directory_iterator(root + "/dev")) dev.insert(e.path().filename());
    CHECK(dev == std::set<std::string>{"null", "urandom", "zero"});
    // The guest kernel is there only as a read-only mount of the inode the broker opened.
    struct stat in_jail {}, on_host {};
    REQUIRE(::stat((root + "/boot/kernel").c_str(), &in_jail) == 0);
    REQUIRE(::stat(qbtest::guest_kernel().c_str(), &on_host) == 0);
    CHECK(in_jail.st_ino == on_host.st_ino);
    CHECK(::access((root + "/boot/kernel").c_str(), W_OK) != 0);
    CHECK(::access((root + "/usr/bin").c_str(), W_OK) != 0);
  }
  SECTION("resource limits") {
    std::ifstream in("/proc/" + std::to_string(pid) + "/limits");
    std::string text((std::istreambuf_iterator<char>(in)), {});
    auto limit = [&](const std::string& name) {
      auto at = text.find(name);
      REQUIRE(at != std::string::npos);
      std::istringstream row(text.substr(at + name.size()));
      std::string soft, hard;
      row >> soft >> hard;
      return soft + "/" + hard;
    };
    CHECK(limit("Max file size") == "unlimited/unlimited");
    CHECK(limit("Max core file size") == "0/0");
    CHECK(limit("Max msgqueue size") == "0/0");
    CHECK(limit("Max file locks") == "0/0");
    CHECK(limit("Max locked memory") == "0/0");
    CHECK(limit("Max processes") == "256/256");
    CHECK(limit("Max open files") == "1024/1024");
  }
  SECTION("the fd table holds only what the broker passed and QEMU's own anonymous objects") {
    std::string dir = "/proc/" + std::to_string(pid) + "/fd";
    int sockets = 0;
    for (const auto& e : fs::directory_iterator(dir)) {
      std::string target = link(e.path());
      INFO(e.path().filename().string() << " -> " << target);
      bool anonymous = target.rfind("socket:", 0) == 0 || target.rfind("pipe:", 0) == 0 ||
                       target.rfind("anon_inode:", 0) == 0 ||
                       qbtest::is_anonymous_memory(e.path());
      bool allowed_file = target == "/dev/null" || target == "/dev/urandom";
      CHECK((anonymous || allowed_file));
      if (target.rfind("socket:", 0) == 0) ++sockets;
    }
    CHECK(link(dir + "/0") == "/dev/null");
    // stdout and stderr: the log pipe the broker reads, never a file QEMU could fill.
    struct stat pipe_st {};
    REQUIRE(::stat((dir + "/2").c_str(), &pipe_st) == 0);
    CHECK(S_ISFIFO(pipe_st.st_mode));
    CHECK(pipe_st.st_ino == inst->log_pipe_inode);
    CHECK(link(dir + "/1") == link(dir + "/2"));
    CHECK(link(dir + "/3").rfind("socket:", 0) == 0);  // QMP listener
    CHECK(link(dir + "/4").rfind("socket:", 0) == 0);  // console listener
    CHECK(sockets >= 3);                                // + the accepted QMP connection
    // Both listeners non-blocking (launcher.cpp, open_endpoints): a QEMU thread that loses an
    // accept to another one gets EAGAIN instead of blocking in it.
    for (const char* fd : {"3", "4"}) {
      INFO("fd " << fd);
      std::ifstream info("/proc/" + std::to_string(pid) + "/fdinfo/" + fd);
      std::string key;
      unsigned long flags = 0;
      while (info >> key && key != "flags:") {
      }
      info >> std::oct >> flags;
      CHECK(key == "flags:");
      CHECK((flags & O_NONBLOCK) != 0);
    }
  }
  SECTION("no host path on the command line") {
    for (const auto& word : inst->argv) {
      INFO(word);
      CHECK(word.find(fx.run.path()) == std::string::npos);
      CHECK(word.find(qbtest::guest_dir()) == std::string::npos);
    }
  }

  qmp.reset();
  auto report = fx.launcher.destroy(*inst);
  REQUIRE(report);
  CHECK(report->survivors == 0);
  CHECK(report->method == "cgroup.kill+pidns-init+uid");
  CHECK(live_processes_of_uid("/proc", uid) == 0);
  CHECK(processes_of_uid("/proc", uid).empty());  // reaped, not even a zombie
  CHECK_FALSE(fx.uids.in_use().contains(uid));
  CHECK_FALSE(fs::exists(fx.state / ("uids/" + std::to_string(uid))));
  CHECK_FALSE(fs::exists(inst->qmp_path));
}

TEST_CASE("a fork storm under the domain uid is gone after teardown, 20 times",
          "[lifecycle][privileged][qemu][storm]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  qbtest::LifecycleFixture fx(kStormBase);
  for (int round = 0; round < 20; ++round) {
    INFO("round " << round);
    auto inst = fx.launcher.start(qbtest::LifecycleFixture::tiny_spec("storm"));
    REQUIRE(inst);
    const uid_t uid = inst->uid;
    pid_t planter = plant_fork_storm(uid);
    REQUIRE(planter > 0);
    ::waitpid(planter, nullptr, 0);
    REQUIRE(wait_until([&] { return live_processes_of_uid("/proc", uid) >= 200; }, 20s));
    auto report = fx.launcher.destroy(*inst);
    REQUIRE(report);
    CHECK(report->found >= 150);  // a /proc scan during the storm misses some
    CHECK(report->survivors == 0);
    qbtest::reap_exited_children();
    CHECK(live_processes_of_uid("/proc", uid) == 0);
    CHECK(wait_until([&] { return processes_of_uid("/proc", uid).empty(); }, 5s));
  }
}

TEST_CASE("a process planted under a free uid is killed when the uid is allocated",
          "[lifecycle][privileged]") {
  QB_REQUIRE_ROOT();
  qbtest::LifecycleFixture fx(kReuseBase);
  pid_t planted = plant_sleeper(kReuseBase + 1);
  REQUIRE(wait_until([&] { return live_processes_of_uid("/proc", kReuseBase + 1) == 1; }, 5s));
  auto uid = fx.uids.allocate("victim-owner");
  REQUIRE(uid);
  CHECK(*uid == kReuseBase + 1);
  int status = 0;
  REQUIRE(::waitpid(planted, &status, 0) == planted);
  CHECK(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGKILL);
  CHECK(fx.uids.release(*uid));
}

TEST_CASE("a uid whose processes survive the sweep is quarantined, not handed out",
          "[lifecycle][privileged]") {
  QB_REQUIRE_ROOT();
  NoopKiller noop;
  qbtest::TempDir state;
  Reaper reaper(noop, kQuarantineBase, "/proc", 100ms);
  UidPool pool({kQuarantineBase, 8}, state.path(), reaper);
  pid_t planted = plant_sleeper(kQuarantineBase + 1);
  REQUIRE(wait_until([&] { return live_processes_of_uid("/proc", kQuarantineBase + 1) == 1; }, 5s));
  auto uid = pool.allocate("dom");
  REQUIRE(uid);
  CHECK(*uid == kQuarantineBase + 2);  // the next one: +1 is quarantined
  CHECK(pool.quarantined().contains(kQuarantineBase + 1));
  CHECK(alive(planted));
  ::kill(planted, SIGKILL);
  ::waitpid(planted, nullptr, 0);
}

TEST_CASE("a holder of the uid that cannot be killed by pid stops the sweep at once, named",
          "[lifecycle][privileged]") {
  QB_REQUIRE_ROOT();
  const uid_t uid = kEuidOnlyBase + 1;
  const uid_t other = kEuidOnlyBase + 50;
  // kill(-1) as `uid` cannot signal it: `uid` is neither its real nor its saved uid.
  pid_t holder = ::fork();
  if (holder == 0) {
    if (::setresuid(other, uid, other) != 0) ::_exit(99);
    for (;;) ::pause();
  }
  REQUIRE(holder > 0);
  qbtest::ChildGuard guard(holder);
  REQUIRE(wait_until([&] { return live_processes_of_uid("/proc", uid) == 1; }, 5s));
  // kill(-1) for real, but no kill by pid: the holder cannot be killed at all.
  qbtest::UidOnlyKiller killer;
  // A settle time no test run waits out: only the early stop can end this sweep in time.
  Reaper reaper(killer, kEuidOnlyBase, "/proc", std::chrono::minutes(10));
  auto report = reaper.kill_uid(uid);
  REQUIRE_FALSE(report);
  INFO(report.error().describe());
  CHECK(report.error().code == errc::survivors);
  // The early stop's own message (the settle path says "still alive after N kill rounds").
  CHECK(report.error().message.find("cannot reach it") != std::string::npos);
  CHECK(report.error().message.find(std::to_string(holder)) != std::string::npos);
  CHECK(report.error().message.find(std::to_string(other)) != std::string::npos);
  CHECK(alive(holder));
}

TEST_CASE("a quarantined uid is swept again and handed out once nothing holds it",
          "[lifecycle][privileged]") {
  QB_REQUIRE_ROOT();
  qbtest::UidOnlyKiller killer;  // no kill by pid: the holder below survives every sweep
  qbtest::LifecycleFixture fx(kRetryBase, &killer);
  const uid_t held = kRetryBase + 1;
  pid_t holder = ::fork();
  if (holder == 0) {
    // Beyond kill(-1) as `held`: it holds the uid only as its effective uid.
    if (::setresuid(kRetryBase + 30, held, kRetryBase + 30) != 0) ::_exit(99);
    for (;;) ::pause();
  }
  REQUIRE(holder > 0);
  qbtest::ChildGuard guard(holder);
  REQUIRE(wait_until([&] { return live_processes_of_uid("/proc", held) == 1; }, 5s));

  auto first = fx.uids.allocate("a");
  REQUIRE(first);
  CHECK(*first == held + 1);  // the held uid is quarantined and skipped at once
  CHECK(fx.uids.quarantined().contains(held));
  CHECK(fx.launcher.retry_quarantined().empty());  // still held
  CHECK(fx.uids.quarantined().contains(held));

  REQUIRE(::kill(holder, SIGKILL) == 0);
  REQUIRE(::waitpid(holder, nullptr, 0) == holder);
  guard.reaped();
  CHECK(fx.launcher.retry_quarantined() == std::vector<uid_t>{held});
  CHECK(fx.uids.quarantined().empty());
  auto second = fx.uids.allocate("b");
  REQUIRE(second);
  CHECK(*second == held);
  REQUIRE(fx.uids.release(*first));
  REQUIRE(fx.uids.release(*second));
}

TEST_CASE("a kill failure with a known uid is an error, never a kill by pid",
          "[lifecycle][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  FailingKiller failing;
  qbtest::LifecycleFixture fx(kNoFallbackBase, &failing);
  auto inst = fx.launcher.start(qbtest::LifecycleFixture::tiny_spec("nofallback"));
  // The sweep at allocation already fails: no uid is handed out.
  REQUIRE_FALSE(inst);
  CHECK(inst.error().code == errc::uid_exhausted);
  CHECK(fx.uids.quarantined().size() == 7);

  // With a working sweep but a failing teardown kill, teardown reports the error and keeps the
  // uid recorded; a process of the uid outside the jail is left alone (no pid scan-and-kill).
  ForkingUidKiller real;
  Reaper good(real, kNoFallbackBase);
  qbtest::TempDir state;
  UidPool pool({kNoFallbackBase, 8}, state.path(), good);
  auto uid = pool.allocate("nofallback");
  REQUIRE(uid);
  pid_t outsider = plant_sleeper(*uid);
  REQUIRE(wait_until([&] { return live_processes_of_uid("/proc", *uid) == 1; }, 5s));
  Reaper bad(failing, kNoFallbackBase);
  auto report = bad.kill_uid(*uid);
  REQUIRE_FALSE(report);
  CHECK(report.error().code == errc::kill_failed);
  CHECK(alive(outsider));
  CHECK(pool.in_use().contains(*uid));
  // Clean up with the real reaper.
  REQUIRE(good.kill_uid(*uid));
  ::waitpid(outsider, nullptr, 0);
  CHECK(pool.release(*uid));
}

TEST_CASE("a missing kernel is refused before anything runs and leaves nothing behind",
          "[lifecycle][privileged]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  qbtest::LifecycleFixture fx(kBadKernelBase);
  auto spec = qbtest::LifecycleFixture::guest_spec("nokernel");
  spec.kernel = qbtest::guest_dir() + "/no-such-kernel";
  auto inst = fx.launcher.start(spec);
  REQUIRE_FALSE(inst);
  CHECK(inst.error().field == "kernel");
  CHECK(inst.error().message.find("no such file") != std::string::npos);
  CHECK(fx.uids.in_use().empty());
  CHECK(fs::is_empty(fx.state / "uids"));
  CHECK_FALSE(fs::exists(fx.run / "qmp/nokernel.sock"));

  spec.kernel = "/etc/passwd";
  inst = fx.launcher.start(spec);
  REQUIRE_FALSE(inst);
  CHECK(inst.error().field == "kernel");
  CHECK(fx.uids.in_use().empty());
}

TEST_CASE("cold-plugged fds reach QEMU with -add-fd, never as paths",
          "[lifecycle][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  qbtest::LifecycleFixture fx(kColdBase);
  qbtest::TempDir images;
  qbtest::write_file(images / "cold.img", std::string(4096, 'C'));
  fdpass::UniqueFd image(::open((images / "cold.img").c_str(), O_RDONLY | O_CLOEXEC));
  REQUIRE(image);
  struct stat mine {};
  REQUIRE(::fstat(image.get(), &mine) == 0);
  broker::lifecycle::FdHandover cold;
  cold.add_to_fdset(std::move(image), "qb:cold0", 7);
  auto inst = fx.launcher.start(qbtest::LifecycleFixture::tiny_spec("cold"), &cold);
  REQUIRE(inst);
  // QEMU holds the fd now; the broker's copy is closed and the rollback names the fdset.
  CHECK_FALSE(cold.entries().at(0).fd);
  REQUIRE(cold.rollback().size() == 1);
  CHECK(cold.rollback().at(0).name == "remove-fd");
  for (const auto& word : inst->argv) CHECK(word.find(images.path()) == std::string::npos);
  auto qmp = qbtest::connect_retry(inst->qmp_path, 5s);
  REQUIRE(qmp);
  REQUIRE(qbtest::qmp_handshake(qmp.get(), 20s));
  auto fdsets = qbtest::qmp_command(qmp.get(), R"({"execute":"query-fdsets"})", 10s);
  REQUIRE(fdsets);
  CHECK(fdsets->find("\"fdset-id\": 7") != std::string::npos);
  CHECK(fdsets->find("qb:cold0") != std::string::npos);
  // The fd QEMU holds is the very file the broker opened.
  bool found = false;
  for (const auto& e : fs::directory_iterator("/proc/" + std::to_string(inst->pid) + "/fd")) {
    struct stat theirs {};
    if (::stat(e.path().c_str(), &theirs) == 0 && theirs.st_ino == mine.st_ino &&
        theirs.st_dev == mine.st_dev) {
      found = true;
    }
  }
  CHECK(found);
  qmp.reset();
  REQUIRE(fx.launcher.destroy(*inst));
}

TEST_CASE("shared-uid mode runs every QEMU as one uid and tears one down without the others",
          "[lifecycle][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  qbtest::become_subreaper();
  qbtest::TempDir state, run;
  ForkingUidKiller killer;
  Reaper reaper(killer, kSharedBase);
  UidPool pool = UidPool::shared(kSharedBase + 1, state.path(), reaper);
  CgroupManager cgroups({}, qbtest::LifecycleFixture::cgroup_group(kSharedBase));
  auto roots = fdpass::ImageRoots::open({qbtest::guest_dir()});
  REQUIRE(roots);
  Launcher launcher(qbtest::LifecycleFixture::make_config(run.path()), pool, cgroups, *roots);
  auto a = launcher.start(qbtest::LifecycleFixture::tiny_spec("sa"));
  auto b = launcher.start(qbtest::LifecycleFixture::tiny_spec("sb"));
  REQUIRE(a);
  REQUIRE(b);
  CHECK(a->uid == kSharedBase + 1);
  CHECK(b->uid == kSharedBase + 1);
  auto report = launcher.destroy(*a);
  REQUIRE(report);
  CHECK(report->method.find("shared-uid") != std::string::npos);
  CHECK(report->method.find("pidns-init") != std::string::npos);
  CHECK(::kill(a->pid, 0) != 0);        // gone
  CHECK(::kill(b->pid, 0) == 0);        // the other domain lives on
  CHECK(live_processes_of_uid("/proc", kSharedBase + 1) >= 1);
  // A new instance of a destroyed domain's name gets a cgroup of its own.
  auto again = launcher.start(qbtest::LifecycleFixture::tiny_spec("sa"));
  REQUIRE(again);
  CHECK(again->cgroup_name.starts_with("dom-sa-"));
  CHECK(again->cgroup_name != a->cgroup_name);
  CHECK(again->cgroup_name != b->cgroup_name);
  REQUIRE(launcher.destroy(*again));
  REQUIRE(launcher.destroy(*b));
  CHECK(wait_until([] { return live_processes_of_uid("/proc", kSharedBase + 1) == 0; }, 5s));
  CHECK(cgroups.retired().empty());
  if (cgroups.available()) CHECK(cgroups.remove_base_if_empty());
}

TEST_CASE("a busy domain cgroup is retired, never reused, and removed once it empties",
          "[lifecycle][privileged]") {
  QB_REQUIRE_ROOT();
  CgroupManager cgroups({}, "qbroker-test-" + std::to_string(::getpid()));
  if (!cgroups.available()) {
    WARN("skipped: " << cgroups.why_unavailable());
    return;
  }
  auto cg = cgroups.create("dom-busy-1", {});
  REQUIRE(cg);
  const std::string path = cg->path();
  // Creating the same name again is refused: an instance never shares a cgroup.
  auto twice = cgroups.create("dom-busy-1", {});
  REQUIRE_FALSE(twice);
  CHECK(twice.error().code == std::errc::file_exists);
  pid_t child = ::fork();
  if (child == 0) {
    for (;;) ::pause();
  }
  {
    std::ofstream procs(path + "/cgroup.procs");
    procs << child;
  }
  CHECK(cg->populated());
  CHECK_FALSE(cgroups.retire(*cg));  // still busy: deferred
  CHECK(cgroups.retired() == std::vector<std::string>{"dom-busy-1"});
  CHECK(std::filesystem::exists(path));
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  // The next create retries what was retired.
  auto next = cgroups.create("dom-busy-2", {});
  REQUIRE(next);
  CHECK(cgroups.retired().empty());
  CHECK_FALSE(std::filesystem::exists(path));
  // A sweep removes what no live instance owns, and keeps what one does.
  REQUIRE(std::filesystem::create_directory(cgroups.base() + "/dom-stale-1"));
  cgroups.sweep("dom-", {"dom-busy-2"});
  CHECK_FALSE(std::filesystem::exists(cgroups.base() + "/dom-stale-1"));
  CHECK(std::filesystem::exists(next->path()));
  CHECK(cgroups.retire(*next));
  CHECK(::rmdir(cgroups.base().c_str()) == 0);
}

TEST_CASE("the logs of gone domains are removed once past their retention, and no others",
          "[lifecycle]") {
  qbtest::LifecycleFixture fx(kLogRetentionBase);
  fs::create_directories(fx.run / "log");
  const auto old = fs::file_time_type::clock::now() - std::chrono::hours(2);
  for (const char* f : {"gone.log", "gone.log.1", "live.log", "recent.log", "notes.txt", "_pool-3.log"}) {
    std::ofstream(fx.run / (std::string("log/") + f)) << "x\n";
    if (std::string(f) != "recent.log") fs::last_write_time(fx.run / (std::string("log/") + f), old);
  }
  auto removed = fx.launcher.expire_logs({"live"}, std::chrono::hours(1));
  std::sort(removed.begin(), removed.end());
  CHECK(removed == std::vector<std::string>{fx.run / "log/gone.log", fx.run / "log/gone.log.1"});
  CHECK_FALSE(fs::exists(fx.run / "log/gone.log"));
  CHECK(fs::exists(fx.run / "log/live.log"));     // its domain still exists
  CHECK(fs::exists(fx.run / "log/recent.log"));   // within the retention
  CHECK(fs::exists(fx.run / "log/notes.txt"));    // not a log
  CHECK(fs::exists(fx.run / "log/_pool-3.log"));  // a pooled QEMU's, however long it waits
  CHECK(fx.launcher.expire_logs({"live"}, std::chrono::hours(1)).empty());
}

TEST_CASE("a process holding the uid in any of its four uid fields is killed by the sweep",
          "[lifecycle][privileged]") {
  QB_REQUIRE_ROOT();
  const uid_t uid = kHolderBase + 1;
  const uid_t other = kHolderBase + 50;
  ForkingUidKiller real;
  Reaper reaper(real, kHolderBase, "/proc", 5s);
  // Bit i set: uid i (real, effective, saved, filesystem) is the domain uid, else `other`.
  for (unsigned mask = 1; mask < 16; ++mask) {
    const uid_t r = (mask & 1) != 0 ? uid : other;
    const uid_t e = (mask & 2) != 0 ? uid : other;
    const uid_t sv = (mask & 4) != 0 ? uid : other;
    const uid_t f = (mask & 8) != 0 ? uid : other;
    const std::string want = std::to_string(r) + "\t" + std::to_string(e) + "\t" +
                             std::to_string(sv) + "\t" + std::to_string(f);
    INFO("real effective saved fs: " << want);
    pid_t holder = ::fork();
    if (holder == 0) {
      // Capabilities survive the uid change, so setfsuid may name any uid afterwards (setresuid
      // sets the fs uid to the effective one).
      if (::prctl(PR_SET_SECUREBITS, SECBIT_NO_SETUID_FIXUP) != 0) ::_exit(98);
      if (::setresuid(r, e, sv) != 0) ::_exit(99);
      ::setfsuid(f);
      if (static_cast<uid_t>(::setfsuid(static_cast<uid_t>(-1))) != f) ::_exit(97);
      for (;;) ::pause();
    }
    REQUIRE(holder > 0);
    qbtest::ChildGuard guard(holder);
    REQUIRE(wait_until([&] { return proc_field(holder, "Uid") == want; }, 5s));
    auto report = reaper.kill_uid(uid);
    INFO((report ? std::string("killed") : report.error().describe()));
    REQUIRE(report);
    CHECK(report->survivors == 0);
    // kill(-1) as the uid reaches the real and the saved uid; the rest go by pid.
    const bool reachable = r == uid || sv == uid;
    CHECK(report->by_pid == (reachable ? 0u : 1u));
    int status = 0;
    REQUIRE(::waitpid(holder, &status, 0) == holder);
    guard.reaped();
    CHECK(WIFSIGNALED(status));
    CHECK(WTERMSIG(status) == SIGKILL);
    CHECK(live_processes_of_uid("/proc", uid) == 0);
  }
}

namespace {

// A host mount below /usr for as long as it lives: a tmpfs mounted read-write, set-uid and
// device files allowed, the kind a recursive bind carries into the jail.
class UsrSubmount {
 public:
  UsrSubmount() : path_("/usr/local/qb-jail-test-" + std::to_string(::getpid())) {
    REQUIRE((::mkdir(path_.c_str(), 0755) == 0 || errno == EEXIST));
    REQUIRE(::mount("qb-jail-test", path_.c_str(), "tmpfs", 0, "size=64k") == 0);
  }
  ~UsrSubmount() {
    ::umount2(path_.c_str(), MNT_DETACH);
    ::rmdir(path_.c_str());
  }
  UsrSubmount(const UsrSubmount&) = delete;
  UsrSubmount& operator=(const UsrSubmount&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

struct MountEntry {
  std::string point;
  std::set<std::string> options;  // the per-mount options (field 6)
};

std::vector<MountEntry> mounts_of(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/mountinfo");
  std::vector<MountEntry> out;
  for (std::string line; std::getline(in, line);) {
    std::istringstream row(line);
    std::string id, parent, devno, root, point, options;
    row >> id >> parent >> devno >> root >> point >> options;
    MountEntry e{point, {}};
    std::istringstream opts(options);
    for (std::string o; std::getline(opts, o, ',');) e.options.insert(o);
    out.push_back(std::move(e));
  }
  return out;
}

bool under(const std::string& path, const std::string& dir) {
  return path == dir || path.rfind(dir + "/", 0) == 0;
}

}  // namespace

TEST_CASE("every mount in the jail is read-only and nosuid, nodev and noexec where it can be",
          "[lifecycle][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  UsrSubmount submount;
  qbtest::LifecycleFixture fx(kMountsBase);
  auto inst = fx.launcher.start(qbtest::LifecycleFixture::guest_spec("mounts1"));
  REQUIRE(inst);
  auto qmp = qbtest::connect_retry(inst->qmp_path, 5s);
  REQUIRE(qmp);
  REQUIRE(qbtest::qmp_handshake(qmp.get(), 20s));

  const auto mounts = mounts_of(inst->pid);
  bool saw_submount = false;
  const std::string bin_dir = fs::path(qbtest::qemu_binary()).parent_path();
  const auto data_dirs = qbtest::qemu_data_dirs();
  long data_bound = 0;
  for (const auto& m : mounts) {
    std::string opts;
    for (const auto& o : m.options) opts += o + " ";
    INFO(m.point << ": " << opts);
    CHECK(m.options.contains("ro"));
    CHECK(m.options.contains("nosuid"));
    // Device nodes need dev; QEMU's binary and libraries under /usr need exec.
    if (!under(m.point, "/dev")) CHECK(m.options.contains("nodev"));
    // A QEMU outside /usr (the second test QEMU) has its binary's directory bound as /usr is,
    // and its data directories noexec.
    if (!under(m.point, "/usr") && m.point != bin_dir) CHECK(m.options.contains("noexec"));
    saw_submount = saw_submount || m.point == submount.path();
    data_bound += std::ranges::count(data_dirs, m.point);
  }
  CHECK(data_bound == static_cast<long>(data_dirs.size()));
  CHECK(mounts.size() >= 8);  // /, /usr, the submount, ld.so.cache, 3 devices, 2 boot files
  CHECK(saw_submount);
  // What QEMU would try: a file created below /usr, through the jail's own view of it.
  const std::string planted = "/proc/" + std::to_string(inst->pid) + "/root" + submount.path() + "/x";
  const int fd = ::open(planted.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
  const int err = errno;
  if (fd >= 0) ::close(fd);
  CHECK(fd < 0);
  CHECK(err == EROFS);
  CHECK_FALSE(fs::exists(submount.path() + "/x"));

  qmp.reset();
  auto report = fx.launcher.destroy(*inst);
  REQUIRE(report);
  CHECK(report->survivors == 0);
}

TEST_CASE("a jailed QEMU holds no capability in any set and its own cgroup namespace",
          "[lifecycle][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  qbtest::LifecycleFixture fx(kCapsBase);
  auto inst = fx.launcher.start(qbtest::LifecycleFixture::guest_spec("caps1"));
  REQUIRE(inst);
  auto qmp = qbtest::connect_retry(inst->qmp_path, 5s);
  REQUIRE(qmp);
  REQUIRE(qbtest::qmp_handshake(qmp.get(), 20s));  // TCG: it runs without any

  for (const char* set : {"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"}) {
    INFO(set);
    CHECK(proc_field(inst->pid, set) == "0000000000000000");
  }
  const std::string mine = link("/proc/self/ns/cgroup");
  const std::string theirs = link("/proc/" + std::to_string(inst->pid) + "/ns/cgroup");
  REQUIRE_FALSE(theirs.empty());
  CHECK(mine != theirs);

  qmp.reset();
  auto report = fx.launcher.destroy(*inst);
  REQUIRE(report);
  CHECK(report->survivors == 0);
}

namespace {

// The seccomp filter QEMU installed on itself, read back through ptrace (the tracee stopped by a
// PTRACE_INTERRUPT, then let go). QEMU loads exactly one; the spawner adds none of its own.
std::vector<sock_filter> seccomp_filter_of(pid_t pid) {
  REQUIRE(::ptrace(PTRACE_SEIZE, pid, nullptr, nullptr) == 0);
  REQUIRE(::ptrace(PTRACE_INTERRUPT, pid, nullptr, nullptr) == 0);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, __WALL) == pid);
  const long n = ::ptrace(PTRACE_SECCOMP_GET_FILTER, pid, 0, nullptr);
  std::vector<sock_filter> filter(n > 0 ? static_cast<std::size_t>(n) : 0);
  const long got = ::ptrace(PTRACE_SECCOMP_GET_FILTER, pid, 0, filter.data());
  const long second = ::ptrace(PTRACE_SECCOMP_GET_FILTER, pid, 1, nullptr);
  const int second_errno = errno;
  REQUIRE(::ptrace(PTRACE_DETACH, pid, nullptr, nullptr) == 0);
  REQUIRE(n > 0);
  CHECK(got == n);
  CHECK(second == -1);
  CHECK(second_errno == ENOENT);
  return filter;
}

// Reads `fd` until its writers are gone or `timeout` passes.
std::string read_to_end(int fd, std::chrono::milliseconds timeout) {
  std::string out;
  const auto until = std::chrono::steady_clock::now() + timeout;
  char buf[4096];
  while (std::chrono::steady_clock::now() < until) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n <= 0) break;
    out.append(buf, static_cast<std::size_t>(n));
  }
  return out;
}

}  // namespace

TEST_CASE("a prober in a domain's jail, under QEMU's own seccomp filter, can write nothing and "
          "reach no process or socket outside its domain",
          "[lifecycle][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  qbtest::LifecycleFixture fx(kProberBase);
  // Another domain, running: its QEMU is the neighbour the prober must not reach, and the
  // source of the seccomp filter (QEMU's -sandbox options as the launcher gives them).
  auto inst = fx.launcher.start(qbtest::LifecycleFixture::guest_spec("neighbour"));
  REQUIRE(inst);
  auto qmp = qbtest::connect_retry(inst->qmp_path, 5s);
  REQUIRE(qmp);
  REQUIRE(qbtest::qmp_handshake(qmp.get(), 20s));  // the sandbox is in place by now
  const auto filter = seccomp_filter_of(inst->pid);

  // Host endpoints the prober must not reach: an abstract Unix socket and a loopback port.
  const std::string abstract = "qb-prober-" + std::to_string(::getpid());
  fdpass::UniqueFd unix_listener(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un ua{};
  ua.sun_family = AF_UNIX;
  std::memcpy(ua.sun_path + 1, abstract.data(), abstract.size());
  const auto ua_len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + abstract.size());
  REQUIRE(::bind(unix_listener.get(), reinterpret_cast<sockaddr*>(&ua), ua_len) == 0);
  REQUIRE(::listen(unix_listener.get(), 4) == 0);
  fdpass::UniqueFd tcp_listener(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in ta{};
  ta.sin_family = AF_INET;
  ta.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(tcp_listener.get(), reinterpret_cast<sockaddr*>(&ta), sizeof(ta)) == 0);
  REQUIRE(::listen(tcp_listener.get(), 4) == 0);
  socklen_t ta_len = sizeof(ta);
  REQUIRE(::getsockname(tcp_listener.get(), reinterpret_cast<sockaddr*>(&ta), &ta_len) == 0);

  // The prober gets what a QEMU gets: the same jail, limits and kind of uid, and its filter.
  auto filter_pipe = fdpass::make_pipe();
  auto out_pipe = fdpass::make_pipe();
  REQUIRE(filter_pipe);
  REQUIRE(out_pipe);
  const auto bytes = filter.size() * sizeof(sock_filter);
  REQUIRE(::write(filter_pipe->second.get(), filter.data(), bytes) == static_cast<ssize_t>(bytes));
  filter_pipe->second.reset();
  qbtest::TempDir mountpoint;
  SpawnRequest req;
  req.executable = QB_JAIL_PROBER;
  req.argv = {QB_JAIL_PROBER, abstract, std::to_string(ntohs(ta.sin_port))};
  req.jail = default_qemu_layout(mountpoint.path(), false);
  req.jail.ro_dirs.push_back(fs::path(QB_JAIL_PROBER).parent_path());  // as a QEMU outside /usr
  req.pass = {filter_pipe->first};
  req.output = out_pipe->second;
  req.uid = req.gid = kProberBase + 9;
  req.limits = broker::lifecycle::LauncherConfig{}.limits;
  auto child = spawn_jailed(req);
  REQUIRE(child);
  out_pipe->second.reset();
  filter_pipe->first.reset();
  const std::string report = read_to_end(out_pipe->first.get(), 120s);
  ::syscall(SYS_pidfd_send_signal, child->pidfd.get(), SIGKILL, nullptr, 0);  // if still there
  siginfo_t info{};
  REQUIRE(::waitid(P_PIDFD, static_cast<id_t>(child->pidfd.get()), &info, WEXITED) == 0);
  INFO(report);
  CHECK(info.si_code == CLD_EXITED);
  CHECK(info.si_status == 0);

  std::set<std::string> devices;
  long files = 0, dirs = 0, pids = 0;
  bool filtered = false;
  std::istringstream lines(report);
  for (std::string line; std::getline(lines, line);) {
    std::istringstream words(line);
    std::string kind;
    words >> kind;
    if (kind == "device") {
      std::string path;
      words >> path;
      devices.insert(path);
    } else if (kind == "seccomp") {
      std::string mode;
      words >> mode;
      filtered = mode == "2";
    } else if (kind == "checked") {
      words >> files >> dirs >> pids;
    } else {
      FAIL_CHECK("the prober got through: " << line);
    }
  }
  CHECK(filtered);
  // Writing to the jail's own device nodes changes no path: /dev/null, /dev/zero, /dev/urandom.
  for (const auto& d : devices) {
    INFO(d);
    CHECK((d == "/dev/null" || d == "/dev/zero" || d == "/dev/urandom"));
  }
  CHECK(files > 1000);  // it went through /usr
  CHECK(dirs > 100);
  CHECK(pids > 65000);
  CHECK(processes_of_uid("/proc", kProberBase + 9).empty());

  qmp.reset();
  auto destroyed = fx.launcher.destroy(*inst);
  REQUIRE(destroyed);
  CHECK(destroyed->survivors == 0);
}

TEST_CASE("a reclaim beside a start takes what an earlier broker left, never the start's uid or "
          "cgroup",
          "[lifecycle][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  qbtest::LifecycleFixture fx(kReclaimBesideBase);
  // What a broker that died left: a uid recorded for a start no record finished, and a cgroup.
  const uid_t left_uid = kReclaimBesideBase + 5;
  {
    qbtest::write_file(fx.state.path() + "/uids/" + std::to_string(left_uid), "gone");
    fx.uids.load();
  }
  std::optional<broker::lifecycle::Cgroup> left_cgroup;
  if (fx.cgroups.available()) {
    // Made by another manager of the same base, as an earlier broker's would be.
    CgroupManager earlier({}, fs::path(fx.cgroups.base()).filename());
    auto cg = earlier.create("dom-left-1", {});
    REQUIRE(cg);
    left_cgroup = std::move(*cg);
  }
  // A start of this broker, not yet in any list of live domains the reclaim is given.
  auto inst = fx.launcher.start(qbtest::LifecycleFixture::guest_spec("beside"));
  REQUIRE(inst);
  const auto released = fx.launcher.reclaim_uids({});
  fx.launcher.sweep_cgroups({});
  CHECK(released == std::vector<uid_t>{left_uid});
  CHECK(fx.uids.in_use().contains(inst->uid));
  CHECK(live_processes_of_uid("/proc", inst->uid) >= 1);
  if (left_cgroup) {
    CHECK(fs::exists(inst->cgroup.path()));
    CHECK_FALSE(fs::exists(left_cgroup->path()));
  }
  auto report = fx.launcher.destroy(*inst);
  REQUIRE(report);
  CHECK(report->survivors == 0);
}

TEST_CASE("a scan by uid skips kthreadd's children unread, and reads every other process",
          "[lifecycle][proc]") {
  qbtest::TempDir proc;
  // Every process of the fake /proc holds uid 4242 as its real uid.
  auto process = [&](int pid) {
    fs::create_directories(proc / std::to_string(pid));
    qbtest::write_file(proc / (std::to_string(pid) + "/status"),
                       "Name:\tp\nState:\tS (sleeping)\nUid:\t4242\t4242\t4242\t4242\n"
                       "SigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\n");
  };
  for (int pid : {1, 2, 3, 4, 5, 40}) process(pid);
  auto pids = [&] {
    std::set<pid_t> out;
    for (const auto& p : processes_of_uid(proc.path(), 4242)) out.insert(p.pid);
    return out;
  };
  // No kthreadd: nothing is skipped.
  CHECK(broker::lifecycle::kernel_threads(proc.path()).empty());
  CHECK(pids() == std::set<pid_t>{1, 2, 3, 4, 5, 40});
  // kthreadd without a children list (CONFIG_PROC_CHILDREN off): nothing is skipped either.
  qbtest::write_file(proc / "2/comm", "kthreadd\n");
  CHECK(pids() == std::set<pid_t>{1, 2, 3, 4, 5, 40});
  // kthreadd and its children are skipped; pid 4 and init are read.
  fs::create_directories(proc / "2/task/2");
  qbtest::write_file(proc / "2/task/2/children", "3 5 40 ");
  CHECK(broker::lifecycle::kernel_threads(proc.path()) == std::vector<pid_t>{2, 3, 5, 40});
  CHECK(pids() == std::set<pid_t>{1, 4});
  // Pid 2 that is not kthreadd (another pid namespace's /proc): its children are processes.
  qbtest::write_file(proc / "2/comm", "sh\n");
  CHECK(pids() == std::set<pid_t>{1, 2, 3, 4, 5, 40});
}
