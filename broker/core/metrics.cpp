#include "broker/core/metrics.hpp"

#include <dirent.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <fstream>

namespace broker::metrics {
namespace {

constexpr auto kRelaxed = std::memory_order_relaxed;

std::size_t kind_index(std::string_view kind) {
  auto it = std::find(kJobKinds.begin(), kJobKinds.end(), kind);
  return it == kJobKinds.end() ? kJobKinds.size() - 1 : static_cast<std::size_t>(it - kJobKinds.begin());
}

void append_number(std::string& out, double v) {
  char buf[32];
  // %g style ("0.0005", not "5e-04"), as Prometheus writes its own bucket bounds.
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::general);
  out.append(buf, ec == std::errc{} ? end : buf);
}

void append_number(std::string& out, std::uint64_t v) {
  char buf[24];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  out.append(buf, ec == std::errc{} ? end : buf);
}

void append_number(std::string& out, std::int64_t v) {
  char buf[24];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  out.append(buf, ec == std::errc{} ? end : buf);
}

// A label value as the format escapes it: backslash, double quote and newline.
void append_escaped(std::string& out, std::string_view v) {
  for (char c : v) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
}

void header(std::string& out, std::string_view name, std::string_view type, std::string_view help) {
  out.append("# HELP ").append(name).append(" ").append(help).append("\n");
  out.append("# TYPE ").append(name).append(" ").append(type).append("\n");
}

// `labels` is the inside of the braces, already escaped ("" for none).
template <class T>
void sample(std::string& out, std::string_view name, std::string_view labels, T value) {
  out.append(name);
  if (!labels.empty()) out.append("{").append(labels).append("}");
  out += ' ';
  append_number(out, value);
  out += '\n';
}

void render_histogram(std::string& out, std::string_view name, std::string_view labels,
                      const Histogram& h) {
  auto counts = h.buckets();
  std::uint64_t cumulative = 0;
  std::string bucket(name);
  bucket += "_bucket";
  for (std::size_t i = 0; i <= Histogram::kBounds.size(); ++i) {
    cumulative += counts[i];
    std::string l(labels);
    if (!l.empty()) l += ',';
    l += "le=\"";
    if (i < Histogram::kBounds.size()) append_number(l, Histogram::kBounds[i]);
    else l += "+Inf";
    l += '"';
    sample(out, bucket, l, cumulative);
  }
  sample(out, std::string(name) + "_sum", labels, static_cast<double>(h.sum_us()) / 1e6);
  sample(out, std::string(name) + "_count", labels, cumulative);
}

}  // namespace

void Histogram::observe(std::chrono::microseconds d) {
  const double seconds = static_cast<double>(d.count()) / 1e6;
  auto it = std::lower_bound(kBounds.begin(), kBounds.end(), seconds);
  buckets_[static_cast<std::size_t>(it - kBounds.begin())].fetch_add(1, kRelaxed);
  sum_us_.fetch_add(static_cast<std::uint64_t>(std::max<std::int64_t>(d.count(), 0)), kRelaxed);
}

std::array<std::uint64_t, Histogram::kBounds.size() + 1> Histogram::buckets() const {
  std::array<std::uint64_t, kBounds.size() + 1> out{};
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = buckets_[i].load(kRelaxed);
  return out;
}

std::optional<Flow> flow_of(std::string_view kind) {
  if (kind == "cdrom-insert") return Flow::insert;
  if (kind == "disk-add" || kind == "nic-add") return Flow::attach;
  if (kind == "disk-remove" || kind == "nic-remove") return Flow::detach;
  if (kind == "create") return Flow::create;
  if (kind == "destroy") return Flow::destroy;
  return std::nullopt;
}

void Registry::job_done(std::string_view kind, JobOutcome outcome, std::chrono::microseconds took) {
  jobs_[kind_index(kind)][static_cast<std::size_t>(outcome)].inc();
  if (auto f = flow_of(kind)) flows_[static_cast<std::size_t>(*f)].observe(took);
}

void Registry::api_request(std::size_t route, unsigned status, std::chrono::microseconds took) {
  route = std::min(route, kUnrouted);
  if (status >= kMinStatus && status < kMinStatus + kStatuses) requests_[route][status - kMinStatus].inc();
  request_latency_.observe(took);
}

void Registry::kill_report(std::uint64_t survivors, std::uint64_t rounds,
                           std::chrono::microseconds took) {
  kills_.inc();
  kill_survivors_.inc(survivors);
  kill_rounds_.inc(rounds);
  kill_duration_.observe(took);
}

std::uint64_t Registry::jobs(std::string_view kind, JobOutcome outcome) const {
  return jobs_[kind_index(kind)][static_cast<std::size_t>(outcome)].value();
}

std::uint64_t Registry::requests(std::size_t route, unsigned status) const {
  if (status < kMinStatus || status >= kMinStatus + kStatuses) return 0;
  return requests_[std::min(route, kUnrouted)][status - kMinStatus].value();
}

