// qmp benchmark: query-status round trips through qmp::Client against a minimal hand-written
// raw socket loop, on the same QEMU in the same run, plus resident memory per idle connection.
//
// One QEMU (-machine none) gets two monitors on socketpairs, one for the raw loop and one for the
// client; raw and client rounds alternate on it so drift hits both alike. A second QEMU gets N
// monitors for N idle clients (QEMU polls every monitor on each main-loop pass, so they would
// slow the first one down).
// Usage: qmp_bench [--seconds S] [--rounds R] [--idle N] [--check]
//   --check: exit 1 when a target is missed (client rate >= 90% of raw, <= 64 KiB per idle
//            connection).
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "qemu_process.hpp"
#include "qmp/client.hpp"

namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

namespace {

double cpu_seconds() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  auto tv = [](const timeval& t) { return static_cast<double>(t.tv_sec) + t.tv_usec / 1e6; };
  return tv(ru.ru_utime) + tv(ru.ru_stime);
}

struct Samples {
  std::vector<double> us;  // per round trip
  double seconds = 0;
  double cpu = 0;  // this process's user + system time

  double cpu_us_per_call() const {
    return us.empty() ? 0 : cpu * 1e6 / static_cast<double>(us.size());
  }

  double rate() const { return seconds > 0 ? static_cast<double>(us.size()) / seconds : 0; }
  double pct(double p) {
    if (us.empty()) return 0;
    std::sort(us.begin(), us.end());
    return us[static_cast<std::size_t>(p * static_cast<double>(us.size() - 1))];
  }
};

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "qmp_bench: %s\n", what.c_str());
  std::exit(2);
}

// The floor: blocking write of a fixed command, blocking read up to the newline. No JSON.
class RawLoop {
 public:
  explicit RawLoop(fdpass::UniqueFd fd) : fd_(std::move(fd)) {
    read_line();  // greeting
    write_all("{\"execute\":\"qmp_capabilities\"}\n");
    read_line();
  }

  void round(Clock::time_point until, Samples& s) {
    static constexpr std::string_view kCmd = "{\"execute\":\"query-status\"}\n";
    const double cpu0 = cpu_seconds();
    auto start = Clock::now();
    auto t = start;
    while (t < until) {
      write_all(kCmd);
      read_line();
      auto now = Clock::now();
      s.us.push_back(std::chrono::duration<double, std::micro>(now - t).count());
      t = now;
    }
    s.seconds += std::chrono::duration<double>(t - start).count();
    s.cpu += cpu_seconds() - cpu0;
  }

 private:
  void write_all(std::string_view b) {
    while (!b.empty()) {
      ssize_t n = ::write(fd_.get(), b.data(), b.size());
      if (n <= 0) die("raw write failed");
      b.remove_prefix(static_cast<std::size_t>(n));
    }
  }
  void read_line() {
    for (;;) {
      if (auto nl = buf_.find('\n'); nl != std::string::npos) {
        buf_.erase(0, nl + 1);
        return;
      }
      char tmp[65536];
      ssize_t n = ::read(fd_.get(), tmp, sizeof(tmp));
      if (n <= 0) die("raw read failed");
      buf_.append(tmp, static_cast<std::size_t>(n));
    }
  }

  fdpass::UniqueFd fd_;
  std::string buf_;
};

asio::awaitable<void> client_round(qmp::Client& c, Clock::time_point until, Samples& s) {
  const double cpu0 = cpu_seconds();
  auto start = Clock::now();
  auto t = start;
  while (t < until) {
    auto r = co_await c.execute(qmp::cmd::query_status(), qmp::after(5s));
    if (!r) die("client: " + r.error().message);
    auto now = Clock::now();
    s.us.push_back(std::chrono::duration<double, std::micro>(now - t).count());
    t = now;
  }
  s.seconds += std::chrono::duration<double>(t - start).count();
  s.cpu += cpu_seconds() - cpu0;
}

template <class T>
T run(asio::io_context& io, asio::awaitable<T> a) {
  std::optional<T> out;
  asio::co_spawn(io, std::move(a), [&](std::exception_ptr e, T v) {
    if (e) std::rethrow_exception(e);
    out.emplace(std::move(v));
  });
  io.restart();
  while (!out) io.run_one();
  return std::move(*out);
}

