// qbrokerd and qbrokerctl as programs: started without systemd and with socket activation +
// sd_notify, driven through qbrokerctl, stopped with SIGTERM (domains keep running) and started
// again (they are re-adopted), and SIGKILLed in the middle of a hotplug and of an unplug.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>

#include <boost/json.hpp>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "broker/lifecycle/cgroup.hpp"
#include "broker/lifecycle/proc.hpp"
#include "fdpass/devices.hpp"
#include "daemon_support.hpp"
#include "http_client.hpp"
#include "support/qemu.hpp"
#include "support/support.hpp"

using namespace std::chrono_literals;
namespace http = qbtest::http;
namespace json = boost::json;
using namespace qbtest::daemon;

namespace {

constexpr uid_t kPlain = 3'104'300;
constexpr uid_t kActivated = 3'104'400;
constexpr uid_t kKilled = 3'104'500;
constexpr uid_t kKilledUnplug = 3'104'600;
constexpr uid_t kKilledSave = 3'108'080;
constexpr uid_t kKilledCreate = 3'104'700;
constexpr uid_t kStoppedAtStart = 3'104'800;
constexpr uid_t kSocketFile = 3'107'080;

}  // namespace

TEST_CASE("qbrokerd refuses --xen without a hypervisor, and bad flags, clearly", "[api][daemon]") {
  qbtest::TempDir dir;
  Child d{spawn({QBROKERD, "--xen", "--xen-dev", dir / "xen", "--socket", dir / "s.sock"}, dir / "log")};
  CHECK(d.wait(10s) == 1);
  const std::string said = slurp(dir / "log");
  CHECK(said.find("--xen: " + (dir / "xen") + " does not exist: this host runs no Xen hypervisor") !=
        std::string::npos);
  // One message, and nothing was started or bound.
  CHECK(std::count(said.begin(), said.end(), '\n') == 1);
  CHECK(::access((dir / "s.sock").c_str(), F_OK) != 0);
  Child bad{spawn({QBROKERD, "--max-connections", "0"}, dir / "log2")};
  CHECK(bad.wait(10s) == 2);
  CHECK(slurp(dir / "log2").find("--max-connections") != std::string::npos);
  Child help{spawn({QBROKERD, "--help"}, dir / "log3")};
  CHECK(help.wait(10s) == 0);
  CHECK(slurp(dir / "log3").find("--uid-range") != std::string::npos);
}

TEST_CASE("qbrokerd refuses a QEMU install that is not root's alone, naming the option",
          "[api][daemon][privileged]") {
  QB_REQUIRE_ROOT();
  qbtest::TempDir dir;
  REQUIRE(::chmod(dir.path().c_str(), 0755) == 0);
  const std::string qemu = dir / "qemu";
  qbtest::write_file(qemu, "#!/bin/sh\nexit 0\n");
  REQUIRE(::chmod(qemu.c_str(), 0777) == 0);
  Child writable{spawn({QBROKERD, "--socket", dir / "s.sock", "--state-dir", dir / "st",
                        "--run-dir", dir / "run", "--qemu", qemu},
                       dir / "log")};
  CHECK(writable.wait(10s) == 1);
  auto said = slurp(dir / "log");
  CHECK(said.find("--qemu") != std::string::npos);
  CHECK(said.find(qemu + " is writable by its group or by others") != std::string::npos);
  CHECK(::access((dir / "s.sock").c_str(), F_OK) != 0);  // refused before it served anything

  Child relative{spawn({QBROKERD, "--qemu-datadir", "share/qemu"}, dir / "log2")};
  CHECK(relative.wait(10s) == 2);
  CHECK(slurp(dir / "log2").find("--qemu-datadir") != std::string::npos);
}

