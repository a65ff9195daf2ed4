// Live migration between two qbrokerd on one host, over their API sockets and a one-time Unix
// listener of the destination's ([privileged][qemu]): the guest moves with its memory and disk,
// and whatever fails, the guest runs in exactly one place.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <boost/json.hpp>
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include "broker/lifecycle/proc.hpp"
#include "daemon_support.hpp"
#include "fdpass/unique_fd.hpp"
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
constexpr uid_t kTlsBase = 3'109'600;
constexpr uid_t kRogueBase = 3'109'700;
constexpr uid_t kPlainBase = 3'109'800;
constexpr uid_t kTlsDyingBase = 3'109'900;
constexpr uid_t kCopyBase = 3'113'000;
constexpr uid_t kCopyRefusedBase = 3'113'100;
constexpr uid_t kCopyKilledBase = 3'113'200;
constexpr uid_t kCopyCancelBase = 3'113'300;
constexpr uid_t kCopyTlsBase = 3'113'400;
constexpr uid_t kCopyPlainBase = 3'113'500;
constexpr uid_t kWentBase = 3'113'600;
constexpr uid_t kWentTlsBase = 3'113'700;

// A running qbrokerd with the test's image root beside the guest's directory.
struct Broker {
  qbtest::TempDir dir;
  std::string sock = dir / "qbroker.sock";
  uid_t base;
  std::vector<std::string> args;
  Child daemon;

  Broker(uid_t uid_base, const std::string& images, const std::vector<std::string>& extra = {})
      : base(uid_base), args(daemon_args(dir, base)) {
    args.insert(args.end(), {"--socket", sock, "--image-root", images});
    args.insert(args.end(), extra.begin(), extra.end());
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
          http::call(sock, "DELETE", "/v1/domains/" + std::string(d.at("name").as_string()), {},
                     30s);
        }
      }
      ::kill(daemon.pid, SIGTERM);
      daemon.wait(10s);
    }
    for (uid_t u = base; u < base + 8; ++u) {
      for (const auto& p : broker::lifecycle::processes_of_uid("/proc", u)) ::kill(p.pid, SIGKILL);
    }
    wait_for(
        [&] {
          qbtest::reap_exited_children();
          for (uid_t u = base; u < base + 8; ++u) {
            if (!broker::lifecycle::processes_of_uid("/proc", u).empty()) return false;
          }
          return true;
        },
        10s);
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
  const std::string body =
      R"({"name":")" + name + R"(","memory_mib":128,"pci_slots":2,"kernel":")" +
      qbtest::guest_kernel() + R"(","initrd":")" + qbtest::guest_initrd() + R"(","append":")" +
      qbtest::kGuestAppend + R"(","paused":true,)" + R"("disks":[{"id":"d0","path":")" + images +
      R"(/d0.img","bus":"virtio"}]})";
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

long counter(qbtest::GuestConsole& con) {
  return std::stol("0" + run_in(con, "cat /tmp/counter"));
}

void make_images(const std::string& images) {
  std::filesystem::create_directory(images);
  qbtest::write_file(images + "/d0.img", "QB-MIGRATE-DISK");
  std::filesystem::resize_file(images + "/d0.img", 1 << 20);
}

