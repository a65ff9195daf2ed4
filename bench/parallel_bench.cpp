// Concurrent starts: N domains created at once through the Broker against N raw QEMUs spawned at
// once, in the same run, with the same QEMU command line (machine none, 16 MiB, TCG or KVM as the
// host allows): the throughput of each (domains running per second, from the first request to
// the last domain running) and the p50/p99 of a single start. Then all N are destroyed at once,
// again against raw kill + reap.
//
//   raw     N threads, each: fork + exec QEMU with a QMP listener at fd 3, connect, handshake,
//           cont, query-status says running
//   broker  N Broker::create() coroutines issued at once (job slot, uid reserved and swept, jail,
//           QMP, cont, record), the lifecycle pool at --parallel N (default 4)
//
// Usage: parallel_bench [--domains N] [--parallel N] [--rounds R]   (needs root; build optimized)
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "broker/control/broker.hpp"
#include "broker/core/log.hpp"
#include "broker/lifecycle/launcher.hpp"
#include "fdpass/devices.hpp"
#include "support/qemu.hpp"

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;
namespace asio = boost::asio;

namespace {

constexpr uid_t kBase = 3'192'000;

[[noreturn]] void die(const std::string& why) {
  std::fprintf(stderr, "parallel_bench: %s\n", why.c_str());
  std::exit(1);
}

double ms(Clock::duration d) {
  return std::chrono::duration<double, std::milli>(d).count();
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const auto i = static_cast<std::size_t>(p * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

struct Batch {
  double wall_ms = 0;           // first request to last domain running
  std::vector<double> each_ms;  // each start, from the batch's start
  double destroy_wall_ms = 0;   // all destroyed at once
};

// One raw QEMU: spawned, handshaken, running. Returns its pid, or -1.
// The QEMU's pid once it runs; else -1 and `why`, with a QEMU that was spawned killed and reaped.
pid_t raw_start(const std::vector<std::string>& argv, const std::string& sock, std::string& why) {
  auto listener = fdpass::listen_unix(sock, 0600, 0, 0);
  auto console = fdpass::listen_unix(sock + ".console", 0600, 0, 0);
  if (!listener || !console) {
    why = "listening on " + sock + " or its .console: " +
          (listener ? console.error() : listener.error()).message();
    return -1;
  }
  const pid_t pid = qbtest::spawn_with_listeners(argv, listener->get(), console->get());
  listener->reset();
  console->reset();
  if (pid < 0) {
    why = std::string("fork: ") + std::strerror(errno);
    return -1;
  }
  auto failed = [&](const char* step) {
    why = step;
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    return -1;
  };
  auto qmp = qbtest::connect_retry(sock, 30s);
  if (!qmp) return failed("no QMP connection within 30 s");
  if (!qbtest::qmp_handshake(qmp.get(), 30s)) return failed("no QMP handshake within 30 s");
  auto cont = qbtest::qmp_command(qmp.get(), R"({"execute":"cont"})", 30s);
  auto status = qbtest::qmp_command(qmp.get(), R"({"execute":"query-status"})", 30s);
  if (!cont || !status || status->find("\"running\"") == std::string::npos) {
    return failed("cont did not make it run");
  }
  return pid;
}

Batch raw_batch(const std::vector<std::string>& argv, const std::string& dir, int n) {
  Batch b;
  b.each_ms.resize(static_cast<std::size_t>(n));
  std::vector<pid_t> pids(static_cast<std::size_t>(n), -1);
  std::vector<std::string> why(static_cast<std::size_t>(n));
  std::vector<std::thread> threads;
  const auto t0 = Clock::now();
  for (int i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      const auto at = static_cast<std::size_t>(i);
      pids[at] = raw_start(argv, dir + "/raw" + std::to_string(i) + ".sock", why[at]);
      b.each_ms[at] = ms(Clock::now() - t0);
    });
  }
  for (auto& t : threads) t.join();
  b.wall_ms = ms(Clock::now() - t0);
  for (std::size_t i = 0; i < pids.size(); ++i) {
    if (pids[i] >= 0) continue;
    // The ones that did start go before the benchmark does.
    for (pid_t p : pids) {
      if (p > 0) ::kill(p, SIGKILL);
    }
    for (pid_t p : pids) {
      if (p > 0) ::waitpid(p, nullptr, 0);
    }
    die("raw QEMU " + std::to_string(i) + " did not start: " + why[i]);
  }
  const auto t1 = Clock::now();
  for (pid_t p : pids) ::kill(p, SIGKILL);
  for (pid_t p : pids) ::waitpid(p, nullptr, 0);
  b.destroy_wall_ms = ms(Clock::now() - t1);
  for (int i = 0; i < n; ++i) {
    const std::string sock = dir + "/raw" + std::to_string(i) + ".sock";
    ::unlink(sock.c_str());
    ::unlink((sock + ".console").c_str());
  }
  return b;
}

struct Env {
  std::string dir;
  broker::lifecycle::ForkingUidKiller killer;
  broker::lifecycle::Reaper reaper{killer, kBase};
  broker::lifecycle::UidPool uids;
  broker::lifecycle::CgroupManager cgroups{{}, "qbroker-" + std::to_string(kBase)};
  fdpass::ImageRoots roots;
  broker::lifecycle::Launcher launcher;
  asio::io_context io;
  broker::Broker broker;

