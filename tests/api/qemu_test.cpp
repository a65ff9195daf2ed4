// The API in front of real QEMUs (tiny ones: machine none, 16 MiB): the whole walk over HTTP, a
// QEMU stopped with SIGSTOP that must not slow anything else, and conflicting requests.
#include <signal.h>

#include <boost/json.hpp>

#include "api_fixture.hpp"
#include "broker/lifecycle/proc.hpp"
#include "http_client.hpp"

using namespace std::chrono_literals;
namespace http = qbtest::http;
namespace json = boost::json;
using Clock = std::chrono::steady_clock;

namespace {
constexpr uid_t kWalk = 3'104'000;
constexpr uid_t kStopped = 3'104'100;
constexpr uid_t kConflict = 3'104'200;

double ms_since(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

std::string tiny(const std::string& name) {
  return R"({"name":")" + name + R"(","machine":"none","memory_mib":16,"pci_slots":0})";
}

// Sends a request on a fresh connection without waiting for the answer.
fdpass::UniqueFd send_only(const std::string& socket, const std::string& method,
                           const std::string& target, const std::string& body = {}) {
  auto fd = http::connect(socket);
  REQUIRE(fd);
  REQUIRE(http::send_all(fd.get(), http::request_text(method, target, body, false)));
  return fd;
}

}  // namespace

TEST_CASE("a domain's whole life over HTTP", "[api][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::ApiFixture fx(kWalk);
  http::EventReader events(fx.socket, "/v1/events?domain=api-walk");
  REQUIRE(events.ok());

  auto created = http::call(fx.socket, "POST", "/v1/domains", tiny("api-walk"), 60s);
  REQUIRE(created);
  REQUIRE(created->status == 201);
  CHECK(created->header("Location") == "/v1/domains/api-walk");
  CHECK(created->json.at("uid") == kWalk + 1);
  CHECK(created->json.at("job").is_null());  // the create job is over when the answer comes
  pid_t pid = static_cast<pid_t>(created->json.at("pid").to_number<int>());

  auto again = http::call(fx.socket, "POST", "/v1/domains", tiny("api-walk"), 60s);
  REQUIRE(again);
  CHECK(again->status == 409);
  CHECK(again->error_code() == "already_exists");

  auto got = http::call(fx.socket, "GET", "/v1/domains/api-walk");
  REQUIRE(got);
  CHECK(got->status == 200);
  CHECK(got->json.at("qemu_status") == "running");
  auto list = http::call(fx.socket, "GET", "/v1/domains");
  REQUIRE(list);
  CHECK(list->json.at("domains").as_array().size() == 1);

  auto paused = http::call(fx.socket, "POST", "/v1/domains/api-walk/pause");
  REQUIRE(paused);
  CHECK(paused->status == 200);
  CHECK(paused->json.at("state") == "paused");
  auto twice = http::call(fx.socket, "POST", "/v1/domains/api-walk/pause");
  REQUIRE(twice);
  CHECK(twice->status == 409);
  CHECK(twice->error_code() == "wrong_state");
  CHECK(http::call(fx.socket, "POST", "/v1/domains/api-walk/resume")->status == 200);

  auto q =
      http::call(fx.socket, "POST", "/v1/domains/api-walk/qmp", R"({"execute":"query-status"})");
  REQUIRE(q);
  CHECK(q->status == 200);
  CHECK(q->json.at("return").at("status") == "running");
  auto fd_cmd = http::call(fx.socket, "POST", "/v1/domains/api-walk/qmp",
                           R"({"execute":"getfd","arguments":{"fdname":"x"}})");
  REQUIRE(fd_cmd);
  CHECK(fd_cmd->status == 403);
  CHECK(fd_cmd->error_code() == "forbidden");
  auto unknown =
      http::call(fx.socket, "POST", "/v1/domains/api-walk/qmp", R"({"execute":"no-such-command"})");
  REQUIRE(unknown);
  CHECK(unknown->status == 502);
  CHECK(unknown->json.at("error").at("qmp").at("class") == "CommandNotFound");
  // The command is named once (QEMU's desc names it), the class only in the qmp member.
  std::string message(unknown->json.at("error").at("message").as_string());
  INFO(message);
  CHECK(message.find("no-such-command") == message.rfind("no-such-command"));
  CHECK(message.find("CommandNotFound") == std::string::npos);

  auto version = http::call(fx.socket, "GET", "/v1/version");
  REQUIRE(version);
  CHECK(version->json.at("qemu").at("version").is_string());
  CHECK(version->json.at("qemu").at("capabilities").at("commands").to_number<int>() > 100);

  // A migration names the other broker by its socket's absolute path; anything else is refused
  // naming the field, and the domain runs on.
  auto migrate = http::call(fx.socket, "POST", "/v1/domains/api-walk/migrate",
                            R"({"to":"unix:/run/other.sock"})");
  REQUIRE(migrate);
  CHECK(migrate->status == 400);
  CHECK(migrate->error_code() == "invalid_argument");
  CHECK(migrate->json.at("error").at("field").as_string() == "to");

  auto destroyed = http::call(fx.socket, "DELETE", "/v1/domains/api-walk", {}, 30s);
  REQUIRE(destroyed);
  CHECK(destroyed->status == 200);
  const auto& report = destroyed->json.at("kill_report");
  CHECK(report.at("uid") == kWalk + 1);
  CHECK(report.at("survivors") == 0);
  CHECK(report.at("found").to_number<int>() >= 1);
  CHECK(broker::lifecycle::live_processes_of_uid("/proc", kWalk + 1) == 0);
  CHECK(::kill(pid, 0) != 0);
  CHECK(http::call(fx.socket, "GET", "/v1/domains/api-walk")->status == 404);

  std::vector<std::string> names;
  while (auto e = events.next(300ms)) names.push_back(std::string(e->data.at("name").as_string()));
  for (const char* want : {"starting", "created", "STOP", "RESUME", "destroyed"}) {
    INFO(want);
    CHECK(std::find(names.begin(), names.end(), want) != names.end());
  }
}

TEST_CASE(
    "a SIGSTOPped QEMU slows nothing else while its own requests time out clearly "
    "and conflicting requests get 409",
    "[api][privileged][qemu][concurrency]") {
  QB_REQUIRE_ROOT();
  // Each bound below is a quarter of this timeout or less, so that a request that waited for the
  // stuck QEMU cannot pass, while a machine loaded by parallel tests still can.
  broker::BrokerConfig config;
  config.timeouts.qmp = 2000ms;
  qbtest::ApiFixture fx(kStopped, qbtest::ApiFixture::test_limits(), config);
  auto a = http::call(fx.socket, "POST", "/v1/domains", tiny("api-stuck"), 60s);
  auto b = http::call(fx.socket, "POST", "/v1/domains", tiny("api-fine"), 60s);
  REQUIRE((a && b));
  REQUIRE(a->status == 201);
  REQUIRE(b->status == 201);
  pid_t stuck = static_cast<pid_t>(a->json.at("pid").to_number<int>());
  REQUIRE(::kill(stuck, SIGSTOP) == 0);

  // The stuck domain's own requests are in flight: a query and a job that holds its slot.
  auto t0 = Clock::now();
  auto query = send_only(fx.socket, "GET", "/v1/domains/api-stuck");
  auto job = send_only(fx.socket, "POST", "/v1/domains/api-stuck/pause");
  std::this_thread::sleep_for(50ms);

  // A conflicting job on the same domain is refused at once, naming the job that holds it.
  auto t1 = Clock::now();
  auto conflict = http::call(fx.socket, "POST", "/v1/domains/api-stuck/resume");
  REQUIRE(conflict);
  CHECK(conflict->status == 409);
  CHECK(conflict->error_code() == "busy");
  CHECK(ms_since(t1) < 500);

  // Everything else is as fast as ever.
  double worst = 0;
  for (int i = 0; i < 10; ++i) {
    auto t = Clock::now();
    auto r = http::call(fx.socket, "GET", "/v1/domains/api-fine");
    REQUIRE(r);
    CHECK(r->status == 200);
    CHECK(r->json.at("qemu_status") == "running");
    auto l = http::call(fx.socket, "GET", "/v1/domains");
    REQUIRE(l);
    CHECK(l->status == 200);
    worst = std::max(worst, ms_since(t));
  }
  CHECK(worst < 500);
  auto pf = http::call(fx.socket, "POST", "/v1/domains/api-fine/pause");
  REQUIRE(pf);
  CHECK(pf->status == 200);

  // The stuck domain's requests end with a timeout that says what happened.
  auto q = http::read_reply(query.get(), 10s);
  auto j = http::read_reply(job.get(), 10s);
  REQUIRE((q && j));
  CHECK(q->status == 504);
  CHECK(q->error_code() == "qemu_timeout");
  CHECK(q->json.at("error").at("message").as_string().find("query-status") != json::string::npos);
  CHECK(j->status == 504);
  CHECK(j->error_code() == "qemu_timeout");
  double waited = ms_since(t0);
  CHECK(waited >= 1950);
  CHECK(waited < 6000);

  REQUIRE(::kill(stuck, SIGCONT) == 0);
  auto back = http::call(fx.socket, "GET", "/v1/domains/api-stuck");
  REQUIRE(back);
  CHECK(back->status == 200);

  // Destroy works on a stopped QEMU too (SIGKILL needs no cooperation).
  REQUIRE(::kill(stuck, SIGSTOP) == 0);
  auto d1 = http::call(fx.socket, "DELETE", "/v1/domains/api-stuck", {}, 30s);
  REQUIRE(d1);
  CHECK(d1->status == 200);
  CHECK(d1->json.at("kill_report").at("survivors") == 0);
  CHECK(http::call(fx.socket, "DELETE", "/v1/domains/api-fine", {}, 30s)->status == 200);
}

TEST_CASE("concurrent creates of one name: one wins and the other gets 409",
          "[api][privileged][qemu][concurrency]") {
  QB_REQUIRE_ROOT();
  qbtest::ApiFixture fx(kConflict);
  auto first = send_only(fx.socket, "POST", "/v1/domains", tiny("api-twin"));
  auto second = send_only(fx.socket, "POST", "/v1/domains", tiny("api-twin"));
  auto r1 = http::read_reply(first.get(), 60s);
  auto r2 = http::read_reply(second.get(), 60s);
  REQUIRE((r1 && r2));
  std::vector<unsigned> statuses{r1->status, r2->status};
  std::sort(statuses.begin(), statuses.end());
  CHECK(statuses == std::vector<unsigned>{201, 409});
  auto& loser = r1->status == 409 ? *r1 : *r2;
  CHECK(loser.error_code() == "already_exists");
  CHECK(loser.error_field() == "name");
  // Destroying while another destroy runs is refused too.
  auto d1 = send_only(fx.socket, "DELETE", "/v1/domains/api-twin");
  auto d2 = send_only(fx.socket, "DELETE", "/v1/domains/api-twin");
  auto x1 = http::read_reply(d1.get(), 30s);
  auto x2 = http::read_reply(d2.get(), 30s);
  REQUIRE((x1 && x2));
  std::vector<unsigned> ds{x1->status, x2->status};
  std::sort(ds.begin(), ds.end());
  CHECK(ds.front() == 200);
  CHECK((ds.back() == 409 || ds.back() == 404));
}