http::Reply migrate(const Broker& from, const std::string& name, const std::string& to) {
  auto r = http::call(from.sock, "POST", "/v1/domains/" + name + "/migrate",
                      R"({"to":")" + to + R"("})", 120s);
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

  Pair(uid_t base, const std::string& prefix, const std::vector<std::string>& source_args = {},
       const std::vector<std::string>& destination_args = {})
      : name(prefix + std::to_string(::getpid())) {
    qbtest::become_subreaper();
    make_images(images);
    source = std::make_unique<Broker>(base, images, source_args);
    destination = std::make_unique<Broker>(base + 50, images, destination_args);
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

// The inodes of every TCP socket on the host.
std::set<std::string> tcp_socket_inodes() {
  std::set<std::string> out;
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::istringstream in(slurp(table));
    std::string line;
    std::getline(in, line);  // the header
    while (std::getline(in, line)) {
      std::istringstream f(line);
      std::string field;
      for (int i = 0; i < 10 && f >> field; ++i) {
      }
      if (!field.empty()) out.insert(field);
    }
  }
  return out;
}

// How many TCP sockets the process holds.
int tcp_fds(pid_t pid) {
  const auto tcp = tcp_socket_inodes();
  int n = 0;
  for (const auto& e :
       std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd")) {
    std::error_code ec;
    auto target = std::filesystem::read_symlink(e.path(), ec).string();
    if (!ec && target.starts_with("socket:[") &&
        tcp.contains(target.substr(8, target.size() - 9))) {
      ++n;
    }
  }
  return n;
}

// The guest went from the pair's source to its destination, whole.
void check_moved(Pair& p, const std::string& to, const http::Reply& moved, long before) {
  INFO(moved.body);
  REQUIRE(moved.status == 200);
  CHECK(moved.json.at("migrated_to").as_string() == to);
  CHECK(p.source->domain(p.name).is_null());
  CHECK(broker::lifecycle::live_processes_of_uid("/proc", p.guest.uid) == 0);
  CHECK_FALSE(std::filesystem::exists(p.source->dir / ("run/domains/" + p.name + ".json")));
  auto there = p.destination->domain(p.name);
  REQUIRE(there.is_object());
  CHECK(there.at("state").as_string() == "running");
  // Under a uid of the destination's own range.
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
  // QEMU got the stream as an fd: a socketpair's end or an accepted Unix connection, never a
  // TCP socket (between hosts the brokers hold it) or a socket it reached by path; and the
  // one-time listener is gone.
  CHECK(tcp_fds(pid) == 0);
  CHECK(fds_naming(pid, p.destination->dir.path()) == 0);
  CHECK(std::filesystem::is_empty(p.destination->dir / "run/migrate"));
}

// Migrates to `to` while the destination's QEMU is killed as soon as it exists (during the
// prepare, or while the state streams in, whichever the timing gives): the guest stays whole at
// the source and nothing of it at the destination.
void migrate_while_destination_dies(Pair& p, const std::string& to) {
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
  auto failed = migrate(*p.source, p.name, to);
  killer.join();
  INFO(failed.body);
  CHECK(failed.status >= 400);
  p.check_runs_at_source();
  p.check_nothing_at_destination();
}

}  // namespace

