// Lifecycle benchmark: start and destroy of a jailed QEMU against the same QEMU command line
// spawned and killed raw, in the same run, plus kill-by-uid of a 300-process fork storm.
//
//   start   exec -> QMP capabilities negotiated -> cont -> query-status says running
//   destroy kill -> every process gone and reaped (raw: SIGKILL + waitpid; broker: the full
//           teardown: cgroup.kill, pidns init, kill(-1) as the uid, reap, /proc check)
//
// Usage: lifecycle_bench [ROUNDS]   (needs root; prints medians and ratios)
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "broker/lifecycle/cgroup.hpp"
#include "broker/lifecycle/launcher.hpp"
#include "broker/lifecycle/proc.hpp"
#include "broker/lifecycle/reaper.hpp"
#include "broker/lifecycle/uid_pool.hpp"
#include "broker/core/log.hpp"
#include "fdpass/devices.hpp"
#include "support/qemu.hpp"

using namespace broker::lifecycle;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

namespace {

constexpr uid_t kBase = 3'190'000;

double ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

bool running(int qmp) {
  auto reply = qbtest::qmp_command(qmp, R"({"execute":"cont"})", 10s);
  if (!reply) return false;
  auto st = qbtest::qmp_command(qmp, R"({"execute":"query-status"})", 10s);
  return st && st->find("\"running\"") != std::string::npos;
}

// The same QEMU words the launcher uses for machine none, without the jail.
std::vector<std::string> raw_argv(const std::vector<std::string>& jailed) { return jailed; }

struct RawResult {
  double start_ms;
  double destroy_ms;
};

RawResult raw_round(const std::vector<std::string>& argv, const std::string& dir) {
  std::string sock = dir + "/raw-qmp.sock";
  std::string console_sock = dir + "/raw-console.sock";
  auto listener = fdpass::listen_unix(sock, 0600, 0, 0);
  auto console = fdpass::listen_unix(console_sock, 0600, 0, 0);
  if (!listener || !console) std::abort();
  auto t0 = Clock::now();
  // fds 3 and 4: the QMP and console listeners, as in the jail.
  pid_t pid = qbtest::spawn_with_listeners(argv, listener->get(), console->get());
  listener->reset();
  console->reset();
  if (pid < 0) std::abort();
  auto qmp = qbtest::connect_retry(sock, 10s);
  if (!qmp || !qbtest::qmp_handshake(qmp.get(), 10s) || !running(qmp.get())) std::abort();
  auto t1 = Clock::now();
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  auto t2 = Clock::now();
  ::unlink(sock.c_str());
  ::unlink(console_sock.c_str());
  return {ms(t1 - t0), ms(t2 - t1)};
}

}  // namespace

