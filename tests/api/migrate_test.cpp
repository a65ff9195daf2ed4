// Live migration between two qbrokerd on one host, over their API sockets and a one-time Unix
// listener of the destination's ([privileged][qemu]): the guest moves with its memory and disk,
// and whatever fails, the guest runs in exactly one place.
#include <signal.h>
#include <sys/stat.h>

#include <boost/json.hpp>
#include <catch2/catch.hpp>
#include <filesystem>
#include <optional>
#include <thread>

#include "broker/lifecycle/proc.hpp"
#include "daemon_support.hpp"
#include "http_client.hpp"
#include "support/qemu.hpp"
#include "support/support.hpp"

using namespace qbtest::daemon;
namespace json = boost::json;
namespace http = qbtest::http;

namespace {

constexpr uid_t kSourceBase = 3'109'000;
constexpr uid_t kDestinationBase = 3'109'100;
constexpr uid_t kRefusedBase = 3'109'200;
constexpr uid_t kDyingBase = 3'109'300;
constexpr uid_t kKilledSourceBase = 3'109'400;
constexpr uid_t kKilledDestinationBase = 3'109'500;

// A running qbrokerd with the test's image root beside the guest's directory.
struct Broker {
  qbtest::TempDir dir;
  std::string sock = dir / "qbroker.sock";
  uid_t base;
  std::vector<std::string> args;
  Child daemon;

  Broker(uid_t uid_base, const std::string& images) : base(uid_base), args(daemon_args(dir, base)) {
    args.insert(args.end(), {"--socket", sock, "--image-root", images});
    start();
  }
  void start() {
    daemon.pid = spawn(args, dir / "log");
    REQUIRE(wait_for_socket(sock, 20s));
  }
  // SIGKILL once `job` is journaled in the record of `name`, and reap; the QEMUs run on.
  void kill_during(const std::string& name, const std::string& job) {
    const std::string record = dir / ("run/domains/" + name + ".json");
    REQUIRE(wait_for(
        [&] { return slurp(record).find("\"kind\":\"" + job + "\"") != std::string::npos; }, 60s));
    ::kill(daemon.pid, SIGKILL);
    CHECK(daemon.wait(10s) == 128 + SIGKILL);
    daemon.pid = -1;
  }
  // SIGTERM leaves domains running for a restart: each one still here is destroyed first, and
  // whatever still runs under the range afterwards is killed by pid and reaped.
  ~Broker() {
    if (daemon.pid > 0) {
      auto list = http::call(sock, "GET", "/v1/domains");
      if (list && list->json.is_object()) {
        for (const auto& d : list->json.at("domains").as_array()) {
          http::call(sock, "DELETE", "/v1/domains/" + std::string(d.at("name").as_string()), {}, 30s);
        }
      }
      ::kill(daemon.pid, SIGTERM);
      daemon.wait(10s);
    }
    for (uid_t u = base; u < base + 8; ++u) {
      for (const auto& p : broker::lifecycle::processes_of_uid("/proc", u)) ::kill(p.pid, SIGKILL);
    }
    wait_for([&] {
      qbtest::reap_exited_children();
      for (uid_t u = base; u < base + 8; ++u) {
        if (!broker::lifecycle::processes_of_uid("/proc", u).empty()) return false;
      }
      return true;
    }, 10s);
    remove_cgroup_base(base);
  }
  json::value domain(const std::string& name) const {
    auto r = http::call(sock, "GET", "/v1/domains/" + name);
    REQUIRE(r);
    return r->status == 200 ? r->json : json::value();
  }
};

struct Guest {
  pid_t pid = 0;
  uid_t uid = 0;
  std::unique_ptr<qbtest::GuestConsole> console;
};

// Creates the guest paused with disk d0, connects its console, resumes it, waits for its prompt.
Guest boot(const Broker& b, const std::string& name, const std::string& images) {
  const std::string body = R"({"name":")" + name + R"(","memory_mib":128,"pci_slots":2,"kernel":")" +
                           qbtest::guest_kernel() + R"(","initrd":")" + qbtest::guest_initrd() +
                           R"(","append":")" + qbtest::kGuestAppend + R"(","paused":true,)" +
                           R"("disks":[{"id":"d0","path":")" + images + R"(/d0.img","bus":"virtio"}]})";
  auto created = http::call(b.sock, "POST", "/v1/domains", body, 60s);
  REQUIRE(created);
  INFO(created->body);
  REQUIRE(created->status == 201);
  Guest g;
  g.pid = static_cast<pid_t>(created->json.at("pid").to_number<int>());
  g.uid = created->json.at("uid").to_number<uid_t>();
  auto fd = qbtest::connect_retry(std::string(created->json.at("console").as_string()), 10s);
  REQUIRE(fd);
  g.console = std::make_unique<qbtest::GuestConsole>(std::move(fd));
  auto resumed = http::call(b.sock, "POST", "/v1/domains/" + name + "/resume", "{}");
  REQUIRE(resumed);
  REQUIRE(resumed->status == 200);
  REQUIRE(g.console->wait_ready(90s));
  return g;
}

