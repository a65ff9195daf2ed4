// broker/core/metrics: counters land in the cell of their labels, histograms are cumulative in
// the text, and the text follows the exposition format line by line.
#include "broker/core/metrics.hpp"

#include <catch2/catch.hpp>

#include <sstream>
#include <string>

using namespace std::chrono_literals;
using broker::metrics::Flow;
using broker::metrics::JobOutcome;
using broker::metrics::Registry;

namespace {

// The value of the sample line `series` ("name{labels}"), or -1 when the text has none.
double sample(const std::string& text, const std::string& series) {
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(series + " ", 0) == 0) return std::stod(line.substr(series.size() + 1));
  }
  return -1;
}

broker::metrics::Live live_without_proc() {
  broker::metrics::Live live;
  live.proc_self.clear();
  return live;
}

}  // namespace

TEST_CASE("a histogram counts each observation in the first bucket that holds it", "[metrics]") {
  broker::metrics::Histogram h;
  h.observe(400us);   // <= 0.0005
  h.observe(500us);   // == 0.0005: bounds are inclusive (le)
  h.observe(700us);   // <= 0.001
  h.observe(90s);     // above every bound
  auto b = h.buckets();
  CHECK(b[0] == 2);
  CHECK(b[1] == 1);
  CHECK(b.back() == 1);
  CHECK(h.sum_us() == 400 + 500 + 700 + 90'000'000);
}

TEST_CASE("jobs count by kind and outcome, and the watched flows time them", "[metrics]") {
  Registry m;
  m.job_done("disk-add", JobOutcome::ok, 3ms);
  m.job_done("nic-add", JobOutcome::failed, 3ms);
  m.job_done("save", JobOutcome::cancelled, 3ms);
  m.job_done("something-new", JobOutcome::ok, 3ms);
  CHECK(m.jobs("disk-add", JobOutcome::ok) == 1);
  CHECK(m.jobs("nic-add", JobOutcome::failed) == 1);
  CHECK(m.jobs("save", JobOutcome::cancelled) == 1);
  CHECK(m.jobs("other", JobOutcome::ok) == 1);
  auto attach = m.flow(Flow::attach).buckets();
  std::uint64_t total = 0;
  for (auto n : attach) total += n;
  CHECK(total == 2);  // disk-add and nic-add are both attaches
  CHECK(m.flow(Flow::detach).sum_us() == 0);
}

TEST_CASE("the text is the exposition format: HELP and TYPE, cumulative buckets, labels",
          "[metrics]") {
  Registry m;
  m.job_done("create", JobOutcome::ok, 200ms);
  m.job_done("create", JobOutcome::ok, 2s);
  m.api_request(1, 201, 3ms);
  m.api_request(Registry::kUnrouted, 404, 1ms);
  m.kill_report(2, 3, 40ms);
  m.connections_open.add(2);
  m.connections_open.add(-1);
  const std::pair<std::string_view, std::string_view> routes[] = {
      {"GET", "/v1/version"}, {"POST", "/v1/domains"}};
  auto live = live_without_proc();
  live.routes = routes;
  live.domains_by_state = {{"running", 3}, {"paused", 1}};
  live.uids_in_use = 4;
  live.pool_ready = 2;
  auto text = m.render(live);
  INFO(text);
  CHECK(text.find("# TYPE qbroker_flow_duration_seconds histogram\n") != std::string::npos);
  CHECK(text.find("# HELP qbroker_jobs_total ") != std::string::npos);
  CHECK(sample(text, R"(qbroker_domains{state="running"})") == 3);
  CHECK(sample(text, R"(qbroker_jobs_total{kind="create",outcome="ok"})") == 2);
  CHECK(sample(text, R"(qbroker_flow_duration_seconds_bucket{flow="create",le="0.25"})") == 1);
  CHECK(sample(text, R"(qbroker_flow_duration_seconds_bucket{flow="create",le="2.5"})") == 2);
  CHECK(sample(text, R"(qbroker_flow_duration_seconds_bucket{flow="create",le="+Inf"})") == 2);
  CHECK(sample(text, R"(qbroker_flow_duration_seconds_count{flow="create"})") == 2);
  CHECK(sample(text, R"(qbroker_flow_duration_seconds_sum{flow="create"})") == Approx(2.2));
  CHECK(sample(text, R"(qbroker_flow_duration_seconds_bucket{flow="create",le="0.0005"})") == 0);
  CHECK(sample(text, R"(qbroker_api_requests_total{method="POST",route="/v1/domains",code="201"})") == 1);
  CHECK(sample(text, R"(qbroker_api_requests_total{method="none",route="none",code="404"})") == 1);
  CHECK(sample(text, "qbroker_kill_survivors_total") == 2);
  CHECK(sample(text, "qbroker_kill_rounds_total") == 3);
  CHECK(sample(text, "qbroker_api_connections_open") == 1);
  CHECK(sample(text, "qbroker_uid_pool_in_use") == 4);
  CHECK(sample(text, "qbroker_pool_ready") == 2);
  CHECK(text.find("process_open_fds") == std::string::npos);  // no /proc asked for
  CHECK(text.back() == '\n');
}

TEST_CASE("the daemon's RSS and fds come from its /proc", "[metrics]") {
  CHECK(broker::metrics::resident_bytes("/proc/self") > 0);
  CHECK(broker::metrics::open_fds("/proc/self") >= 3);
  CHECK(broker::metrics::open_fds("/nonexistent") == -1);
}