TEST_CASE(
    "a running guest migrates to another broker with its memory and disk, and nothing of it "
    "is left at the source",
    "[api][migrate][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  Pair p(kSourceBase, "mig");
  auto& con = *p.guest.console;
  // Memory: the counter the guest keeps in its RAM-backed /tmp. Disk: bytes written to d0.
  run_in(con,
         "echo QB-WRITTEN-AT-SOURCE | dd of=/dev/vda bs=512 seek=8 conv=notrunc,fsync 2>/dev/null");
  const long before = counter(con);

  auto moved = migrate(*p.source, p.name, p.destination->sock);
  check_moved(p, p.destination->sock, moved, before);

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

  auto refused = migrate(*p.source, p.name, p.destination->sock);
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
  // Another host, from a broker with no certificates and no --insecure-migration.
  auto unconfigured = http::call(p.source->sock, "POST", "/v1/domains/" + p.name + "/migrate",
                                 R"({"to":"tcp://127.0.0.1:1"})");
  REQUIRE(unconfigured);
  CHECK(unconfigured->status == 400);
  CHECK(unconfigured->json.at("error").at("field").as_string() == "to");
  CHECK(unconfigured->json.at("error").at("message").as_string().find("--insecure-migration") !=
        std::string::npos);
  auto bad = http::call(p.source->sock, "POST", "/v1/domains/" + p.name + "/migrate",
                        R"({"to":"b.sock"})");
  REQUIRE(bad);
  CHECK(bad->status == 400);
  CHECK(bad->json.at("error").at("field").as_string() == "to");
  p.check_runs_at_source();
}

TEST_CASE(
    "a destination QEMU that dies during the migration leaves the guest running at the source",
    "[api][migrate][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  Pair p(kDyingBase, "die");
  migrate_while_destination_dies(p, p.destination->sock);
}

namespace {

// Where the guest runs once both brokers have settled: each broker's state for it ("" when it
// does not list it).
std::pair<std::string, std::string> placements(const Broker& a, const Broker& b,
                                               const std::string& name) {
  auto state = [&](const Broker& x) {
    auto d = x.domain(name);
    return d.is_object() ? std::string(d.at("state").as_string()) : std::string();
  };
  return {state(a), state(b)};
}

// The source broker, SIGKILLed mid-migration, is started again. Its QEMU may have finished
// sending on its own: the destination then runs the guest and the source keeps it paused; or it
// had not, and the source runs it again. Never both running, never neither, and no job left.
void check_one_place_after_restart(Pair& p) {
  p.source->start();
  REQUIRE(wait_adopted(p.source->sock, 60s));
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

}  // namespace

TEST_CASE("qbrokerd SIGKILLed mid-migration at the source: the guest runs in exactly one place",
          "[api][migrate][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  Pair p(kKilledSourceBase, "ks");
  std::thread asker([&] {
    http::call(p.source->sock, "POST", "/v1/domains/" + p.name + "/migrate",
               R"({"to":")" + p.destination->sock + R"("})", 120s);
  });
  SECTION("as soon as the job is journaled") {
    p.source->kill_during(p.name, "migrate");
  }
  SECTION("once the destination has the domain") {
    REQUIRE(wait_for([&] { return p.destination->domain(p.name).is_object(); }, 60s));
    p.source->kill_during(p.name, "migrate");
  }
  asker.join();
  check_one_place_after_restart(p);
}

TEST_CASE(
    "qbrokerd SIGKILLed mid-migration at the destination: the guest runs on at the source and "
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

// ---- copy_storage: the disk mirrored into the destination's own image ------------------------

namespace {

constexpr int kWriterFirstSector = 100;
constexpr int kWriterCount = 1900;  // sectors 101 .. 2000 of the 2048 in d0

// A guest process that writes 1, 2, 3 ... each to a sector of its own (101, 102, ...) through the
// cache to the disk, and only then records it in /tmp/written: every count /tmp/written names is
// on the disk, wherever the guest runs by then.
void start_writer(qbtest::GuestConsole& con) {
  run_in(con, "(i=0; while [ $i -lt " + std::to_string(kWriterCount) +
                  " ]; do i=$((i+1)); printf '%08d' $i | dd of=/dev/vda bs=512 seek=$((" +
                  std::to_string(kWriterFirstSector) +
                  "+i)) conv=notrunc,fsync 2>/dev/null; echo $i > /tmp/written; done) & "
                  "echo $! > /tmp/writer");
}

long written(qbtest::GuestConsole& con) {
  return std::stol("0" + run_in(con, "cat /tmp/written 2>/dev/null"));
}

// An image file of `bytes` zeros beside the source's.
std::string blank_image(const Pair& p, const std::string& file, std::uintmax_t bytes) {
  const std::string path = p.images + "/" + file;
  qbtest::write_file(path, "");
  std::filesystem::resize_file(path, bytes);
  return path;
}

http::Reply migrate_copying(const Pair& p, const std::string& extra, const std::string& to = {}) {
  auto r = http::call(p.source->sock, "POST", "/v1/domains/" + p.name + "/migrate",
                      R"({"to":")" + (to.empty() ? p.destination->sock : to) +
                          R"(","copy_storage":true)" + extra + "}",
                      120s);
  REQUIRE(r);
  return *r;
}

// The guest moved with its disk copied to `copy`: the destination's QEMU holds the copy and not
// the source's image, and every count the writer wrote (start_writer), before the copy, during it
// and after the switch-over, is in the copy, so none written at the source while the mirror ran
// was lost.
void check_copied(Pair& p, const std::string& copy, long written_before) {
  auto there = p.destination->domain(p.name);
  const pid_t pid = static_cast<pid_t>(there.at("pid").to_number<int>());
  CHECK(fds_naming(pid, copy) > 0);
  CHECK(fds_naming(pid, p.images + "/d0.img") == 0);
  const auto disks = there.at("devices").at("disks").as_array();
  REQUIRE(disks.size() == 1);
  CHECK(disks[0].at("path").as_string() == copy);
  auto fd = qbtest::connect_retry(std::string(there.at("console").as_string()), 10s);
  REQUIRE(fd);
  qbtest::GuestConsole moved_con(std::move(fd));
  run_in(moved_con, "kill $(cat /tmp/writer) 2>/dev/null; sync");
  const long last = written(moved_con);
  INFO("written before the migration: " << written_before << ", in all: " << last);
  CHECK(last > written_before);
  const std::string bytes = slurp(copy);
  REQUIRE(bytes.size() == 1 << 20);
  CHECK(bytes.substr(8 * 512, 20) == "QB-WRITTEN-AT-SOURCE");
  long missing = 0;
  for (long i = 1; i <= last; ++i) {
    char want[24];
    std::snprintf(want, sizeof(want), "%08ld", i);
    if (bytes.compare(static_cast<std::size_t>(kWriterFirstSector + i) * 512, 8, want) != 0)
      ++missing;
  }
  CHECK(missing == 0);
  // No NBD listener is left at the destination.
  CHECK(std::filesystem::is_empty(p.destination->dir / "run/migrate"));
}

// Marks sector 8, starts the writer, and migrates to `to` with d0 copied into a blank image of
// its own; then checks that the guest moved and that every count it wrote is in the copy.
void migrate_while_writing(Pair& p, const std::string& to) {
  const std::string copy = blank_image(p, "d0-copy.img", 1 << 20);
  auto& con = *p.guest.console;
  run_in(con,
         "echo QB-WRITTEN-AT-SOURCE | dd of=/dev/vda bs=512 seek=8 conv=notrunc,fsync 2>/dev/null");
  start_writer(con);
  REQUIRE(wait_for([&] { return written(con) > 0; }, 30s));
  const long before = counter(con);
  const long written_before = written(con);
  auto moved = migrate_copying(p, R"(,"disk_paths":{"d0":")" + copy + R"("})", to);
  check_moved(p, to, moved, before);
  check_copied(p, copy, written_before);
}

}  // namespace