TEST_CASE(
    "qbrokerd without systemd is driven by qbrokerctl and SIGTERM leaves domains running "
    "for a restart to re-adopt",
    "[api][daemon][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::TempDir dir;
  std::string sock = dir / "qbroker.sock";
  auto args = daemon_args(dir, kPlain);
  args.insert(args.end(), {"--socket", sock});
  Child d{spawn(args, dir / "log")};
  REQUIRE(wait_for_socket(sock, 20s));
  struct stat st {};
  REQUIRE(::stat(sock.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0660);

  const std::string name = "api-d" + std::to_string(::getpid());
  auto created =
      ctl(sock, {"create", name, "--machine", "none", "--memory", "16", "--pci-slots", "0"});
  INFO(created.err);
  INFO(slurp(dir / "log"));
  REQUIRE(created.status == 0);
  CHECK(created.out.find("state:") != std::string::npos);
  auto list = ctl(sock, {"--json", "list"});
  REQUIRE(list.status == 0);
  auto domains = json::parse(list.out).at("domains").as_array();
  REQUIRE(domains.size() == 1);
  pid_t qemu = static_cast<pid_t>(domains[0].at("pid").to_number<int>());
  auto table = ctl(sock, {"list"});
  CHECK(table.out.rfind("NAME", 0) == 0);
  CHECK(table.out.find(name) != std::string::npos);

  // Errors: exit codes and the field named.
  auto missing = ctl(sock, {"show", "nope"});
  CHECK(missing.status == 3);
  CHECK(missing.err.find("no domain named 'nope'") != std::string::npos);
  auto invalid = ctl(sock, {"create", "api-dmn2", "--memory", "1"});
  CHECK(invalid.status == 5);
  CHECK(invalid.err.find("field: memory_mib (--memory)") != std::string::npos);
  auto exists = ctl(sock, {"create", name, "--machine", "none", "--memory", "16"});
  CHECK(exists.status == 4);
  auto forbidden = ctl(sock, {"qmp", name, R"({"execute":"add-fd"})"});
  CHECK(forbidden.status == 6);
  auto usage = ctl(sock, {"disk", "add", name});
  CHECK(usage.status == 2);
  CHECK(usage.err.find("ID") != std::string::npos);
  auto qmp = ctl(sock, {"qmp", name, "query-status"});
  CHECK(qmp.status == 0);
  CHECK(qmp.out.find("\"running\"") != std::string::npos);
  CHECK(ctl(dir / "nowhere.sock", {"list"}).status == 8);

  ::kill(d.pid, SIGTERM);
  CHECK(d.wait(10s) == 0);
  CHECK(slurp(dir / "log").find("domains keep running") != std::string::npos);
  CHECK(::kill(qemu, 0) == 0);  // the domain outlived the daemon

  Child again{spawn(args, dir / "log")};
  REQUIRE(wait_for_socket(sock, 20s));
  REQUIRE(wait_adopted(sock, 10s));
  auto shown = ctl(sock, {"--json", "show", name});
  REQUIRE(shown.status == 0);
  auto info = json::parse(shown.out);
  CHECK(info.at("pid") == qemu);
  CHECK(info.at("qemu_status") == "running");
  auto destroyed = ctl(sock, {"destroy", name});
  REQUIRE(destroyed.status == 0);
  CHECK(destroyed.out.find("destroyed " + name) != std::string::npos);
  CHECK(destroyed.out.find("survivors         0") != std::string::npos);
  // That QEMU was the first daemon's child, so it stays a zombie until PID 1 reaps it, and its
  // cgroup cannot be removed meanwhile. A new domain of the same name gets a cgroup of its own
  // and is not touched by the old one.
  auto recreated =
      ctl(sock, {"create", name, "--machine", "none", "--memory", "16", "--pci-slots", "0"});
  INFO(recreated.err);
  REQUIRE(recreated.status == 0);
  auto second = json::parse(ctl(sock, {"--json", "show", name}).out);
  pid_t qemu2 = static_cast<pid_t>(second.at("pid").to_number<int>());
  CHECK(qemu2 != qemu);
  auto status = ctl(sock, {"qmp", name, "query-status"});
  CHECK(status.status == 0);
  CHECK(status.out.find("\"running\"") != std::string::npos);
  CHECK(::kill(qemu2, 0) == 0);
  REQUIRE(ctl(sock, {"destroy", name}).status == 0);
  ::kill(again.pid, SIGTERM);
  CHECK(again.wait(10s) == 0);
  auto proc = "/proc/" + std::to_string(qemu);
  for (int i = 0; i < 500 && ::access(proc.c_str(), F_OK) == 0; ++i) {
    std::this_thread::sleep_for(10ms);
  }
  remove_cgroup_base(kPlain);
}

TEST_CASE("qbrokerd takes the socket systemd passes and reports readiness with sd_notify",
          "[api][daemon][privileged]") {
  QB_REQUIRE_ROOT();
  qbtest::TempDir dir;
  std::string sock = dir / "activated.sock";
  auto listener = fdpass::listen_unix(sock, 0660, 0, 0);
  REQUIRE(listener);
  // The notification socket systemd would own.
  std::string notify = dir / "notify.sock";
  fdpass::UniqueFd nfd(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, notify.c_str(), sizeof(addr.sun_path) - 1);
  REQUIRE(::bind(nfd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);

  auto args = daemon_args(dir, kActivated);
  args.insert(args.end(), {"--socket", dir / "ignored.sock"});
  Child d{spawn(args, dir / "log", listener->get(), {"NOTIFY_SOCKET=" + notify})};
  listener->reset();  // the daemon holds it now

  auto receive = [&](std::chrono::milliseconds timeout) -> std::string {
    pollfd p{nfd.get(), POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(timeout.count())) != 1) return {};
    char buf[1024];
    ssize_t n = ::recv(nfd.get(), buf, sizeof(buf), 0);
    return n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string();
  };
  auto ready = receive(20s);
  INFO(slurp(dir / "log"));
  CHECK(ready.find("READY=1") != std::string::npos);
  auto r = http::call(sock, "GET", "/v1/domains");
  REQUIRE(r);
  CHECK(r->status == 200);
  CHECK(::access((dir / "ignored.sock").c_str(), F_OK) != 0);  // --socket was not bound
  CHECK(slurp(dir / "log").find("socket passed by systemd") != std::string::npos);

  ::kill(d.pid, SIGTERM);
  CHECK(receive(10s).find("STOPPING=1") != std::string::npos);
  CHECK(d.wait(10s) == 0);
  CHECK(::access(sock.c_str(), F_OK) == 0);  // systemd's socket file is systemd's to remove
  remove_cgroup_base(kActivated);
}

TEST_CASE("SIGTERM and SIGINT remove the socket file qbrokerd bound, unless another took the path",
          "[api][daemon][privileged]") {
  QB_REQUIRE_ROOT();
  qbtest::TempDir dir;
  const std::string sock = dir / "qbroker.sock";
  auto args = daemon_args(dir, kSocketFile);
  args.insert(args.end(), {"--socket", sock});
  for (int sig : {SIGTERM, SIGINT}) {
    Child d{spawn(args, dir / "log")};
    REQUIRE(wait_for_socket(sock, 20s));
    ::kill(d.pid, sig);
    CHECK(d.wait(10s) == 0);
    INFO(slurp(dir / "log"));
    CHECK(::access(sock.c_str(), F_OK) != 0);
  }
  // A second daemon bound the path meanwhile: the first one's exit leaves it alone.
  Child first{spawn(args, dir / "log")};
  REQUIRE(wait_for_socket(sock, 20s));
  auto other = fdpass::listen_unix(sock, 0660, 0, 0);
  REQUIRE(other);
  ::kill(first.pid, SIGTERM);
  CHECK(first.wait(10s) == 0);
  CHECK(::access(sock.c_str(), F_OK) == 0);
  CHECK(slurp(dir / "log").find("is another socket now") != std::string::npos);
  remove_cgroup_base(kSocketFile);
}

TEST_CASE("qbrokerd killed in the middle of a disk hotplug: the restarted daemon rolls it back",
          "[api][daemon][privileged][qemu][restart]") {
  QB_REQUIRE_ROOT();
  KilledDaemon k(kKilled, "api-k");
  const std::string& sock = k.sock;
  const std::string& name = k.name;
  Child first{spawn(k.args, k.dir / "log")};
  REQUIRE(wait_for_socket(sock, 20s));
  k.create();
  const pid_t qemu = k.qemu;
  const std::string disk = k.disk_json();

  // QEMU stops answering, so the hotplug hangs after the broker journaled it; then the broker
  // dies without any chance to clean up.
  REQUIRE(::kill(qemu, SIGSTOP) == 0);
  auto pending = http::connect(sock);
  REQUIRE(http::send_all(
      pending.get(), http::request_text("POST", "/v1/domains/" + name + "/disks", disk, false)));
  k.kill_during(first, "disk-add");
  CHECK(http::closed_within(pending.get(), 5s));
  REQUIRE(::kill(qemu, SIGCONT) == 0);

  Child again{spawn(k.args, k.dir / "log")};
  REQUIRE(wait_for_socket(sock, 20s));
  REQUIRE(wait_adopted(sock, 10s));
  INFO(slurp(k.dir / "log"));
  CHECK(slurp(k.dir / "log").find("interrupted job disk-add d0") != std::string::npos);
  auto shown = http::call(sock, "GET", "/v1/domains/" + name);
  REQUIRE(shown);
  REQUIRE(shown->status == 200);
  CHECK(shown->json.at("pid") == qemu);
  CHECK(shown->json.at("job").is_null());
  CHECK(shown->json.at("devices").at("disks").as_array().empty());
  CHECK(slurp(k.record).find("disk-add") == std::string::npos);
  // Nothing of the half-done hotplug is left in QEMU: no fdset, no node, no device, no fd.
  k.check_no_trace_of_d0();

  // The same hotplug now goes through whole, and out again, and the daemon holds no fd more.
  const std::size_t daemon_fds = non_socket_fds(again.pid);
  auto added = http::call(sock, "POST", "/v1/domains/" + name + "/disks", disk, 30s);
  REQUIRE(added);
  INFO(added->body);
  CHECK(added->status / 100 == 2);
  CHECK(fds_naming(qemu, "d0.img") > 0);
  auto removed = http::call(sock, "DELETE", "/v1/domains/" + name + "/disks/d0", {}, 30s);
  REQUIRE(removed);
  CHECK(removed->status / 100 == 2);
  CHECK(wait_for([&] { return fds_naming(qemu, "d0.img") == 0; }, 5s));
  CHECK(non_socket_fds(again.pid) == daemon_fds);

  k.destroy_and_stop(again);
}

TEST_CASE("qbrokerd killed in the middle of a disk unplug: the restarted daemon finishes it",
          "[api][daemon][privileged][qemu][restart]") {
  QB_REQUIRE_ROOT();
  KilledDaemon k(kKilledUnplug, "api-u");
  const std::string& sock = k.sock;
  const std::string& name = k.name;
  Child first{spawn(k.args, k.dir / "log")};
  REQUIRE(wait_for_socket(sock, 20s));
  k.create(R"(,"disks":[)" + k.disk_json() + "]");
  const pid_t qemu = k.qemu;
  REQUIRE(fds_naming(qemu, "d0.img") > 0);

  // The unplug is journaled and hangs on a stopped QEMU; the broker dies.
  REQUIRE(::kill(qemu, SIGSTOP) == 0);
  auto pending = http::connect(sock);
  REQUIRE(http::send_all(
      pending.get(), http::request_text("DELETE", "/v1/domains/" + name + "/disks/d0", {}, false)));
  k.kill_during(first, "disk-remove");
  REQUIRE(::kill(qemu, SIGCONT) == 0);

  Child again{spawn(k.args, k.dir / "log")};
  REQUIRE(wait_for_socket(sock, 20s));
  REQUIRE(wait_adopted(sock, 10s));
  INFO(slurp(k.dir / "log"));
  CHECK(slurp(k.dir / "log").find("interrupted job disk-remove d0") != std::string::npos);
  // Finished, whether the dead broker's device_del reached QEMU or not: the disk is gone from the
  // domain and from QEMU, and QEMU holds no fd of the image.
  CHECK(wait_for(
      [&] {
        auto shown = http::call(sock, "GET", "/v1/domains/" + name);
        return shown && shown->status == 200 && shown->json.at("job").is_null() &&
               shown->json.at("devices").at("disks").as_array().empty();
      },
      15s));
  k.check_no_trace_of_d0();
  CHECK(slurp(k.record).find("disk-remove") == std::string::npos);

  k.destroy_and_stop(again);
}

TEST_CASE("qbrokerd killed in the middle of a create: the restarted daemon tears it down whole",
          "[api][daemon][privileged][qemu][restart]") {
  QB_REQUIRE_ROOT();
  KilledDaemon k(kKilledCreate, "api-c");
  const std::string& sock = k.sock;
  const std::string& name = k.name;
  Child first{spawn(k.args, k.dir / "log")};
  REQUIRE(wait_for_socket(sock, 20s));

  // The record names the QEMU as soon as it is spawned, with the create journaled. That QEMU is
  // stopped there, so the create cannot finish, and the broker dies.
  auto pending = http::connect(sock);
  const std::string body =
      k.create_body(R"(,"disks":[)" + k.disk_json() + R"(],"cdroms":[{"id":"cd0"}])");
  REQUIRE(http::send_all(pending.get(), http::request_text("POST", "/v1/domains", body, false)));
  json::object record;
  REQUIRE(wait_for(
      [&] {
        std::error_code ec;
        auto v = json::parse(slurp(k.record), ec);
        if (ec || !v.is_object() || !v.as_object().contains("job")) return false;
        record = v.as_object();
        return true;
      },
      20s));
  const pid_t qemu = static_cast<pid_t>(record.at("instance").at("pid").to_number<int>());
  const uid_t uid = record.at("instance").at("uid").to_number<uid_t>();
  REQUIRE(::kill(qemu, SIGSTOP) == 0);
  REQUIRE(json::parse(slurp(k.record)).at("job").at("kind") == "create");
  REQUIRE(::kill(first.pid, SIGKILL) == 0);
  CHECK(first.wait(10s) == 128 + SIGKILL);
  REQUIRE(::kill(qemu, SIGCONT) == 0);

  Child again{spawn(k.args, k.dir / "log")};
  REQUIRE(wait_for_socket(sock, 20s));
  REQUIRE(wait_adopted(sock, 10s));
  INFO(slurp(k.dir / "log"));
  CHECK(slurp(k.dir / "log").find("its create was interrupted") != std::string::npos);
  CHECK(wait_for(
      [&] {
        auto shown = http::call(sock, "GET", "/v1/domains/" + name);
        return shown && shown->status == 404;
      },
      5s));
  CHECK(wait_for(
      [&] {
        qbtest::reap_exited_children();
        return ::kill(qemu, 0) != 0;
      },
      5s));
  CHECK(broker::lifecycle::live_processes_of_uid("/proc", uid) == 0);
  CHECK_FALSE(std::filesystem::exists(k.record));

  // The name is free: the same create now goes through whole.
  k.create(R"(,"disks":[)" + k.disk_json() + R"(],"cdroms":[{"id":"cd0"}])");
  CHECK(k.qemu != qemu);
  CHECK(fds_naming(k.qemu, "d0.img") > 0);
  k.destroy_and_stop(again);
}

TEST_CASE(
    "qbrokerd serves at once after a restart while a stopped QEMU is adopted in the background",
    "[api][daemon][privileged][qemu][restart]") {
  QB_REQUIRE_ROOT();
  KilledDaemon k(kStoppedAtStart, "api-s");
  const std::string& sock = k.sock;
  Child first{spawn(k.args, k.dir / "log")};
  REQUIRE(wait_for_socket(sock, 20s));
  const std::string other = k.name + "b";
  auto made = http::call(
      sock, "POST", "/v1/domains",
      R"({"name":")" + other + R"(","machine":"none","memory_mib":16,"pci_slots":0})", 30s);
  REQUIRE(made);
  REQUIRE(made->status == 201);
  k.create();
  ::kill(first.pid, SIGTERM);
  REQUIRE(first.wait(10s) == 0);
  REQUIRE(::kill(k.qemu, SIGSTOP) == 0);

  // The API answers before the stopped QEMU has been given up on: both domains are listed at
  // once, the stopped one as adopting, and the other is adopted meanwhile.
  Child again{spawn(k.args, k.dir / "log")};
  REQUIRE(wait_for_socket(sock, 20s));
  auto state_of = [&](const std::string& name) {
    auto r = http::call(sock, "GET", "/v1/domains/" + name + "?live=false");
    REQUIRE(r);
    REQUIRE(r->status == 200);
    return std::string(r->json.at("state").as_string());
  };
  INFO(slurp(k.dir / "log"));
  CHECK(state_of(k.name) == "adopting");
  auto refused = http::call(sock, "POST", "/v1/domains/" + k.name + "/pause");
  REQUIRE(refused);
  CHECK(refused->status == 409);
  CHECK(wait_for([&] { return state_of(other) == "running"; }, 10s));
  CHECK(wait_for([&] { return state_of(k.name) == "unresponsive"; }, 10s));

  // Once it runs again, the background retry adopts it.
  REQUIRE(::kill(k.qemu, SIGCONT) == 0);
  CHECK(wait_for([&] { return state_of(k.name) == "running"; }, 10s));
  auto gone = http::call(sock, "DELETE", "/v1/domains/" + other, {}, 30s);
  REQUIRE(gone);
  CHECK(gone->status == 200);
  k.destroy_and_stop(again);
}

TEST_CASE("qbrokerd SIGKILLed mid-save or mid-restore keeps the domain once, running, with no partial file",
          "[api][daemon][privileged][qemu][save]") {
  QB_REQUIRE_ROOT();
  namespace fs = std::filesystem;
  KilledDaemon k(kKilledSave, "api-s");
  const std::string saves = k.dir / "saves";
  fs::create_directory(saves);
  k.args.insert(k.args.end(), {"--save-root", saves});
  const std::string& sock = k.sock;
  const std::string& name = k.name;
  Child first{spawn(k.args, k.dir / "log")};
  REQUIRE(wait_for_socket(sock, 20s));
  k.create(std::string(R"(,"append":")") + qbtest::kGuestAppend + "\"");
  const pid_t qemu = k.qemu;
  // A booted guest has tens of MiB to stream: the save lasts long enough to be cut.
  auto created = http::call(sock, "GET", "/v1/domains/" + name);
  REQUIRE(created);
  qbtest::GuestConsole con(
      qbtest::connect_retry(std::string(created->json.at("console").as_string()), 10s));
  REQUIRE(wait_for(
      [&] {
        auto out = con.run("true", 2s);
        return out && out->rc == 0;
      },
      120s));
  const std::string whole = saves + "/whole.state";
  auto kept = http::call(sock, "POST", "/v1/domains/" + name + "/save",
                         R"({"path":")" + whole + R"(","keep_running":true})", 60s);
  REQUIRE(kept);
  INFO(kept->body);
  REQUIRE(kept->status == 200);

  // Mid-save: QEMU is held while the stream flows, the broker dies, QEMU goes on and finds its
  // reader gone.
  const std::string partial = saves + "/.cut.state." + name + ".part";
  auto pending = http::connect(sock);
  REQUIRE(http::send_all(pending.get(), http::request_text("POST", "/v1/domains/" + name + "/save",
                                                           R"({"path":")" + saves + R"(/cut.state"})", false)));
  const bool streaming = wait_for(
      [&] {
        std::error_code ec;
        return fs::file_size(partial, ec) > (1u << 20) && !ec;
      },
      30s);
  INFO(slurp(k.dir / "log"));
  REQUIRE(streaming);
  REQUIRE(::kill(qemu, SIGSTOP) == 0);
  REQUIRE(::kill(first.pid, SIGKILL) == 0);
  CHECK(first.wait(10s) == 128 + SIGKILL);
  REQUIRE(::kill(qemu, SIGCONT) == 0);

  Child second{spawn(k.args, k.dir / "log")};
  REQUIRE(wait_for_socket(sock, 20s));
  REQUIRE(wait_adopted(sock, 10s));
  INFO(slurp(k.dir / "log"));
  CHECK(slurp(k.dir / "log").find("interrupted job save") != std::string::npos);
  auto shown = http::call(sock, "GET", "/v1/domains/" + name + "?live=true");
  REQUIRE(shown);
  REQUIRE(shown->status == 200);
  CHECK(shown->json.at("pid") == qemu);
  CHECK(shown->json.at("qemu_status") == "running");
  CHECK_FALSE(fs::exists(partial));
  CHECK_FALSE(fs::exists(saves + "/cut.state"));
  CHECK(fds_naming(qemu, saves) == 0);

  // Mid-restore: the new domain is journaled, then the broker dies; the next one tears the
  // half-restored domain down by its uid and the first runs on alone.
  const std::string copy = name + "-r";
  auto restoring = http::connect(sock);
  REQUIRE(http::send_all(restoring.get(),
                         http::request_text("POST", "/v1/domains/restore",
                                            R"({"path":")" + whole + R"(","name":")" + copy + "\"}",
                                            false)));
  const std::string copy_record = k.dir / ("run/domains/" + copy + ".json");
  REQUIRE(wait_for([&] { return slurp(copy_record).find("restore") != std::string::npos; }, 30s));
  REQUIRE(::kill(second.pid, SIGKILL) == 0);
  CHECK(second.wait(10s) == 128 + SIGKILL);

  Child third{spawn(k.args, k.dir / "log")};
  REQUIRE(wait_for_socket(sock, 20s));
  REQUIRE(wait_adopted(sock, 10s));
  auto gone = http::call(sock, "GET", "/v1/domains/" + copy);
  REQUIRE(gone);
  CHECK(gone->status == 404);
  auto listed = http::call(sock, "GET", "/v1/domains");
  REQUIRE(listed);
  CHECK(listed->json.at("domains").as_array().size() == 1);
  CHECK(std::distance(fs::directory_iterator(k.dir / "state/uids"), fs::directory_iterator{}) == 1);
  k.destroy_and_stop(third);
}
