// qbrokerd --pool as an operator meets it: GET /v1/pool and qbrokerctl pool show the QEMUs
// spawned ahead; a create of the shape through the API takes one and says so; SIGTERM kills what
// is pooled; and after a SIGKILL, the next qbrokerd (without --pool) kills the pooled QEMUs by uid
// and removes their records and files, since no domain speaks for them. A SIGKILL while a create
// or a restore takes a pooled QEMU leaves the domain whole or nothing of it.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <optional>
#include <thread>

#include <boost/json.hpp>

#include "broker/lifecycle/proc.hpp"
#include "daemon_support.hpp"
#include "http_client.hpp"
#include "support/qemu.hpp"
#include "support/support.hpp"

using namespace std::chrono_literals;
namespace fs = std::filesystem;
namespace json = boost::json;
using broker::lifecycle::live_processes_of_uid;
using namespace qbtest::daemon;

namespace {

constexpr uid_t kServed = 3'170'200;
constexpr uid_t kKilled = 3'170'300;

// GET /v1/pool's ready QEMUs of its first shape; empty when the call fails.
json::array ready(const std::string& sock) {
  auto r = qbtest::http::call(sock, "GET", "/v1/pool");
  if (!r || r->status != 200) return {};
  const auto& shapes = r->json.at("shapes").as_array();
  return shapes.empty() ? json::array() : shapes.at(0).at("ready").as_array();
}

// True once the daemon logging to `log` has finished its recovery: the reclaim of uids no domain
// speaks for (pooled QEMUs among them) is done, records and files included. The API answers
// before that, and lists no domain as adopting when there is none.
bool recovered(const std::string& log) {
  return wait_for([&] { return slurp(log).find("recovered state:") != std::string::npos; }, 20s);
}

bool files_named(const std::string& dir, const std::string& needle) {
  std::error_code ec;
  for (const auto& e : fs::recursive_directory_iterator(dir, ec)) {
    if (e.path().filename().string().find(needle) != std::string::npos) return true;
  }
  return false;
}

// Waits until domain `name` is either running with no job, or gone (404), as a daemon restarted
// after a kill leaves it once its recovery is done; its last answer.
std::optional<qbtest::http::Reply> settled(const std::string& sock, const std::string& name) {
  std::optional<qbtest::http::Reply> shown;
  CHECK(wait_for([&] {
    shown = qbtest::http::call(sock, "GET", "/v1/domains/" + name);
    if (!shown) return false;
    if (shown->status == 404) return true;
    return shown->status == 200 && shown->json.at("job").is_null() &&
           shown->json.at("state") == "running";
  }, 20s));
  return shown;
}

// Nothing is left of the pool or of a domain in the range above `base`: no process, no uid
// record, no socket or log under either name. A teardown the recovery began goes on in the
// background; it ends with the files.
void check_nothing_left(const qbtest::TempDir& dir, uid_t base) {
  CHECK(wait_for([&] {
    qbtest::reap_exited_children();
    for (uid_t u = base + 1; u < base + 8; ++u) {
      if (live_processes_of_uid("/proc", u) != 0) return false;
    }
    return true;
  }, 20s));
  CHECK(wait_for([&] {
    return fs::is_empty(dir / "state/uids") && !files_named(dir / "run/qmp", ".sock") &&
           !files_named(dir / "run/console", ".sock") && !files_named(dir / "run", "_pool-");
  }, 10s));
  CHECK(fs::is_empty(dir / "state/uids"));
  CHECK_FALSE(files_named(dir / "run/qmp", ".sock"));
  CHECK_FALSE(files_named(dir / "run/console", ".sock"));
  CHECK_FALSE(files_named(dir / "run", "_pool-"));
}

// A kill_round delay that means: once the answer has come, however long that took.
constexpr int kAfterAnswer = -1;

// One round of a kill test: a qbrokerd run with `pooled` args until its pool has a QEMU ready,
// sent `method route body`, SIGKILLed `delay_us` later (or after its answer, for kAfterAnswer);
// then one run with `plain` args, which must
// leave domain `name` running under the pooled uid with no job, or gone, and nothing else of the
// pool or the domain. Returns true when the domain was whole (and is destroyed again).
bool kill_round(const qbtest::TempDir& dir, uid_t base, const std::vector<std::string>& pooled,
                const std::vector<std::string>& plain, const std::string& route,
                const std::string& body, const std::string& name, int delay_us) {
  const std::string sock = dir / "qbroker.sock";
  uid_t uid = 0;
  {
    Child d{spawn(pooled, dir / "log")};
    REQUIRE(wait_for_socket(sock, 20s));
    REQUIRE(wait_for([&] { return ready(sock).size() == 1; }, 60s));
    uid = ready(sock).at(0).at("uid").to_number<uid_t>();
    auto conn = qbtest::http::connect(sock);
    REQUIRE(conn);
    REQUIRE(qbtest::http::send_all(conn.get(), qbtest::http::request_text("POST", route, body)));
    if (delay_us == kAfterAnswer) {
      auto answer = qbtest::http::read_reply(conn.get(), 60s);
      REQUIRE(answer);
      INFO(answer->body);
      CHECK(answer->status / 100 == 2);
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
    }
    ::kill(d.pid, SIGKILL);
    CHECK(d.wait(10s) == 128 + SIGKILL);
  }
  INFO("the killed qbrokerd's log:\n" << slurp(dir / "log"));
  const std::string log = dir / ("log-" + name);  // one per restart: each says it recovered
  Child again{spawn(plain, log)};
  REQUIRE(wait_for_socket(sock, 20s));
  REQUIRE(recovered(log));
  INFO(slurp(log));
  // Either the request finished and the domain runs under the pooled uid, or it is gone: one the
  // kill interrupted is undone by the restarted daemon, in the background.
  auto shown = settled(sock, name);
  REQUIRE(shown);
  const bool whole = shown->status == 200;
  if (whole) {
    CHECK(shown->json.at("pooled") == true);
    CHECK(shown->json.at("uid").to_number<uid_t>() == uid);
    CHECK(qmp_over_http(sock, name, "query-status").at("status") == "running");
    auto gone = qbtest::http::call(sock, "DELETE", "/v1/domains/" + name, {}, 30s);
    REQUIRE(gone);
    CHECK(gone->status == 200);
  } else {
    CHECK(shown->status == 404);
  }
  check_nothing_left(dir, base);
  ::kill(again.pid, SIGTERM);
  CHECK(again.wait(20s) == 0);
  return whole;
}

}  // namespace