std::string run_in(qbtest::GuestConsole& con, const std::string& cmd) {
  auto out = con.run(cmd, 30s);
  INFO("guest: " << cmd);
  REQUIRE(out);
  return out->text;
}

void start_counter(qbtest::GuestConsole& con) {
  run_in(con, "(i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.05; done) &");
}

long counter(qbtest::GuestConsole& con) { return std::stol("0" + run_in(con, "cat /tmp/counter")); }

void make_images(const std::string& images) {
  std::filesystem::create_directory(images);
  qbtest::write_file(images + "/d0.img", "QB-MIGRATE-DISK");
  std::filesystem::resize_file(images + "/d0.img", 1 << 20);
}

http::Reply migrate(const Broker& from, const std::string& name, const Broker& to) {
  auto r = http::call(from.sock, "POST", "/v1/domains/" + name + "/migrate",
                      R"({"to":")" + to.sock + R"("})", 120s);
  REQUIRE(r);
  return *r;
}

// Two brokers sharing an image root, and a booted guest at the source.
struct Pair {
  qbtest::TempDir shared;
  std::string images = shared / "images";
  std::unique_ptr<Broker> source, destination;
  std::string name;
  Guest guest;

  Pair(uid_t base, const std::string& prefix) : name(prefix + std::to_string(::getpid())) {
    qbtest::become_subreaper();
    make_images(images);
    source = std::make_unique<Broker>(base, images);
    destination = std::make_unique<Broker>(base + 50, images);
    guest = boot(*source, name, images);
    start_counter(*guest.console);
  }
  // The guest runs on at the source, unchanged, counting.
  void check_runs_at_source() {
    auto here = source->domain(name);
    REQUIRE(here.is_object());
    CHECK(here.at("state").as_string() == "running");
    CHECK(here.at("pid").to_number<int>() == guest.pid);
    CHECK(here.at("job").is_null());
    const long now = counter(*guest.console);
    CHECK(wait_for([&] { return counter(*guest.console) > now; }, 10s));
  }
  // The destination keeps nothing of it: no domain, nothing under its uids.
  void check_nothing_at_destination() {
    CHECK(wait_for([&] { return destination->domain(name).is_null(); }, 30s));
    for (uid_t u = destination->base; u < destination->base + 8; ++u) {
      CHECK(broker::lifecycle::live_processes_of_uid("/proc", u) == 0);
    }
  }
};

}  // namespace

TEST_CASE("a running guest migrates to another broker with its memory and disk, and nothing of it "
          "is left at the source",
          "[api][migrate][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  Pair p(kSourceBase, "mig");
  auto& con = *p.guest.console;
  // Memory: the counter the guest keeps in its RAM-backed /tmp. Disk: bytes written to d0.
  run_in(con, "echo QB-WRITTEN-AT-SOURCE | dd of=/dev/vda bs=512 seek=8 conv=notrunc,fsync 2>/dev/null");
  const long before = counter(con);

  auto moved = migrate(*p.source, p.name, *p.destination);
  INFO(moved.body);
  REQUIRE(moved.status == 200);
  CHECK(moved.json.at("migrated_to").as_string() == p.destination->sock);

  // The source keeps nothing: no domain, no process under the uid, no record.
  CHECK(p.source->domain(p.name).is_null());
  CHECK(broker::lifecycle::live_processes_of_uid("/proc", p.guest.uid) == 0);
  CHECK_FALSE(std::filesystem::exists(p.source->dir / ("run/domains/" + p.name + ".json")));
  // The destination runs it under a uid of its own range, and the guest went on counting.
  auto there = p.destination->domain(p.name);
  REQUIRE(there.is_object());
  CHECK(there.at("state").as_string() == "running");
  const auto uid = there.at("uid").to_number<uid_t>();
  CHECK(uid > p.destination->base);
  CHECK(uid < p.destination->base + 8);
  const pid_t pid = static_cast<pid_t>(there.at("pid").to_number<int>());
  auto fd = qbtest::connect_retry(std::string(there.at("console").as_string()), 10s);
  REQUIRE(fd);
  qbtest::GuestConsole moved_con(std::move(fd));
  const long after = counter(moved_con);
  CHECK(after >= before);
  CHECK(wait_for([&] { return counter(moved_con) > after; }, 10s));
  CHECK(run_in(moved_con, "dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null | head -c 20") ==
        "QB-WRITTEN-AT-SOURCE");
  // The destination's QEMU got the stream as an fd: it holds no socket by path, and the
  // one-time listener is gone.
  CHECK(fds_naming(pid, p.destination->dir.path()) == 0);
  CHECK(std::filesystem::is_empty(p.destination->dir / "run/migrate"));

  auto gone = http::call(p.destination->sock, "DELETE", "/v1/domains/" + p.name);
  REQUIRE(gone);
  CHECK(gone->status == 200);
}

