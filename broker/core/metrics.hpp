// The broker's metrics: counters and latency histograms that the layers above record into, and
// their rendering in the Prometheus text exposition format (version 0.0.4) for GET /metrics.
//
// Recording is one relaxed atomic add into a cell that exists from construction: every family's
// label values are fixed (job kinds, flow kinds, route indexes, status codes), so the hot path
// takes no lock, allocates nothing and looks nothing up by name. What is a state rather than an
// event (domains by state, uid pool usage, RSS, open fds) is not recorded at all: the caller of
// render() reads it when asked, from the table it already keeps.
//
// Threads: recording is safe from any thread; render() reads each cell once, so a scrape taken
// while a request is recorded may see the request counted but its histogram not yet (Prometheus
// tolerates that skew between series).
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace broker::metrics {

class Counter {
 public:
  void inc(std::uint64_t n = 1) { value_.fetch_add(n, std::memory_order_relaxed); }
  std::uint64_t value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<std::uint64_t> value_{0};
};

class Gauge {
 public:
  void add(std::int64_t n) { value_.fetch_add(n, std::memory_order_relaxed); }
  void set(std::int64_t n) { value_.store(n, std::memory_order_relaxed); }
  std::int64_t value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<std::int64_t> value_{0};
};

// A latency histogram with fixed buckets, from half a millisecond (a QMP query) to a minute (a
// create that boots firmware, a save).
class Histogram {
 public:
  static constexpr std::array<double, 14> kBounds{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                  0.1,    0.25,  0.5,    1,     2.5,  10,    60};
  void observe(std::chrono::microseconds d);
  // Observations per bucket (not cumulative; the last is above every bound), and their sum.
  std::array<std::uint64_t, kBounds.size() + 1> buckets() const;
  std::uint64_t sum_us() const { return sum_us_.load(std::memory_order_relaxed); }

 private:
  std::array<std::atomic<std::uint64_t>, kBounds.size() + 1> buckets_{};
  std::atomic<std::uint64_t> sum_us_{0};
};

// The flows whose latency is watched, as the issue names them.
enum class Flow { insert, attach, detach, create, destroy };
inline constexpr std::array<std::string_view, 5> kFlowNames{"insert", "attach", "detach", "create",
                                                            "destroy"};

enum class JobOutcome { ok, failed, cancelled };
inline constexpr std::array<std::string_view, 3> kOutcomeNames{"ok", "failed", "cancelled"};

// The job kinds a domain's job slot runs (Domain::begin_job, and destroy, which takes no slot);
// any other is counted as "other".
inline constexpr std::array<std::string_view, 20> kJobKinds{
    "create",     "destroy",     "restore",     "save",    "live-update", "migrate",
    "incoming",   "pause",       "resume",      "shutdown", "reset",      "cdrom-insert",
    "cdrom-eject", "disk-add",   "disk-remove", "nic-add", "nic-remove",  "vnc-set",
    "vnc-remove", "other"};

// The flow a job kind is an instance of, if any.
std::optional<Flow> flow_of(std::string_view job_kind);

// What render() reads at the time of the scrape rather than from counters.
struct Live {
  std::vector<std::pair<std::string_view, std::size_t>> domains_by_state;
  std::size_t uids_in_use = 0;
  std::size_t pool_ready = 0;  // warm-pool QEMUs spawned and waiting (docs/pool.md)
  // "METHOD PATH" of each route, by route index, for the API request labels.
  std::span<const std::pair<std::string_view, std::string_view>> routes;
  // /proc of the daemon itself, for its RSS and open fds; empty: not reported.
  std::string proc_self = "/proc/self";
};

class Registry {
 public:
  static constexpr std::size_t kMaxRoutes = 48;  // the last index counts requests no route took
  static constexpr std::size_t kUnrouted = kMaxRoutes - 1;

  void job_done(std::string_view kind, JobOutcome outcome, std::chrono::microseconds took);
  void qmp_round_trip(std::chrono::microseconds took) { qmp_.observe(took); }
  void api_request(std::size_t route, unsigned status, std::chrono::microseconds took);
  void kill_report(std::uint64_t survivors, std::uint64_t rounds, std::chrono::microseconds took);

  Gauge connections_open;
  Counter connections_accepted;
  Counter connections_refused_unauthorized;
  Counter connections_refused_busy;
  Gauge uid_pool_size;  // uids that can run a QEMU, set once by the daemon

  // The exposition text, counters and the live values together.
  std::string render(const Live& live) const;

  // Read back, for tests.
  const Histogram& flow(Flow f) const { return flows_[static_cast<std::size_t>(f)]; }
  std::uint64_t jobs(std::string_view kind, JobOutcome outcome) const;
  std::uint64_t requests(std::size_t route, unsigned status) const;

 private:
  static constexpr unsigned kMinStatus = 100;
  static constexpr unsigned kStatuses = 500;  // 100 ... 599
  void render_jobs(std::string& out) const;
  void render_requests(std::string& out, const Live& live) const;
  void render_kills(std::string& out) const;
  void render_connections(std::string& out) const;

  std::array<std::array<Counter, kOutcomeNames.size()>, kJobKinds.size()> jobs_{};
  std::array<Histogram, kFlowNames.size()> flows_{};
  Histogram qmp_;
  std::array<std::array<Counter, kStatuses>, kMaxRoutes> requests_{};
  Histogram request_latency_;
  Counter kills_;
  Counter kill_survivors_;
  Counter kill_rounds_;
  Histogram kill_duration_;
};

// The process's resident set in bytes and its open fds, from `proc_self` (-1 when unreadable).
std::int64_t resident_bytes(const std::string& proc_self);
std::int64_t open_fds(const std::string& proc_self);

}  // namespace broker::metrics