  Env(const std::string& d, int domains, std::size_t parallel)
      : dir(d),
        uids({kBase, static_cast<uid_t>(domains + 1)}, d + "/state", reaper),
        roots(*fdpass::ImageRoots::open({"/usr/share"})),
        launcher(config(d), uids, cgroups, roots),
        broker(io.get_executor(), broker_config(d, parallel), launcher, roots) {
    uids.load();
  }
  ~Env() { cgroups.remove_base_if_empty(); }
  static broker::lifecycle::LauncherConfig config(const std::string& d) {
    broker::lifecycle::LauncherConfig c;
    c.run_dir = d + "/run";
    return c;
  }
  static broker::BrokerConfig broker_config(const std::string& d, std::size_t parallel) {
    broker::BrokerConfig c;
    c.records_dir = d + "/records";
    c.parallel_lifecycle = parallel;
    c.start_timeout = 60s;
    return c;
  }
};

broker::lifecycle::DomainSpec spec(const std::string& name) {
  broker::lifecycle::DomainSpec s;
  s.name = name;
  s.machine = broker::lifecycle::Machine::none;
  s.memory_mib = 16;
  s.pci_slots = 0;
  return s;
}

// Runs the io_context until `done` reaches `n`. An io_context that ran out of work stops, and
// stays stopped until restarted.
void run_until(asio::io_context& io, const int& done, int n) {
  io.restart();
  while (done < n) {
    if (io.run_one() == 0) io.restart();
  }
}

Batch broker_batch(Env& env, int n) {
  Batch b;
  b.each_ms.resize(static_cast<std::size_t>(n));
  int done = 0;
  bool failed = false;
  const auto t0 = Clock::now();
  for (int i = 0; i < n; ++i) {
    broker::CreateDomain c;
    c.spec = spec("par" + std::to_string(i));
    asio::co_spawn(env.io, env.broker.create(std::move(c)),
                   [&, i](std::exception_ptr e, broker::Result<broker::DomainInfo> r) {
                     if (e || !r) {
                       failed = true;
                       if (r.has_error())
                         std::fprintf(stderr, "create: %s\n", r.error().describe().c_str());
                     }
                     b.each_ms[static_cast<std::size_t>(i)] = ms(Clock::now() - t0);
                     ++done;
                   });
  }
  run_until(env.io, done, n);
  b.wall_ms = ms(Clock::now() - t0);
  if (failed) die("a create failed");
  done = 0;
  const auto t1 = Clock::now();
  for (int i = 0; i < n; ++i) {
    asio::co_spawn(env.io, env.broker.destroy("par" + std::to_string(i)),
                   [&](std::exception_ptr e, broker::Result<broker::lifecycle::KillReport> r) {
                     if (e || !r) failed = true;
                     ++done;
                   });
  }
  run_until(env.io, done, n);
  b.destroy_wall_ms = ms(Clock::now() - t1);
  if (failed) die("a destroy failed");
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  if (::geteuid() != 0) die("needs root");
  int domains = 50;
  std::size_t parallel = 4;
  int rounds = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--domains")
      domains = std::atoi(argv[i + 1]);
    else if (a == "--parallel")
      parallel = static_cast<std::size_t>(std::atoi(argv[i + 1]));
    else if (a == "--rounds")
      rounds = std::atoi(argv[i + 1]);
    else
      die("unknown argument " + a);
  }
  if (domains < 1 || rounds < 1 || parallel < 1)
    die("--domains, --parallel and --rounds must be positive");
  broker::log::set_level(broker::log::Level::warn);
  qbtest::become_subreaper();
  char tmpl[] = "/tmp/qbpar.XXXXXX";
  const std::string dir = ::mkdtemp(tmpl);
  {
    Env env(dir, domains, parallel);
    const auto accel = env.launcher.detect_accel(broker::lifecycle::Accel::automatic);
    const auto jailed = env.launcher.command_line(spec("raw"), accel, nullptr, {});

    std::vector<double> raw_tput, broker_tput, raw_p50, raw_p99, broker_p50, broker_p99, raw_d,
        broker_d;
    for (int r = 0; r < rounds; ++r) {
      auto raw = raw_batch(jailed, dir, domains);
      auto brk = broker_batch(env, domains);
      raw_tput.push_back(domains * 1000.0 / raw.wall_ms);
      broker_tput.push_back(domains * 1000.0 / brk.wall_ms);
      raw_p50.push_back(percentile(raw.each_ms, 0.5));
      raw_p99.push_back(percentile(raw.each_ms, 0.99));
      broker_p50.push_back(percentile(brk.each_ms, 0.5));
      broker_p99.push_back(percentile(brk.each_ms, 0.99));
      raw_d.push_back(raw.destroy_wall_ms);
      broker_d.push_back(brk.destroy_wall_ms);
    }
    auto med = [](std::vector<double> v) { return percentile(std::move(v), 0.5); };
    std::printf(
        "parallel benchmark: %d domains at once, lifecycle pool %zu, accel %s, %d rounds "
        "(medians)\n",
        domains, parallel, std::string(broker::lifecycle::to_string(accel)).c_str(), rounds);
    std::printf(
        "  start throughput  raw %7.1f /s   broker %7.1f /s   ratio %.2f (target >= 0.80)\n",
        med(raw_tput), med(broker_tput), med(broker_tput) / med(raw_tput));
    std::printf("  start p50         raw %7.1f ms   broker %7.1f ms   ratio %.2f\n", med(raw_p50),
                med(broker_p50), med(broker_p50) / med(raw_p50));
    std::printf("  start p99         raw %7.1f ms   broker %7.1f ms   ratio %.2f\n", med(raw_p99),
                med(broker_p99), med(broker_p99) / med(raw_p99));
    std::printf("  destroy all       raw %7.1f ms   broker %7.1f ms   ratio %.2f\n", med(raw_d),
                med(broker_d), med(broker_d) / med(raw_d));
  }
  const std::string cleanup = "rm -rf " + dir;
  return std::system(cleanup.c_str()) == 0 ? 0 : 1;
}