TEST_CASE("a destination that refuses the domain leaves it running at the source, unchanged",
          "[api][migrate][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  Pair p(kRefusedBase, "ref");
  // The destination has a domain of that name already.
  auto taken = http::call(p.destination->sock, "POST", "/v1/domains",
                          R"({"name":")" + p.name + R"(","memory_mib":64,"machine":"none"})", 60s);
  REQUIRE(taken);
  REQUIRE(taken->status == 201);

  auto refused = migrate(*p.source, p.name, *p.destination);
  INFO(refused.body);
  CHECK(refused.status == 409);
  CHECK(refused.json.at("error").at("field").as_string() == "to");
  CHECK(refused.json.at("error").at("message").as_string().find("a domain named '" + p.name +
                                                                "' exists") != std::string::npos);
  p.check_runs_at_source();

  // A destination path that is no broker at all, or not a path: refused naming "to".
  auto nowhere = http::call(p.source->sock, "POST", "/v1/domains/" + p.name + "/migrate",
                            R"({"to":")" + p.shared.path() + R"(/no-broker.sock"})", 30s);
  REQUIRE(nowhere);
  CHECK(nowhere->status >= 400);
  CHECK(nowhere->json.at("error").at("field").as_string() == "to");
  auto bad = http::call(p.source->sock, "POST", "/v1/domains/" + p.name + "/migrate",
                        R"({"to":"b.sock"})");
  REQUIRE(bad);
  CHECK(bad->status == 400);
  CHECK(bad->json.at("error").at("field").as_string() == "to");
  p.check_runs_at_source();
}

TEST_CASE("a destination QEMU that dies during the migration leaves the guest running at the source",
          "[api][migrate][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  Pair p(kDyingBase, "die");
  // The destination's QEMU is killed as soon as it exists: during the prepare, or while the
  // state streams in, whichever the timing gives.
  std::thread killer([&] {
    wait_for(
        [&] {
          auto d = p.destination->domain(p.name);
          if (!d.is_object() || !d.at("pid").is_number()) return false;
          const auto pid = d.at("pid").to_number<int>();
          return pid > 0 && ::kill(pid, SIGKILL) == 0;
        },
        60s);
  });
  auto failed = migrate(*p.source, p.name, *p.destination);
  killer.join();
  INFO(failed.body);
  CHECK(failed.status >= 400);
  p.check_runs_at_source();
  p.check_nothing_at_destination();
}

namespace {

// Where the guest runs once both brokers have settled: each broker's state for it ("" when it
// does not list it).
std::pair<std::string, std::string> placements(const Broker& a, const Broker& b, const std::string& name) {
  auto state = [&](const Broker& x) {
    auto d = x.domain(name);
    return d.is_object() ? std::string(d.at("state").as_string()) : std::string();
  };
  return {state(a), state(b)};
}

}  // namespace

TEST_CASE("qbrokerd SIGKILLed mid-migration at the source: the guest runs in exactly one place",
          "[api][migrate][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  Pair p(kKilledSourceBase, "ks");
  std::thread asker([&] {
    http::call(p.source->sock, "POST", "/v1/domains/" + p.name + "/migrate",
               R"({"to":")" + p.destination->sock + R"("})", 120s);
  });
  SECTION("as soon as the job is journaled") { p.source->kill_during(p.name, "migrate"); }
  SECTION("once the destination has the domain") {
    REQUIRE(wait_for([&] { return p.destination->domain(p.name).is_object(); }, 60s));
    p.source->kill_during(p.name, "migrate");
  }
  asker.join();
  p.source->start();
  REQUIRE(wait_adopted(p.source->sock, 60s));
  // The source's QEMU may have finished sending on its own: the destination then runs the guest
  // and the source keeps it paused; or it had not, and the source runs it again. Never both
  // running, never neither.
  std::pair<std::string, std::string> where;
  CHECK(wait_for(
      [&] {
        where = placements(*p.source, *p.destination, p.name);
        return (where.first == "running") != (where.second == "running") &&
               where.second != "starting" && where.second != "paused";
      },
      60s));
  INFO("source: " << where.first << ", destination: " << where.second);
  CHECK((where.first == "running" || where.first == "paused" || where.first.empty()));
  for (auto* b : {p.source.get(), p.destination.get()}) {
    auto d = b->domain(p.name);
    if (d.is_object()) CHECK(d.at("job").is_null());
  }
}

TEST_CASE("qbrokerd SIGKILLed mid-migration at the destination: the guest runs on at the source and "
          "the restarted destination leaves nothing",
          "[api][migrate][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  Pair p(kKilledDestinationBase, "kd");
  std::optional<http::Reply> answer;
  std::thread asker([&] {
    answer = http::call(p.source->sock, "POST", "/v1/domains/" + p.name + "/migrate",
                        R"({"to":")" + p.destination->sock + R"("})", 120s);
  });
  p.destination->kill_during(p.name, "incoming");
  p.destination->start();
  REQUIRE(wait_adopted(p.destination->sock, 60s));
  asker.join();
  REQUIRE(answer);
  INFO(answer->body);
  CHECK(answer->status >= 400);
  // The destination buried the half-arrived domain by uid; the source resumed its guest.
  p.check_nothing_at_destination();
  p.check_runs_at_source();
}