void Registry::render_jobs(std::string& out) const {
  header(out, "qbroker_jobs_total", "counter", "Jobs finished, by kind and outcome.");
  for (std::size_t k = 0; k < kJobKinds.size(); ++k) {
    for (std::size_t o = 0; o < kOutcomeNames.size(); ++o) {
      std::string l = "kind=\"";
      l.append(kJobKinds[k]).append("\",outcome=\"").append(kOutcomeNames[o]).append("\"");
      sample(out, "qbroker_jobs_total", l, jobs_[k][o].value());
    }
  }
  header(out, "qbroker_flow_duration_seconds", "histogram",
         "Latency of the insert, attach, detach, create and destroy flows.");
  for (std::size_t f = 0; f < kFlowNames.size(); ++f) {
    render_histogram(out, "qbroker_flow_duration_seconds",
                     "flow=\"" + std::string(kFlowNames[f]) + "\"", flows_[f]);
  }
  header(out, "qbroker_qmp_round_trip_seconds", "histogram",
         "From a QMP command sent to its reply, for the broker's own commands.");
  render_histogram(out, "qbroker_qmp_round_trip_seconds", "", qmp_);
}

void Registry::render_requests(std::string& out, const Live& live) const {
  header(out, "qbroker_api_requests_total", "counter", "API requests answered, by route and status.");
  for (std::size_t r = 0; r < kMaxRoutes; ++r) {
    std::string_view method = "none";
    std::string_view path = "none";
    if (r != kUnrouted) {
      if (r >= live.routes.size()) continue;
      method = live.routes[r].first;
      path = live.routes[r].second;
    }
    for (unsigned s = 0; s < kStatuses; ++s) {
      auto n = requests_[r][s].value();
      if (n == 0) continue;
      std::string l = "method=\"";
      append_escaped(l, method);
      l += "\",route=\"";
      append_escaped(l, path);
      l += "\",code=\"" + std::to_string(s + kMinStatus) + "\"";
      sample(out, "qbroker_api_requests_total", l, n);
    }
  }
  header(out, "qbroker_api_request_duration_seconds", "histogram",
         "From a request read to its response rendered.");
  render_histogram(out, "qbroker_api_request_duration_seconds", "", request_latency_);
}

void Registry::render_kills(std::string& out) const {
  header(out, "qbroker_kills_total", "counter", "Kills by uid of a domain's processes.");
  sample(out, "qbroker_kills_total", "", kills_.value());
  header(out, "qbroker_kill_survivors_total", "counter",
         "Processes still alive after a kill by uid gave up.");
  sample(out, "qbroker_kill_survivors_total", "", kill_survivors_.value());
  header(out, "qbroker_kill_rounds_total", "counter", "Signal rounds the kills by uid took.");
  sample(out, "qbroker_kill_rounds_total", "", kill_rounds_.value());
  header(out, "qbroker_kill_duration_seconds", "histogram", "Duration of a kill by uid.");
  render_histogram(out, "qbroker_kill_duration_seconds", "", kill_duration_);
}

void Registry::render_connections(std::string& out) const {
  header(out, "qbroker_api_connections_open", "gauge", "API connections being served.");
  sample(out, "qbroker_api_connections_open", "", connections_open.value());
  header(out, "qbroker_api_connections_accepted_total", "counter", "API connections accepted.");
  sample(out, "qbroker_api_connections_accepted_total", "", connections_accepted.value());
  header(out, "qbroker_api_connections_refused_total", "counter",
         "API connections refused: the peer may not use the API, or too many are open.");
  sample(out, "qbroker_api_connections_refused_total", "reason=\"unauthorized\"",
         connections_refused_unauthorized.value());
  sample(out, "qbroker_api_connections_refused_total", "reason=\"busy\"",
         connections_refused_busy.value());
}

std::string Registry::render(const Live& live) const {
  std::string out;
  out.reserve(16 * 1024);
  header(out, "qbroker_domains", "gauge", "Domains in the table, by state.");
  for (const auto& [state, n] : live.domains_by_state) {
    std::string l = "state=\"";
    append_escaped(l, state);
    l += '"';
    sample(out, "qbroker_domains", l, static_cast<std::uint64_t>(n));
  }
  render_jobs(out);
  render_requests(out, live);
  render_connections(out);
  render_kills(out);
  header(out, "qbroker_uid_pool_size", "gauge", "Uids that can run a QEMU.");
  sample(out, "qbroker_uid_pool_size", "", uid_pool_size.value());
  header(out, "qbroker_uid_pool_in_use", "gauge", "Uids held by a domain or a pooled QEMU.");
  sample(out, "qbroker_uid_pool_in_use", "", static_cast<std::uint64_t>(live.uids_in_use));
  header(out, "qbroker_pool_ready", "gauge", "Warm-pool QEMUs spawned and waiting for a create.");
  sample(out, "qbroker_pool_ready", "", static_cast<std::uint64_t>(live.pool_ready));
  if (live.proc_self.empty()) return out;
  header(out, "process_resident_memory_bytes", "gauge", "Resident memory of qbrokerd.");
  sample(out, "process_resident_memory_bytes", "", resident_bytes(live.proc_self));
  header(out, "process_open_fds", "gauge", "Open file descriptors of qbrokerd.");
  sample(out, "process_open_fds", "", open_fds(live.proc_self));
  return out;
}

std::int64_t resident_bytes(const std::string& proc_self) {
  std::ifstream in(proc_self + "/statm");
  std::int64_t size = 0, resident = 0;
  if (!(in >> size >> resident)) return -1;
  return resident * ::sysconf(_SC_PAGESIZE);
}

std::int64_t open_fds(const std::string& proc_self) {
  DIR* dir = ::opendir((proc_self + "/fd").c_str());
  if (dir == nullptr) return -1;
  std::int64_t n = 0;
  while (const dirent* e = ::readdir(dir)) {
    if (e->d_name[0] != '.') ++n;
  }
  ::closedir(dir);
  return n - 1;  // the directory being read is not one of the daemon's own
}

}  // namespace broker::metrics
