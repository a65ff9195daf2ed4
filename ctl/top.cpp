#include "ctl/top.hpp"

#include <poll.h>
#include <signal.h>
#include <termios.h>
#include <unistd.h>

#include <boost/json.hpp>
#include <cerrno>
#include <cstdio>
#include <ctime>
#include <iostream>
#include <optional>
#include <vector>

#include "ctl/client.hpp"
#include "ctl/render.hpp"

namespace qbctl {
namespace json = boost::json;
using Clock = std::chrono::steady_clock;

namespace {

const json::value& member(const json::value& v, std::string_view key) {
  static const json::value null;
  if (!v.is_object()) return null;
  const auto* m = v.get_object().if_contains(key);
  return m != nullptr ? *m : null;
}

std::string str(const json::value& v) {
  if (v.is_string()) return std::string(v.get_string());
  if (v.is_null()) return "-";
  return json::serialize(v);
}

std::uint64_t number(const json::value& v) {
  if (v.is_uint64()) return v.get_uint64();
  if (v.is_int64() && v.get_int64() >= 0) return static_cast<std::uint64_t>(v.get_int64());
  if (v.is_double() && v.get_double() >= 0) return static_cast<std::uint64_t>(v.get_double());
  return 0;
}

std::string mib(std::uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f MiB", static_cast<double>(bytes) / (1024.0 * 1024.0));
  return buf;
}

std::string cpu_percent(std::uint64_t now, const std::string& name, const CpuTimes& before,
                        std::chrono::microseconds elapsed) {
  auto it = before.find(name);
  if (it == before.end() || elapsed.count() <= 0 || now < it->second) return "-";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f%%",
                100.0 * static_cast<double>(now - it->second) / static_cast<double>(elapsed.count()));
  return buf;
}

std::string progress(const json::value& d) {
  const auto& p = member(d, "job_progress");
  if (!p.is_object()) return "";
  const auto& f = member(p, "fraction");
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.0f%%", f.is_number() ? f.to_number<double>() * 100.0 : 0.0);
  std::string phase = str(member(p, "phase"));
  return phase.empty() || phase == "-" ? buf : std::string(buf) + " " + phase;
}

// Puts the terminal on stdin in non-canonical mode without echo, so `q` arrives without Enter
// and is not printed; Ctrl-C still raises SIGINT. Restored when it goes.
class KeyMode {
 public:
  KeyMode() {
    if (::isatty(STDIN_FILENO) != 1 || ::tcgetattr(STDIN_FILENO, &saved_) != 0) return;
    termios raw = saved_;
    raw.c_lflag &= ~static_cast<tcflag_t>(ICANON | ECHO);
    raw.c_cc[VMIN] = 0;
    raw.c_cc[VTIME] = 0;
    active_ = ::tcsetattr(STDIN_FILENO, TCSANOW, &raw) == 0;
  }
  ~KeyMode() {
    if (active_) ::tcsetattr(STDIN_FILENO, TCSANOW, &saved_);
  }
  KeyMode(const KeyMode&) = delete;
  KeyMode& operator=(const KeyMode&) = delete;
  bool active() const { return active_; }

 private:
  termios saved_{};
  bool active_ = false;
};

volatile sig_atomic_t g_interrupted = 0;

void on_interrupt(int) { g_interrupted = 1; }

// Ctrl-C ends the view through the loop, so the terminal is restored; no SA_RESTART, so the wait
// in poll() ends at once.
void catch_interrupt() {
  struct sigaction sa {};
  sa.sa_handler = on_interrupt;
  ::sigemptyset(&sa.sa_mask);
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
}

// Waits up to `interval` for `q` on the terminal; true when the view should end.
bool wait_for_quit(std::chrono::milliseconds interval, bool keys) {
  const auto deadline = Clock::now() + interval;
  for (;;) {
    if (g_interrupted) return true;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) return false;
    pollfd p{STDIN_FILENO, POLLIN, 0};
    int n = ::poll(&p, keys ? 1 : 0, static_cast<int>(left.count()));
    if (n < 0 && errno != EINTR) return false;
    if (n <= 0 || (p.revents & POLLIN) == 0) continue;
    char c = 0;
    if (::read(STDIN_FILENO, &c, 1) == 1 && (c == 'q' || c == 'Q')) return true;
  }
}

std::string header(std::size_t domains) {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  ::localtime_r(&t, &tm);
  char clock[16];
  std::strftime(clock, sizeof(clock), "%H:%M:%S", &tm);
  return std::string("qbrokerctl top  ") + clock + "  " + std::to_string(domains) +
         " domain(s)  (q or Ctrl-C quits)\n\n";
}

}  // namespace

std::string top_table(const json::value& body, const CpuTimes& before,
                      std::chrono::microseconds elapsed, CpuTimes& now) {
  std::vector<std::vector<std::string>> rows{
      {"NAME", "STATE", "UID", "CPU", "MEMORY", "JOB", "PROGRESS"}};
  const auto& list = member(body, "domains");
  if (list.is_array()) {
    for (const auto& d : list.get_array()) {
      const std::string name = str(member(d, "name"));
      const auto& usage = member(d, "usage");
      std::string cpu = "-", memory = "-";
      if (usage.is_object()) {
        auto used = number(member(usage, "cpu_us"));
        now[name] = used;
        cpu = cpu_percent(used, name, before, elapsed);
        memory = mib(number(member(usage, "memory_bytes")));
      }
      rows.push_back({name, str(member(d, "state")), str(member(d, "uid")), cpu, memory,
                      str(member(d, "job")), progress(d)});
    }
  }
  if (rows.size() == 1) return "no domains\n";
  return table(rows);
}

int top(const GlobalOptions& g, const Invocation& inv) {
  catch_interrupt();
  KeyMode keys;
  const bool screen = ::isatty(STDOUT_FILENO) == 1;
  const auto interval = std::chrono::milliseconds(static_cast<long long>(inv.interval_s * 1000));
  const auto timeout = std::chrono::milliseconds(static_cast<long long>(g.timeout_s * 1000));
  CpuTimes before;
  auto last = Clock::now();
  for (long shown = 0; inv.events_count < 0 || shown < inv.events_count; ++shown) {
    auto result = call(g.socket, Request{inv.method, inv.target, std::nullopt}, timeout);
    if (auto* e = std::get_if<TransportError>(&result)) {
      std::cerr << "qbrokerctl: " << e->message << "\n";
      return e->connect_failed ? 8 : 1;
    }
    const auto& r = std::get<Response>(result);
    std::error_code ec;
    auto body = json::parse(r.body, ec);
    if (r.status >= 300 || ec) {
      std::cerr << render_error(r.status, body);
      return exit_code(r.status >= 300 ? r.status : 500);
    }
    const auto at = Clock::now();
    CpuTimes now;
    std::string text = top_table(body, before, std::chrono::duration_cast<std::chrono::microseconds>(at - last), now);
    const auto& list = member(body, "domains");
    std::string frame = (screen ? "\x1b[H\x1b[2J" : "") +
                        header(list.is_array() ? list.get_array().size() : 0) + text +
                        (screen ? "" : "\n");
    std::fwrite(frame.data(), 1, frame.size(), stdout);
    std::fflush(stdout);
    before = std::move(now);
    last = at;
    if (inv.events_count >= 0 && shown + 1 >= inv.events_count) break;
    if (wait_for_quit(interval, keys.active())) break;
  }
  return 0;
}

}  // namespace qbctl
