// Observability of qbrokerd as a program: GET /metrics after real flows against a real QEMU,
// checked by promtool and by the values that must have moved; and its JSON log, one record per
// line, one record per request.
#include <signal.h>

#include <boost/json.hpp>
#include <cstdio>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>

#include "broker/daemon/options.hpp"
#include "daemon_support.hpp"
#include "http_client.hpp"
#include "support/qemu.hpp"
#include "support/support.hpp"

using namespace std::chrono_literals;
namespace http = qbtest::http;
namespace json = boost::json;
using namespace qbtest::daemon;

namespace {

constexpr uid_t kMetrics = 3'110'000;

// Sample lines of an exposition text by series ("name{labels}").
std::map<std::string, double> samples(const std::string& text) {
  std::map<std::string, double> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    auto space = line.rfind(' ');
    out[line.substr(0, space)] = std::stod(line.substr(space + 1));
  }
  return out;
}

// `promtool check metrics` on `text`: its exit status and what it said.
std::pair<int, std::string> promtool(const qbtest::TempDir& dir, const std::string& text) {
  const std::string file = dir / "metrics.txt";
  qbtest::write_file(file, text);
  std::string said;
  FILE* p = ::popen(("promtool check metrics < " + file + " 2>&1").c_str(), "r");
  if (p == nullptr) return {-1, "cannot run promtool"};
  char buf[512];
  while (std::fgets(buf, sizeof(buf), p) != nullptr) said += buf;
  int status = ::pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, said};
}

struct Scrape {
  std::string text;
  std::map<std::string, double> values;
};

Scrape scrape(const std::string& sock) {
  auto r = http::call(sock, "GET", "/metrics");
  REQUIRE(r);
  REQUIRE(r->status == 200);
  CHECK(r->header("Content-Type") == "text/plain; version=0.0.4; charset=utf-8");
  return {r->body, samples(r->body)};
}

double delta(const Scrape& before, const Scrape& after, const std::string& series) {
  auto at = [&](const Scrape& s) {
    auto it = s.values.find(series);
    return it == s.values.end() ? 0.0 : it->second;
  };
  INFO(series);
  CHECK(after.values.contains(series));
  return at(after) - at(before);
}

}  // namespace

TEST_CASE("the log format is text, json or journal; unset, the daemon looks at JOURNAL_STREAM",
          "[api][daemon][options][log]") {
  auto parse = [](std::vector<std::string_view> args) { return broker::daemon::parse_config(args); };
  CHECK_FALSE(parse({})->log_format.has_value());
  CHECK(parse({"--log-format", "json"})->log_format == broker::log::Format::json);
  CHECK(parse({"--log-format=journal"})->log_format == broker::log::Format::journal);
  CHECK(parse({"--log-format", "text"})->log_format == broker::log::Format::text);
  CHECK(parse({"--log-format", "xml"}).error().field == "--log-format");
}