TEST_CASE("qbrokerd --pool serves a create of its shape through the API, and SIGTERM kills what is pooled",
          "[api][daemon][pool][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::become_subreaper();
  qbtest::TempDir dir;
  const std::string sock = dir / "qbroker.sock";
  auto plain = daemon_args(dir, kServed);
  plain.insert(plain.end(), {"--socket", sock});
  auto args = plain;
  args.insert(args.end(), {"--pool", "memory_mib=256,count=1"});
  Child d{spawn(args, dir / "log")};
  REQUIRE(wait_for_socket(sock, 20s));
  INFO(slurp(dir / "log"));
  REQUIRE(wait_for([&] { return ready(sock).size() == 1; }, 60s));
  auto pool = qbtest::http::call(sock, "GET", "/v1/pool");
  REQUIRE(pool);
  CHECK(pool->json.at("enabled") == true);
  CHECK(pool->json.at("shapes").at(0).at("shape") ==
        "machine=q35,memory_mib=256,vcpus=1,firmware=bios,pci_slots=4,count=1");
  const auto pooled_pid = ready(sock).at(0).at("pid").to_number<pid_t>();
  const auto pooled_uid = ready(sock).at(0).at("uid").to_number<uid_t>();
  // /metrics counts the pooled QEMU among the uids in use, and as ready.
  auto metrics = qbtest::http::call(sock, "GET", "/metrics");
  REQUIRE(metrics);
  CHECK(metrics->body.find("\nqbroker_pool_ready 1\n") != std::string::npos);
  CHECK(metrics->body.find("\nqbroker_uid_pool_in_use 1\n") != std::string::npos);
  auto shown = ctl(sock, {"pool"});
  CHECK(shown.status == 0);
  CHECK(shown.out.find("1 of 1 ready") != std::string::npos);
  CHECK(shown.out.find(std::to_string(pooled_pid)) != std::string::npos);

  // A create of the shape, booting through SeaBIOS from the test guest's boot disk.
  const std::string name = "pool" + std::to_string(::getpid());
  const std::string body = R"({"name":")" + name +
                           R"(","memory_mib":256,"boot_order":["d0"],"disks":[{"id":"d0","path":")" +
                           qbtest::guest_boot_disk() + R"(","bus":"scsi","read_only":true}]})";
  auto created = qbtest::http::call(sock, "POST", "/v1/domains", body, 60s);
  REQUIRE(created);
  INFO(created->body);
  REQUIRE(created->status == 201);
  CHECK(created->json.at("pooled") == true);
  CHECK(created->json.at("pid").to_number<pid_t>() == pooled_pid);
  CHECK(created->json.at("uid").to_number<uid_t>() == pooled_uid);
  auto show = ctl(sock, {"show", name});
  CHECK(show.out.find("the warm pool") != std::string::npos);
  auto status = qmp_over_http(sock, name, "query-status");
  CHECK(status.at("status") == "running");

  // The pool refills under another uid.
  REQUIRE(wait_for([&] { return ready(sock).size() == 1; }, 60s));
  const auto refill_uid = ready(sock).at(0).at("uid").to_number<uid_t>();
  CHECK(refill_uid != pooled_uid);

  // SIGTERM: the domain keeps running, the pooled QEMU goes with the daemon.
  ::kill(d.pid, SIGTERM);
  CHECK(d.wait(20s) == 0);
  qbtest::reap_exited_children();
  CHECK(::kill(pooled_pid, 0) == 0);
  CHECK(live_processes_of_uid("/proc", refill_uid) == 0);
  CHECK_FALSE(fs::exists(dir / ("state/uids/" + std::to_string(refill_uid))));
  CHECK_FALSE(files_named(dir / "run", "_pool-"));

  // A daemon without --pool adopts the domain; nothing pooled is left to reclaim.
  Child again{spawn(plain, dir / "log2")};
  REQUIRE(wait_for_socket(sock, 20s));
  REQUIRE(wait_adopted(sock, 10s));
  auto destroyed = qbtest::http::call(sock, "DELETE", "/v1/domains/" + name, {}, 30s);
  REQUIRE(destroyed);
  CHECK(destroyed->status == 200);
  ::kill(again.pid, SIGTERM);
  CHECK(again.wait(20s) == 0);
  remove_cgroup_base(kServed);
}

