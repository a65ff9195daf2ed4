#include "daemon_support.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "broker/lifecycle/cgroup.hpp"
#include "broker/lifecycle/proc.hpp"
#include "http_client.hpp"
#include "support/qemu.hpp"

namespace qbtest::daemon {
namespace json = boost::json;

int Child::wait(std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    int status = 0;
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) {
      pid = -1;
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    std::this_thread::sleep_for(10ms);
  }
  return -1;
}

Child::~Child() {
  if (pid > 0) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
  }
}

// fork + exec with stdout/stderr to `log`; `listen_fd` becomes fd 3 with LISTEN_FDS/LISTEN_PID.
pid_t spawn(const std::vector<std::string>& argv, const std::string& log, int listen_fd,
            const std::vector<std::string>& env) {
  pid_t pid = ::fork();
  if (pid != 0) return pid;
  // A test that dies before its Child destructors run (an abort) takes its daemon with it.
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  int out = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  ::dup2(out, 1);
  ::dup2(out, 2);
  if (listen_fd >= 0) {
    // dup2 onto itself keeps FD_CLOEXEC: clear it so fd 3 survives the exec either way.
    if (listen_fd == 3)
      ::fcntl(3, F_SETFD, 0);
    else
      ::dup2(listen_fd, 3);
    ::setenv("LISTEN_FDS", "1", 1);
    ::setenv("LISTEN_PID", std::to_string(::getpid()).c_str(), 1);
  }
  for (const auto& e : env) ::putenv(const_cast<char*>(e.c_str()));
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  ::execv(args[0], args.data());
  ::_exit(127);
}

Run ctl(const std::string& socket, std::vector<std::string> args) {
  int out[2], err[2];
  REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
  REQUIRE(::pipe2(err, O_CLOEXEC) == 0);
  pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(out[1], 1);
    ::dup2(err[1], 2);
    std::vector<std::string> argv{QBROKERCTL, "--socket", socket};
    argv.insert(argv.end(), args.begin(), args.end());
    std::vector<char*> a;
    for (auto& s : argv) a.push_back(s.data());
    a.push_back(nullptr);
    ::execv(a[0], a.data());
    ::_exit(127);
  }
  ::close(out[1]);
  ::close(err[1]);
  Run r;
  for (auto [fd, dst] : {std::pair{out[0], &r.out}, std::pair{err[0], &r.err}}) {
    char buf[4096];
    ssize_t n;
    while ((n = ::read(fd, buf, sizeof(buf))) > 0) dst->append(buf, static_cast<std::size_t>(n));
    ::close(fd);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

bool wait_for_socket(const std::string& path, std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    if (auto r = http::call(path, "GET", "/v1/version", {}, 1s); r && r->status == 200) return true;
    std::this_thread::sleep_for(20ms);
  }
  return false;
}

bool wait_adopted(const std::string& sock, std::chrono::milliseconds timeout) {
  return wait_for(
      [&] {
        auto r = http::call(sock, "GET", "/v1/domains", {}, 2s);
        if (!r || r->status != 200) return false;
        for (const auto& d : r->json.at("domains").as_array()) {
          if (d.at("state") == "adopting") return false;
        }
        return true;
      },
      timeout);
}

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// qbrokerd makes a cgroup subtree per uid range; the test's range is its own, so it goes too,
// with any domain cgroup whose removal the daemon had to defer (see the restart test below).
void remove_cgroup_base(uid_t base) {
  broker::lifecycle::CgroupManager cg({}, "qbroker-" + std::to_string(base));
  if (!cg.available()) return;
  cg.sweep("dom-", {});
  ::rmdir(cg.base().c_str());
}

std::vector<std::string> daemon_args(const TempDir& dir, uid_t base, unsigned uids) {
  std::vector<std::string> args = {QBROKERD,
          "--state-dir",
          dir / "state",
          "--run-dir",
          dir / "run",
          "--uid-range",
          std::to_string(base) + ":" + std::to_string(uids),
          "--image-root",
          guest_dir(),
          "--log-level",
          "debug",
          "--qemu",
          qemu_binary()};
  for (const auto& data : qemu_data_dirs()) args.insert(args.end(), {"--qemu-datadir", data});
  return args;
}