TEST_CASE(
    "with copy_storage the disk is mirrored into the destination's own image while the "
    "guest writes to it",
    "[api][migrate][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  Pair p(kCopyBase, "cps");
  migrate_while_writing(p, p.destination->sock);
}

TEST_CASE(
    "copy_storage refuses a destination image that is the source's own or does not fit "
    "and the guest runs on at the source",
    "[api][migrate][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  Pair p(kCopyRefusedBase, "cpr");
  // On one host, the same path is the same image.
  auto same = migrate_copying(p, "");
  INFO(same.body);
  CHECK(same.status == 400);
  CHECK(same.json.at("error").at("field").as_string() == "disk_paths.d0");
  p.check_nothing_at_destination();
  // A disk the domain does not have.
  auto unknown = migrate_copying(p, R"(,"disk_paths":{"zz":"/nowhere.img"})");
  CHECK(unknown.status == 400);
  CHECK(unknown.json.at("error").at("field").as_string() == "disk_paths.zz");
  // A live update keeps its disks.
  auto local = http::call(p.source->sock, "POST", "/v1/domains/" + p.name + "/migrate",
                          R"({"to":"local","copy_storage":true})");
  REQUIRE(local);
  CHECK(local->status == 400);
  CHECK(local->json.at("error").at("field").as_string() == "copy_storage");
  // An image smaller than the disk: QEMU's mirror refuses it, and everything is undone.
  const std::string small = blank_image(p, "d0-small.img", 1 << 19);
  auto misfit = migrate_copying(p, R"(,"disk_paths":{"d0":")" + small + R"("})");
  INFO(misfit.body);
  CHECK(misfit.status >= 400);
  CHECK(misfit.json.at("error").at("field").as_string() == "disk_paths.d0");
  CHECK(misfit.json.at("error").at("message").as_string().find("different sizes") !=
        std::string::npos);
  p.check_runs_at_source();
  p.check_nothing_at_destination();
  CHECK(std::filesystem::is_empty(p.destination->dir / "run/migrate"));
  // And the guest can still migrate with its disk copied.
  const std::string copy = blank_image(p, "d0-copy.img", 1 << 20);
  const long before = counter(*p.guest.console);
  run_in(*p.guest.console,
         "echo QB-WRITTEN-AT-SOURCE | dd of=/dev/vda bs=512 seek=8 conv=notrunc,fsync 2>/dev/null");
  auto moved = migrate_copying(p, R"(,"disk_paths":{"d0":")" + copy + R"("})");
  check_moved(p, p.destination->sock, moved, before);
}

