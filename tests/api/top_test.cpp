// qbrokerctl top on a terminal: run in a detached tmux session against qbrokerd with a running
// domain, read from the screen (capture-pane), and quit with `q` and with Ctrl-C.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <string>

#include "daemon_support.hpp"
#include "http_client.hpp"
#include "support/qemu.hpp"
#include "support/support.hpp"

using namespace std::chrono_literals;
namespace http = qbtest::http;
using namespace qbtest::daemon;

namespace {

constexpr uid_t kTop = 3'110'010;

struct Shell {
  int status = -1;
  std::string out;
};

Shell sh(const std::string& command) {
  Shell r;
  FILE* p = ::popen((command + " 2>&1").c_str(), "r");
  if (p == nullptr) return r;
  char buf[1024];
  while (std::fgets(buf, sizeof(buf), p) != nullptr) r.out += buf;
  int status = ::pclose(p);
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// A tmux server of the test's own (-L), so no one else's sessions are touched.
struct Tmux {
  std::string server = "qbtop" + std::to_string(::getpid());
  std::string tmux() const { return "tmux -L " + server + " "; }
  void start(const std::string& session, const std::string& command) const {
    auto r = sh(tmux() + "new-session -d -s " + session + " -x 150 -y 40 '" + command + "'");
    INFO(r.out);
    REQUIRE(r.status == 0);
  }
  std::string screen(const std::string& session) const {
    return sh(tmux() + "capture-pane -p -t " + session).out;
  }
  bool running(const std::string& session) const {
    return sh(tmux() + "has-session -t " + session).status == 0;
  }
  ~Tmux() { sh(tmux() + "kill-server"); }
};

// The screen line that shows `name`, or empty.
std::string row_of(const std::string& screen, const std::string& name) {
  auto at = screen.find("\n" + name + " ");
  if (at == std::string::npos) return {};
  return screen.substr(at + 1, screen.find('\n', at + 1) - at - 1);
}

}  // namespace

TEST_CASE("qbrokerctl top shows a running domain on a terminal and quits on q and on Ctrl-C",
          "[api][ctl][top][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  INFO("tmux is missing: scripts/setup.sh installs it");
  REQUIRE(sh("command -v tmux").status == 0);
  qbtest::TempDir dir;
  const std::string sock = dir / "qbroker.sock";
  const std::string name = "top" + std::to_string(::getpid());
  auto args = daemon_args(dir, kTop);
  args.insert(args.end(), {"--socket", sock});
  Child d{spawn(args, dir / "log")};
  REQUIRE(wait_for_socket(sock, 20s));
  auto created = http::call(sock, "POST", "/v1/domains",
                            R"({"name":")" + name + R"(","memory_mib":128,"kernel":")" +
                                qbtest::guest_kernel() + R"(","initrd":")" +
                                qbtest::guest_initrd() + R"("})",
                            60s);
  REQUIRE(created);
  REQUIRE(created->status == 201);
  const std::string uid = std::to_string(created->json.at("uid").to_number<uid_t>());

  Tmux tmux;
  const std::string top = std::string(QBROKERCTL) + " --socket " + sock + " top --interval 0.2";
  tmux.start("q", top);
  // The row fills in once a second refresh gives the CPU a percentage.
  std::string row;
  CHECK(wait_for([&] {
    row = row_of(tmux.screen("q"), name);
    return row.find('%') != std::string::npos;
  }, 10s));
  INFO(tmux.screen("q"));
  CHECK(row.find("running") != std::string::npos);
  CHECK(row.find(uid) != std::string::npos);
  CHECK(row.find("MiB") != std::string::npos);
  CHECK(tmux.screen("q").find("NAME") != std::string::npos);
  CHECK(tmux.running("q"));
  sh(tmux.tmux() + "send-keys -t q q");
  CHECK(wait_for([&] { return !tmux.running("q"); }, 5s));

  tmux.start("c", top);
  CHECK(wait_for([&] { return !row_of(tmux.screen("c"), name).empty(); }, 10s));
  sh(tmux.tmux() + "send-keys -t c C-c");
  CHECK(wait_for([&] { return !tmux.running("c"); }, 5s));

  // Not a terminal: each refresh printed after the last, no escape sequences.
  auto piped = sh(std::string(QBROKERCTL) + " --socket " + sock + " top --interval 0.1 --count 2 | cat");
  INFO(piped.out);
  CHECK(piped.status == 0);
  CHECK(piped.out.find('\x1b') == std::string::npos);
  CHECK(piped.out.find("qbrokerctl top") != piped.out.rfind("qbrokerctl top"));
  CHECK(!row_of(piped.out, name).empty());

  auto destroyed = http::call(sock, "DELETE", "/v1/domains/" + name, {}, 30s);
  REQUIRE(destroyed);
  CHECK(destroyed->status == 200);
  ::kill(d.pid, SIGTERM);
  CHECK(d.wait(10s) == 0);
  remove_cgroup_base(kTop);
}