json::value qmp_over_http(const std::string& sock, const std::string& name,
                          const std::string& cmd) {
  auto r =
      http::call(sock, "POST", "/v1/domains/" + name + "/qmp", R"({"execute":")" + cmd + R"("})");
  REQUIRE(r);
  REQUIRE(r->status == 200);
  return r->json.at("return");
}

// The fds of `pid` that are not sockets: what a flow could leak (images, pipes, event fds),
// without the API connections that come and go.
std::size_t non_socket_fds(pid_t pid) {
  std::size_t n = 0;
  std::error_code ec;
  for (const auto& e :
       std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec)) {
    auto target = std::filesystem::read_symlink(e.path(), ec);
    if (!ec && target.string().rfind("socket:", 0) != 0) ++n;
  }
  return n;
}

// The fds of `pid` whose target contains `needle`.
int fds_naming(pid_t pid, const std::string& needle) {
  int n = 0;
  std::error_code ec;
  for (const auto& e :
       std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec)) {
    auto target = std::filesystem::read_symlink(e.path(), ec);
    if (!ec && target.string().find(needle) != std::string::npos) ++n;
  }
  return n;
}

KilledDaemon::KilledDaemon(uid_t uid_base, const std::string& prefix)
    : base(uid_base),
      name(prefix + std::to_string(::getpid())),
      record(dir / ("run/domains/" + name + ".json")),
      args(daemon_args(dir, uid_base)) {
  become_subreaper();
  std::filesystem::create_directory(images);
  write_file(images + "/d0.img", "QB-KILLED-MARKER");
  std::filesystem::resize_file(images + "/d0.img", 1 << 20);
  args.insert(args.end(), {"--socket", sock, "--image-root", images});
}
std::string KilledDaemon::disk_json() const {
  return R"({"id":"d0","path":")" + images + R"(/d0.img","bus":"scsi"})";
}
std::string KilledDaemon::create_body(const std::string& extra) const {
  return R"({"name":")" + name + R"(","memory_mib":128,"pci_slots":2,"kernel":")" + guest_kernel() +
         R"(","initrd":")" + guest_initrd() + "\"" + extra + "}";
}

void KilledDaemon::create(const std::string& extra) {
  auto created = http::call(sock, "POST", "/v1/domains", create_body(extra), 60s);
  REQUIRE(created);
  INFO(created->body);
  REQUIRE(created->status == 201);
  qemu = static_cast<pid_t>(created->json.at("pid").to_number<int>());
  uid = created->json.at("uid").to_number<uid_t>();
}

void KilledDaemon::kill_during(Child& daemon, const std::string& job) {
  CHECK(wait_for([&] { return slurp(record).find(job) != std::string::npos; }, 10s));
  std::this_thread::sleep_for(100ms);
  REQUIRE(::kill(daemon.pid, SIGKILL) == 0);
  CHECK(daemon.wait(10s) == 128 + SIGKILL);
}
void KilledDaemon::check_no_trace_of_d0() {
  CHECK(qmp_over_http(sock, name, "query-fdsets").as_array().empty());
  const auto nodes = qmp_over_http(sock, name, "query-named-block-nodes");
  for (const auto& node : nodes.as_array()) {
    CHECK(std::string(node.at("node-name").as_string()).rfind("qb-d0", 0) != 0);
  }
  CHECK(wait_for([&] { return fds_naming(qemu, "d0.img") == 0; }, 5s));
}
void KilledDaemon::destroy_and_stop(Child& daemon) {
  auto destroyed = http::call(sock, "DELETE", "/v1/domains/" + name, {}, 30s);
  REQUIRE(destroyed);
  CHECK(destroyed->status == 200);
  CHECK(wait_for(
      [&] {
        reap_exited_children();
        return ::kill(qemu, 0) != 0;
      },
      5s));
  CHECK(broker::lifecycle::live_processes_of_uid("/proc", uid) == 0);
  CHECK(std::filesystem::is_empty(dir / "state/uids"));
  CHECK(std::filesystem::is_empty(dir / "run/domains"));
  CHECK_FALSE(std::filesystem::exists(dir / ("run/qmp/" + name + ".sock")));
  CHECK(std::filesystem::is_empty(dir / "run/jail"));
  CHECK(slurp("/proc/self/mountinfo").find(dir.path()) == std::string::npos);
  ::kill(daemon.pid, SIGTERM);
  CHECK(daemon.wait(10s) == 0);
  remove_cgroup_base(base);
}

}  // namespace qbtest::daemon