TEST_CASE(
    "a migration cancelled while it copies the disks leaves the guest running at the source "
    "with no mirror left",
    "[api][migrate][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  Pair p(kCopyCancelBase, "cpc");
  // A second disk large enough that its copy is still running when the cancel comes.
  const std::string big = p.images + "/d1.img";
  {
    std::ofstream out(big, std::ios::binary);
    std::string chunk(1 << 20, '\0');
    for (int i = 0; i < 256; ++i) {
      for (std::size_t j = 0; j < chunk.size(); j += 4096)
        chunk[j] = static_cast<char>(i + j / 4096 + 1);
      out.write(chunk.data(), static_cast<std::streamsize>(chunk.size()));
    }
  }
  auto added = http::call(p.source->sock, "POST", "/v1/domains/" + p.name + "/disks",
                          R"({"id":"d1","path":")" + big + R"(","bus":"virtio"})", 60s);
  REQUIRE(added);
  INFO(added->body);
  REQUIRE(added->status == 201);
  const std::string copy0 = blank_image(p, "d0-copy.img", 1 << 20);
  const std::string copy1 = blank_image(p, "d1-copy.img", 256 << 20);
  std::optional<http::Reply> answer;
  std::thread asker([&] {
    answer = http::call(p.source->sock, "POST", "/v1/domains/" + p.name + "/migrate",
                        R"({"to":")" + p.destination->sock +
                            R"(","copy_storage":true,"disk_paths":{"d0":")" + copy0 +
                            R"(","d1":")" + copy1 + R"("}})",
                        120s);
  });
  // The mirrors are QEMU's block jobs: cancel once they run.
  const bool copying = wait_for(
      [&] { return !qmp_over_http(p.source->sock, p.name, "query-block-jobs").as_array().empty(); },
      60s);
  auto cancelled = http::call(p.source->sock, "DELETE", "/v1/domains/" + p.name + "/job");
  asker.join();
  REQUIRE(copying);
  REQUIRE(cancelled);
  CHECK(cancelled->status == 202);
  REQUIRE(answer);
  INFO(answer->body);
  CHECK(answer->status >= 400);
  CHECK(answer->json.at("error").at("code").as_string() == "cancelled");
  p.check_runs_at_source();
  p.check_nothing_at_destination();
  CHECK(std::filesystem::is_empty(p.destination->dir / "run/migrate"));
  // Nothing of the copy is left in the source's QEMU: no job, no NBD node, and its next
  // migration switches over without pausing for mirrors.
  CHECK(qmp_over_http(p.source->sock, p.name, "query-block-jobs").as_array().empty());
  const auto nodes = qmp_over_http(p.source->sock, p.name, "query-named-block-nodes");
  for (const auto& node : nodes.as_array()) {
    CHECK_FALSE(std::string(node.at("node-name").as_string()).ends_with("-nbd"));
  }
  const auto caps = qmp_over_http(p.source->sock, p.name, "query-migrate-capabilities");
  for (const auto& cap : caps.as_array()) {
    if (cap.at("capability").as_string() == "pause-before-switchover")
      CHECK_FALSE(cap.at("state").as_bool());
  }
}

TEST_CASE("qbrokerd SIGKILLed mid-copy at the source: the guest runs in exactly one place",
          "[api][migrate][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  Pair p(kCopyKilledBase, "cpk");
  const std::string copy = blank_image(p, "d0-copy.img", 1 << 20);
  start_writer(*p.guest.console);
  std::thread asker([&] {
    http::call(p.source->sock, "POST", "/v1/domains/" + p.name + "/migrate",
               R"({"to":")" + p.destination->sock +
                   R"(","copy_storage":true,"disk_paths":{"d0":")" + copy + R"("}})",
               120s);
  });
  // The destination answers once both its listeners exist; the one-time listener goes when the
  // source has connected to it, the NBD listener only once the state has arrived. The source
  // copies the disk from then on.
  const auto dir = p.destination->dir / "run/migrate";
  auto has = [&](const std::string& ext) {
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
      if (e.path().extension() == ext) return true;
    }
    return false;
  };
  REQUIRE(wait_for(
      [&] {
        return slurp(p.destination->dir / "log").find("POST /v1/migrations 201") !=
               std::string::npos;
      },
      60s));
  REQUIRE(wait_for([&] { return !has(".sock"); }, 60s));
  p.source->kill_during(p.name, "migrate");
  asker.join();
  check_one_place_after_restart(p);
}