int main(int argc, char** argv) {
  if (::geteuid() != 0) {
    std::fprintf(stderr, "lifecycle_bench needs root\n");
    return 2;
  }
  broker::log::set_level(broker::log::Level::warn);
  int rounds = argc > 1 ? std::atoi(argv[1]) : 10;
  qbtest::become_subreaper();
  char tmpl[] = "/tmp/qbbench.XXXXXX";
  std::string dir = ::mkdtemp(tmpl);
  ForkingUidKiller killer;
  Reaper reaper(killer, kBase);
  UidPool uids({kBase, 8}, dir, reaper);
  uids.load();
  CgroupManager cgroups;
  auto roots = fdpass::ImageRoots::open({"/usr/share"});
  LauncherConfig config;
  config.run_dir = dir + "/run";
  Launcher launcher(config, uids, cgroups, *roots);

  DomainSpec spec;
  spec.name = "bench";
  spec.machine = Machine::none;
  spec.memory_mib = 16;
  spec.pci_slots = 0;
  auto argv_jailed = launcher.command_line(spec, launcher.detect_accel(Accel::automatic), {}, {});

  std::vector<double> raw_start, raw_destroy, start, destroy;
  // The broker's start, step by step: the launcher's steps, then the QMP handshake and cont.
  std::vector<std::string> step_names;
  std::vector<std::vector<double>> step_ms;
  for (int i = 0; i < rounds; ++i) {
    auto raw = raw_round(raw_argv(argv_jailed), dir);
    raw_start.push_back(raw.start_ms);
    raw_destroy.push_back(raw.destroy_ms);

    auto t0 = Clock::now();
    auto inst = launcher.start(spec);
    if (!inst) {
      std::fprintf(stderr, "start: %s\n", inst.error().describe().c_str());
      return 1;
    }
    auto qmp = qbtest::connect_retry(inst->qmp_path, 10s);
    if (!qmp || !qbtest::qmp_handshake(qmp.get(), 10s)) return 1;
    inst->trace.mark("qmp greeting+capabilities");
    if (!running(qmp.get())) return 1;
    inst->trace.mark("cont+query-status");
    auto t1 = Clock::now();
    for (std::size_t k = 0; k < inst->trace.steps().size(); ++k) {
      if (step_names.size() <= k) {
        step_names.push_back(inst->trace.steps()[k].name);
        step_ms.emplace_back();
      }
      step_ms[k].push_back(inst->trace.steps()[k].took.count() / 1000.0);
    }
    qmp.reset();
    auto report = launcher.destroy(*inst);
    auto t2 = Clock::now();
    if (!report) {
      std::fprintf(stderr, "destroy: %s\n", report.error().describe().c_str());
      return 1;
    }
    start.push_back(ms(t1 - t0));
    destroy.push_back(ms(t2 - t1));
  }

  // Fork storm: 300 processes under a fresh uid, killed by uid.
  std::vector<double> storm;
  std::vector<std::size_t> storm_sizes;
  const char* storm_bin = std::getenv("QB_FORK_STORM");
  for (int i = 0; storm_bin != nullptr && i < rounds; ++i) {
    uid_t uid = kBase + 7;
    pid_t p = ::fork();
    if (p == 0) {
      if (::setresgid(uid, uid, uid) != 0 || ::setresuid(uid, uid, uid) != 0) ::_exit(99);
      ::execl(storm_bin, storm_bin, "300", static_cast<char*>(nullptr));
      ::_exit(127);
    }
    ::waitpid(p, nullptr, 0);
    auto deadline = Clock::now() + 20s;
    while (live_processes_of_uid("/proc", uid) < 290 && Clock::now() < deadline) {
      std::this_thread::sleep_for(5ms);
    }
    auto report = reaper.kill_uid(uid);
    if (!report) return 1;
    storm.push_back(report->duration.count() / 1000.0);
    storm_sizes.push_back(report->found);
    while (qbtest::reap_exited_children() > 0) {
    }
  }

  std::printf("lifecycle benchmark (%d rounds, accel %s, medians)\n", rounds,
              std::string(to_string(launcher.detect_accel(Accel::automatic))).c_str());
  std::printf("  start   raw %8.1f ms   broker %8.1f ms   ratio %.2f (target <= 1.10)\n",
              median(raw_start), median(start), median(start) / median(raw_start));
  std::printf("  destroy raw %8.1f ms   broker %8.1f ms   ratio %.2f (target <= 1.50)\n",
              median(raw_destroy), median(destroy), median(destroy) / median(raw_destroy));
  std::printf("  broker start, step by step (medians):\n");
  for (std::size_t k = 0; k < step_names.size(); ++k) {
    std::printf("    %-28s %8.2f ms\n", step_names[k].c_str(), median(step_ms[k]));
  }
  if (!storm.empty()) {
    std::printf("  fork storm of %zu processes killed by uid in %.1f ms (median; target <= 250)\n",
                storm_sizes[storm_sizes.size() / 2], median(storm));
  }
  std::string cleanup = "rm -rf " + dir;
  return std::system(cleanup.c_str()) == 0 ? 0 : 1;
}