TEST_CASE("after a SIGKILL the next qbrokerd kills the pooled QEMUs by uid and leaves nothing of them",
          "[api][daemon][pool][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::become_subreaper();
  qbtest::TempDir dir;
  const std::string sock = dir / "qbroker.sock";
  auto args = daemon_args(dir, kKilled);
  args.insert(args.end(), {"--socket", sock});
  auto pooled_args = args;
  pooled_args.insert(pooled_args.end(), {"--pool", "memory_mib=128,count=2"});
  std::vector<uid_t> uids;
  std::vector<pid_t> pids;
  {
    Child d{spawn(pooled_args, dir / "log")};
    REQUIRE(wait_for_socket(sock, 20s));
    INFO(slurp(dir / "log"));
    REQUIRE(wait_for([&] { return ready(sock).size() == 2; }, 90s));
    for (const auto& r : ready(sock)) {
      uids.push_back(r.at("uid").to_number<uid_t>());
      pids.push_back(r.at("pid").to_number<pid_t>());
    }
    ::kill(d.pid, SIGKILL);
    CHECK(d.wait(10s) == 128 + SIGKILL);
  }
  // The pooled QEMUs outlived their daemon, with their uid records.
  for (std::size_t i = 0; i < pids.size(); ++i) {
    CHECK(::kill(pids[i], 0) == 0);
    CHECK(fs::exists(dir / ("state/uids/" + std::to_string(uids[i]))));
  }
  CHECK(files_named(dir / "run", "_pool-"));

  Child again{spawn(args, dir / "log2")};
  REQUIRE(wait_for_socket(sock, 20s));
  REQUIRE(recovered(dir / "log2"));
  INFO(slurp(dir / "log2"));
  CHECK(wait_for([&] {
    qbtest::reap_exited_children();
    return live_processes_of_uid("/proc", uids[0]) == 0 && live_processes_of_uid("/proc", uids[1]) == 0;
  }, 20s));
  for (auto uid : uids) CHECK_FALSE(fs::exists(dir / ("state/uids/" + std::to_string(uid))));
  CHECK_FALSE(files_named(dir / "run", "_pool-"));
  auto pool = qbtest::http::call(sock, "GET", "/v1/pool");
  REQUIRE(pool);
  CHECK(pool->json.at("enabled") == false);
  ::kill(again.pid, SIGTERM);
  CHECK(again.wait(20s) == 0);
  remove_cgroup_base(kKilled);
}