TEST_CASE("GET /metrics passes promtool and moves with a create, an attach, a pause and a destroy; each "
          "request is logged once as JSON",
          "[api][metrics][log][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  INFO("promtool is missing: scripts/setup.sh installs Debian's prometheus package");
  REQUIRE(std::system("command -v promtool >/dev/null") == 0);
  qbtest::TempDir dir;
  const std::string sock = dir / "qbroker.sock";
  const std::string name = "metrics" + std::to_string(::getpid());
  const std::string images = dir / "images";
  std::filesystem::create_directory(images);
  qbtest::write_file(images + "/d0.img", "");
  std::filesystem::resize_file(images + "/d0.img", 1 << 20);
  auto args = daemon_args(dir, kMetrics);
  args.insert(args.end(), {"--socket", sock, "--log-format", "json", "--image-root", images});
  Child d{spawn(args, dir / "log")};
  REQUIRE(wait_for_socket(sock, 20s));

  auto before = scrape(sock);
  auto [status, said] = promtool(dir, before.text);
  INFO(said);
  CHECK(status == 0);

  auto created = http::call(sock, "POST", "/v1/domains",
                            R"({"name":")" + name + R"(","memory_mib":128,"pci_slots":2,"kernel":")" +
                                qbtest::guest_kernel() + R"(","initrd":")" +
                                qbtest::guest_initrd() + R"("})",
                            60s);
  REQUIRE(created);
  INFO(created->body);
  REQUIRE(created->status == 201);
  auto attached = http::call(sock, "POST", "/v1/domains/" + name + "/disks",
                             R"({"id":"d0","path":")" + images + R"(/d0.img","bus":"scsi"})", 30s);
  REQUIRE(attached);
  INFO(attached->body);
  CHECK(attached->status == 201);
  auto paused = http::call(sock, "POST", "/v1/domains/" + name + "/pause", {}, 30s);
  REQUIRE(paused);
  CHECK(paused->status == 200);

  // The domain's cgroup usage, in its own answer and in the list when asked for.
  auto shown = http::call(sock, "GET", "/v1/domains/" + name);
  REQUIRE(shown);
  INFO(shown->body);
  CHECK(shown->json.at("usage").at("cpu_us").to_number<double>() > 0);
  CHECK(shown->json.at("usage").at("memory_bytes").to_number<double>() > 0);
  auto listed = http::call(sock, "GET", "/v1/domains?usage=true");
  REQUIRE(listed);
  CHECK(listed->json.at("domains").at(0).as_object().contains("usage"));
  auto plain = http::call(sock, "GET", "/v1/domains");
  REQUIRE(plain);
  CHECK_FALSE(plain->json.at("domains").at(0).as_object().contains("usage"));

  // A request refused before it is routed (HTTP/1.1 without Host) counts under route "none".
  auto raw = http::connect(sock);
  REQUIRE(http::send_all(raw.get(), "GET /v1/version HTTP/1.1\r\n\r\n"));
  auto refused = http::read_reply(raw.get());
  REQUIRE(refused);
  CHECK(refused->status == 400);

  auto running = scrape(sock);
  std::tie(status, said) = promtool(dir, running.text);
  INFO(said);
  CHECK(status == 0);
  CHECK(delta(before, running, R"(qbroker_jobs_total{kind="create",outcome="ok"})") == 1);
  CHECK(delta(before, running, R"(qbroker_flow_duration_seconds_count{flow="create"})") == 1);
  CHECK(delta(before, running, R"(qbroker_jobs_total{kind="pause",outcome="ok"})") == 1);
  CHECK(delta(before, running, R"(qbroker_jobs_total{kind="disk-add",outcome="ok"})") == 1);
  CHECK(delta(before, running, R"(qbroker_flow_duration_seconds_count{flow="attach"})") == 1);
  CHECK(delta(before, running, "qbroker_qmp_round_trip_seconds_count") >= 1);  // the stop
  CHECK(delta(before, running,
              R"(qbroker_api_requests_total{method="POST",route="/v1/domains",code="201"})") == 1);
  CHECK(delta(before, running,
              R"(qbroker_api_requests_total{method="GET",route="/metrics",code="200"})") == 1);
  CHECK(delta(before, running,
              R"(qbroker_api_requests_total{method="none",route="none",code="400"})") == 1);
  CHECK(running.values[R"(qbroker_domains{state="paused"})"] == 1);
  CHECK(running.values["qbroker_uid_pool_in_use"] == 1);
  CHECK(running.values["qbroker_uid_pool_size"] == 7);
  CHECK(running.values["qbroker_api_connections_open"] >= 1);  // this scrape's own
  CHECK(running.values["process_resident_memory_bytes"] > 0);
  CHECK(running.values["process_open_fds"] > 0);

  auto missing = http::call(sock, "GET", "/v1/domains/nosuch" + name);
  REQUIRE(missing);
  CHECK(missing->status == 404);
  auto destroyed = http::call(sock, "DELETE", "/v1/domains/" + name, {}, 30s);
  REQUIRE(destroyed);
  CHECK(destroyed->status == 200);
  auto after = scrape(sock);
  CHECK(delta(running, after, R"(qbroker_jobs_total{kind="destroy",outcome="ok"})") == 1);
  CHECK(delta(running, after, R"(qbroker_flow_duration_seconds_count{flow="destroy"})") == 1);
  CHECK(delta(running, after, "qbroker_kills_total") == 1);
  CHECK(delta(running, after, "qbroker_kill_duration_seconds_count") == 1);
  CHECK(after.values["qbroker_kill_survivors_total"] == 0);
  CHECK(after.values[R"(qbroker_domains{state="paused"})"] == 0);
  CHECK(after.values["qbroker_uid_pool_in_use"] == 0);

  ::kill(d.pid, SIGTERM);
  CHECK(d.wait(10s) == 0);
  remove_cgroup_base(kMetrics);

  // Every line of the log is one JSON object; each request above is exactly one of them.
  std::map<std::string, int> requests;  // "METHOD ROUTE STATUS" -> records
  int refusals = 0;                     // requests refused before routing
  std::istringstream log(slurp(dir / "log"));
  for (std::string line; std::getline(log, line);) {
    INFO(line);
    boost::system::error_code ec;
    auto v = json::parse(line, ec);
    REQUIRE_FALSE(ec);
    REQUIRE(v.is_object());
    const auto& o = v.as_object();
    CHECK(o.contains("ts"));
    CHECK(o.contains("level"));
    CHECK(o.contains("msg"));
    if (o.contains("code") && o.at("code") == "bad_request" && !o.contains("route")) ++refusals;
    if (!o.contains("route")) continue;
    CHECK(o.at("level") == "info");
    CHECK(o.at("uid") == "0");
    CHECK(std::stoll(std::string(o.at("duration_us").as_string())) >= 0);
    const std::string route(o.at("route").as_string());
    if (route.starts_with("/v1/domains/{name}")) {
      CHECK(o.at("domain").as_string().ends_with(name));  // nosuchNAME too
    }
    if (o.at("status") == "404") CHECK(o.at("code") == "not_found");
    if (o.at("status") == "201") CHECK(std::string(o.at("domain").as_string()) == name);  // named in the answer
    ++requests[std::string(o.at("method").as_string()) + " " +
               std::string(o.at("route").as_string()) + " " +
               std::string(o.at("status").as_string())];
  }
  CHECK(requests["POST /v1/domains 201"] == 1);
  CHECK(requests["POST /v1/domains/{name}/pause 200"] == 1);
  CHECK(requests["POST /v1/domains/{name}/disks 201"] == 1);
  CHECK(requests["DELETE /v1/domains/{name} 200"] == 1);
  CHECK(requests["GET /v1/domains/{name} 404"] == 1);
  CHECK(requests["GET /metrics 200"] == 3);
  CHECK(refusals == 1);
}