// ---- Between hosts: TCP between the brokers, TLS unless both say --insecure-migration --------

namespace {

using Certs = qbtest::TestCerts;

// A port nothing listens on now.
int free_port() {
  fdpass::UniqueFd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0);
  socklen_t len = sizeof(a);
  REQUIRE(::getsockname(s.get(), reinterpret_cast<sockaddr*>(&a), &len) == 0);
  return ntohs(a.sin_port);
}

std::vector<std::string> plus(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Where a destination broker listens between hosts: a free loopback port, as --migration-listen
// takes it and as a source's `to` names it.
struct Listen {
  std::string address = "127.0.0.1:" + std::to_string(free_port());
  std::string to = "tcp://" + address;
  // A destination broker's arguments: `args`, then --migration-listen.
  std::vector<std::string> destination(std::vector<std::string> args) const {
    return plus(std::move(args), {"--migration-listen", address});
  }
};

// One site's certificates, which both brokers present.
struct Site {
  qbtest::TempDir pki;
  Certs certs{pki, "site"};
};

}  // namespace

TEST_CASE(
    "a running guest migrates to a broker on another host over TLS with certificates on "
    "both ends",
    "[api][migrate][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  Site site;
  const Listen at;
  const std::string& to = at.to;
  Pair p(kTlsBase, "tls", site.certs.args(), at.destination(site.certs.args()));
  auto& con = *p.guest.console;
  run_in(con,
         "echo QB-WRITTEN-AT-SOURCE | dd of=/dev/vda bs=512 seek=8 conv=notrunc,fsync 2>/dev/null");
  const long before = counter(con);
  auto moved = migrate(*p.source, p.name, to);
  check_moved(p, to, moved, before);
  CHECK(slurp(p.destination->dir / "log").find("over TLS") != std::string::npos);
}

TEST_CASE("a broker on another host refuses a source whose certificate its CA did not sign",
          "[api][migrate][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  Site sites;
  const Certs& site = sites.certs;
  Certs rogue(sites.pki, "rogue");
  const Listen at;
  // The source trusts the destination's CA, but its own certificate is of another.
  Pair p(kRogueBase, "rog",
         {"--migration-cert", rogue.cert, "--migration-key", rogue.key, "--migration-ca", site.ca},
         at.destination(site.args()));
  auto refused = migrate(*p.source, p.name, at.to);
  INFO(refused.body);
  CHECK(refused.status >= 400);
  CHECK(refused.json.at("error").at("field").as_string() == "to");
  CHECK(refused.json.at("error").at("message").as_string().find(
            "refused this broker's certificate") != std::string::npos);
  p.check_runs_at_source();
  p.check_nothing_at_destination();
  CHECK(slurp(p.destination->dir / "log").find("certificate") != std::string::npos);

  // A destination whose certificate the source's CA did not sign is refused by the source.
  const Listen other_at;
  Broker other(kRogueBase + 20, p.images, other_at.destination(rogue.args()));
  auto unverified = migrate(*p.source, p.name, other_at.to);
  INFO(unverified.body);
  CHECK(unverified.status >= 400);
  CHECK(unverified.json.at("error").at("field").as_string() == "to");
  CHECK(unverified.json.at("error").at("message").as_string().find("certificate verify failed") !=
        std::string::npos);
  p.check_runs_at_source();
  CHECK(other.domain(p.name).is_null());
}

TEST_CASE(
    "between hosts plain TCP needs --insecure-migration on both brokers and then the "
    "brokers relay the stream with splice",
    "[api][migrate][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  const Listen at;
  const std::string& to = at.to;
  Pair p(kPlainBase, "pln", {"--insecure-migration"}, at.destination({"--insecure-migration"}));
  auto& con = *p.guest.console;
  run_in(con,
         "echo QB-WRITTEN-AT-SOURCE | dd of=/dev/vda bs=512 seek=8 conv=notrunc,fsync 2>/dev/null");
  const long before = counter(con);
  auto moved = migrate(*p.source, p.name, to);
  check_moved(p, to, moved, before);
  CHECK(slurp(p.destination->dir / "log").find("over plain TCP") != std::string::npos);
}

TEST_CASE(
    "a destination QEMU on another host that dies during the migration leaves the guest "
    "running at the source",
    "[api][migrate][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  Site site;
  const Listen at;
  Pair p(kTlsDyingBase, "tdie", site.certs.args(), at.destination(site.certs.args()));
  migrate_while_destination_dies(p, at.to);
}