TEST_CASE("a qbrokerd SIGKILLed while a create takes a pooled QEMU leaves the domain whole or nothing of it",
          "[api][daemon][pool][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::become_subreaper();
  constexpr uid_t kBase = 3'170'400;
  qbtest::TempDir dir;
  auto plain = daemon_args(dir, kBase);
  plain.insert(plain.end(), {"--socket", dir / "qbroker.sock"});
  auto pooled = plain;
  pooled.insert(pooled.end(), {"--pool", "memory_mib=256,count=1"});
  // From before the handover to after the answer: the kill lands in each of its steps in turn.
  int whole = 0, none = 0;
  for (int delay_us : {0, 1000, 2000, 2500, 3000, 3500, 4000, 4500, 5000, 6000, 8000, 12000, 20000,
                       kAfterAnswer}) {
    INFO("killed " << delay_us << " us into the create");
    const std::string name = "pk" + std::to_string(delay_us);
    const std::string body =
        R"({"name":")" + name + R"(","memory_mib":256,"boot_order":["d0"],"disks":[{"id":"d0","path":")" +
        qbtest::guest_boot_disk() + R"(","bus":"virtio","read_only":true}]})";
    const bool kept = kill_round(dir, kBase, pooled, plain, "/v1/domains", body, name, delay_us);
    (kept ? whole : none) += 1;
  }
  // The kill before the request is read and the one after the answer: both outcomes were met,
  // however loaded the host.
  CHECK(whole > 0);
  CHECK(none > 0);
  remove_cgroup_base(kBase);
}

TEST_CASE("a qbrokerd SIGKILLed while a restore takes a pooled QEMU leaves the domain whole or nothing of it",
          "[api][daemon][pool][privileged][qemu][save]") {
  QB_REQUIRE_ROOT();
  qbtest::become_subreaper();
  constexpr uid_t kBase = 3'170'600;
  qbtest::TempDir dir;
  qbtest::TempDir saves;
  const std::string sock = dir / "qbroker.sock";
  auto plain = daemon_args(dir, kBase);
  plain.insert(plain.end(), {"--socket", sock, "--save-root", saves.path()});
  auto pooled = plain;
  pooled.insert(pooled.end(), {"--pool", "memory_mib=256,count=1,for=restore"});
  // The saved domain: booted through SeaBIOS from the guest's boot disk, then saved, which ends it.
  const std::string file = saves / "pr.state";
  {
    Child d{spawn(plain, dir / "log-save")};
    REQUIRE(wait_for_socket(sock, 20s));
    INFO(slurp(dir / "log-save"));
    const std::string body =
        R"({"name":"pr","memory_mib":256,"boot_order":["d0"],"disks":[{"id":"d0","path":")" +
        qbtest::guest_boot_disk() + R"(","bus":"virtio","read_only":true}]})";
    auto created = qbtest::http::call(sock, "POST", "/v1/domains", body, 60s);
    REQUIRE(created);
    REQUIRE(created->status == 201);
    auto saved = qbtest::http::call(sock, "POST", "/v1/domains/pr/save",
                                    R"({"path":")" + file + R"("})", 60s);
    REQUIRE(saved);
    INFO(saved->body);
    REQUIRE(saved->status == 200);
    ::kill(d.pid, SIGTERM);
    CHECK(d.wait(20s) == 0);
  }
  REQUIRE(fs::exists(file));
  // From before the handover to after the answer: the kill lands in each of its steps in turn,
  // the stream's copy among them. The save file is the restore's input only: it stays, whole.
  int whole = 0, none = 0;
  for (int delay_us : {0, 1000, 2000, 3000, 4000, 6000, 10000, 20000, 60000, 150000, kAfterAnswer}) {
    INFO("killed " << delay_us << " us into the restore");
    const std::string name = "pr" + std::to_string(delay_us);
    const std::string body = R"({"path":")" + file + R"(","name":")" + name + R"("})";
    const bool kept =
        kill_round(dir, kBase, pooled, plain, "/v1/domains/restore", body, name, delay_us);
    (kept ? whole : none) += 1;
    CHECK(fs::exists(file));
  }
  CHECK(whole > 0);
  CHECK(none > 0);
  remove_cgroup_base(kBase);
}