void run(asio::io_context& io, asio::awaitable<void> a) {
  bool done = false;
  asio::co_spawn(io, std::move(a), [&](std::exception_ptr e) {
    if (e) std::rethrow_exception(e);
    done = true;
  });
  io.restart();
  while (!done) io.run_one();
}

std::size_t rss_kib() {
  std::ifstream in("/proc/self/statm");
  std::size_t pages = 0;
  std::size_t resident = 0;
  in >> pages >> resident;
  return resident * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE)) / 1024;
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 1.0;
  int rounds = 3;
  int idle = 200;
  bool check = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--seconds" && i + 1 < argc) {
      seconds = std::atof(argv[++i]);
    } else if (a == "--rounds" && i + 1 < argc) {
      rounds = std::atoi(argv[++i]);
    } else if (a == "--idle" && i + 1 < argc) {
      idle = std::atoi(argv[++i]);
    } else if (a == "--check") {
      check = true;
    } else {
      die("usage: qmp_bench [--seconds S] [--rounds R] [--idle N] [--check]");
    }
  }

  auto qemu = qbtest::QemuProcess::start(2);
  asio::io_context io;
  RawLoop raw(std::move(qemu->monitors[0]));
  auto connected = run(
      io, qmp::Client::connect(io.get_executor(), std::move(qemu->monitors[1]), qmp::after(30s)));
  if (!connected) die("connect: " + connected.error().message);
  auto& client = **connected;

  // Warm up both paths, then alternate.
  Samples warm;
  raw.round(Clock::now() + 100ms, warm);
  run(io, client_round(client, Clock::now() + 100ms, warm));
  Samples raw_s;
  Samples client_s;
  const auto slice =
      std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds / rounds));
  for (int r = 0; r < rounds; ++r) {
    raw.round(Clock::now() + slice, raw_s);
    run(io, client_round(client, Clock::now() + slice, client_s));
  }

  // Idle connections: what each one keeps resident once connected and negotiated.
  std::vector<std::unique_ptr<qmp::Client>> idle_clients;
  double per_conn_kib = 0;
  std::size_t before = 0;
  std::size_t after = 0;
  std::unique_ptr<qbtest::QemuProcess> idle_qemu;
  if (idle > 0) {
    idle_qemu = qbtest::QemuProcess::start(idle);
    before = rss_kib();
    for (int i = 0; i < idle; ++i) {
      auto c =
          run(io, qmp::Client::connect(io.get_executor(),
                                       std::move(idle_qemu->monitors[static_cast<std::size_t>(i)]),
                                       qmp::after(30s)));
      if (!c) die("idle connect: " + c.error().message);
      idle_clients.push_back(std::move(*c));
    }
    io.restart();
    io.poll();
    after = rss_kib();
    per_conn_kib = static_cast<double>(after - std::min(after, before)) / idle;
  }

  const auto& v = client.greeting().version;
  const double ratio = raw_s.rate() > 0 ? client_s.rate() / raw_s.rate() : 0;
  std::printf(
      "qmp bench: QEMU %s (%s, -machine none), query-status, %.1f s per side in %d rounds\n",
      v.to_string().c_str(), qbtest::qemu_accel().c_str(), seconds, rounds);
  std::printf(
      "  raw socket loop : %7.0f req/s   p50 %7.1f us   p99 %7.1f us   cpu %5.1f us/call"
      "   (%zu calls)\n",
      raw_s.rate(), raw_s.pct(0.5), raw_s.pct(0.99), raw_s.cpu_us_per_call(), raw_s.us.size());
  std::printf(
      "  qmp::Client     : %7.0f req/s   p50 %7.1f us   p99 %7.1f us   cpu %5.1f us/call"
      "   (%zu calls)\n",
      client_s.rate(), client_s.pct(0.5), client_s.pct(0.99), client_s.cpu_us_per_call(),
      client_s.us.size());
  std::printf("  ratio client/raw: %.1f %%   (target >= 90 %%)\n", ratio * 100);
  if (idle > 0) {
    std::printf(
        "  idle connections: %d, RSS %zu -> %zu KiB, %.1f KiB per connection "
        "(target <= 64 KiB)\n",
        idle, before, after, per_conn_kib);
  }
  bool ok = ratio >= 0.9 && (idle == 0 || per_conn_kib <= 64.0);
  return check && !ok ? 1 : 0;
}