TEST_CASE(
    "between hosts copy_storage mirrors the disk over links of its own while the guest "
    "writes to it",
    "[api][migrate][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  Site site;
  const Listen at;
  std::unique_ptr<Pair> pair;
  std::string over;
  SECTION("over TLS") {
    pair = std::make_unique<Pair>(kCopyTlsBase, "cpt", site.certs.args(),
                                  at.destination(site.certs.args()));
    over = "over TLS";
  }
  SECTION("over plain TCP") {
    pair = std::make_unique<Pair>(kCopyPlainBase, "cpp",
                                  std::vector<std::string>{"--insecure-migration"},
                                  at.destination({"--insecure-migration"}));
    over = "over plain TCP";
  }
  Pair& p = *pair;
  migrate_while_writing(p, at.to);
  CHECK(slurp(p.destination->dir / "log").find(over) != std::string::npos);
}

namespace {

std::string migration_status(const Broker& b, const std::string& name) {
  auto r =
      http::call(b.sock, "POST", "/v1/domains/" + name + "/qmp", R"({"execute":"query-migrate"})");
  if (!r || r->status != 200) return {};
  const auto* st = r->json.at("return").as_object().if_contains("status");
  return st != nullptr && st->is_string() ? std::string(st->as_string()) : std::string();
}

}  // namespace

TEST_CASE(
    "qbrokerd SIGKILLed after its QEMU sent all the state: restarted it asks the destination "
    "and the guest runs only there",
    "[api][migrate][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  Site site;
  const Listen at;
  std::unique_ptr<Pair> pair;
  std::string to;
  // The destination broker stops before it can say that the guest runs there, and the source
  // dies waiting for its word. On one host the QEMUs stream to each other: the destination
  // broker stops once its QEMU takes the stream, and the source dies once its QEMU has sent all.
  // Between hosts the brokers relay the stream: the destination broker stops once its QEMU has
  // it all. Seen that late, it may have said so already, and the source then leaves as it
  // would have: the guest still runs once, but the restarted source has nothing to ask.
  bool relayed = false;
  SECTION("on one host") {
    pair = std::make_unique<Pair>(kWentBase, "wnt");
    to = pair->destination->sock;
  }
  SECTION("between hosts") {
    relayed = true;
    pair = std::make_unique<Pair>(kWentTlsBase, "wnh", site.certs.args(),
                                  at.destination(site.certs.args()));
    to = at.to;
  }
  Pair& p = *pair;
  std::thread asker([&] {
    http::call(p.source->sock, "POST", "/v1/domains/" + p.name + "/migrate",
               R"({"to":")" + to + R"("})", 120s);
  });
  std::string status;
  CHECK(wait_for(
      [&] {
        status = migration_status(*p.destination, p.name);
        return status == "completed" || (!relayed && (status == "setup" || status == "active"));
      },
      60s));
  ::kill(p.destination->daemon.pid, SIGSTOP);
  const bool in_time = status != "completed";
  INFO("the destination's QEMU was " << status << " when its broker stopped");
  if (in_time)
    CHECK(wait_for([&] { return migration_status(*p.source, p.name) == "completed"; }, 60s));
  ::kill(p.source->daemon.pid, SIGKILL);
  CHECK(p.source->daemon.wait(10s) == 128 + SIGKILL);
  p.source->daemon.pid = -1;
  ::kill(p.destination->daemon.pid, SIGCONT);
  asker.join();
  p.source->start();
  REQUIRE(wait_adopted(p.source->sock, 60s));
  // Exactly once, running: the restarted source asked, and tore its paused copy down by uid.
  CHECK(wait_for([&] { return p.source->domain(p.name).is_null(); }, 60s));
  CHECK(wait_for(
      [&] { return broker::lifecycle::live_processes_of_uid("/proc", p.guest.uid) == 0; }, 10s));
  auto there = p.destination->domain(p.name);
  REQUIRE(there.is_object());
  CHECK(there.at("state").as_string() == "running");
  const bool asked = slurp(p.source->dir / "log").find("had arrived there") != std::string::npos;
  if (in_time) CHECK(asked);
  INFO("the restarted source asked the destination: " << asked);
}
