// qbrokerctl's bash completion (ctl/qbrokerctl.bash) driven in bash as the shell drives it
// (COMP_WORDS, COMP_CWORD, then COMPREPLY), against a running qbrokerd whose domains it completes.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <set>
#include <string>
#include <vector>

#include "daemon_support.hpp"
#include "support/support.hpp"

using namespace std::chrono_literals;
using namespace qbtest::daemon;

namespace {

constexpr uid_t kCompletion = 3'111'000;

std::string quoted(const std::string& word) {
  std::string out = "'";
  for (char c : word) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// What the completion offers for the last of `words` (the word being typed), as a sorted set.
std::set<std::string> offered(const std::vector<std::string>& words) {
  std::string line = "source " + quoted(QB_SOURCE_DIR "/ctl/qbrokerctl.bash") + "; COMP_WORDS=(" +
                     quoted(QBROKERCTL);
  for (const auto& w : words) line += " " + quoted(w);
  line += "); COMP_CWORD=" + std::to_string(words.size()) +
          "; _qbrokerctl; printf '%s\\n' \"${COMPREPLY[@]}\"";
  std::string command = "bash --norc --noprofile -c " + quoted(line);
  FILE* p = ::popen(command.c_str(), "r");
  REQUIRE(p != nullptr);
  std::set<std::string> out;
  char buf[4096];
  while (std::fgets(buf, sizeof buf, p) != nullptr) {
    std::string s(buf);
    if (!s.empty() && s.back() == '\n') s.pop_back();
    if (!s.empty()) out.insert(s);
  }
  REQUIRE(::pclose(p) == 0);
  return out;
}

}  // namespace

TEST_CASE("bash completes qbrokerctl's commands, flags and the broker's domain names",
          "[api][ctl][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::TempDir dir;
  std::string sock = dir / "qbroker.sock";
  auto args = daemon_args(dir, kCompletion);
  args.insert(args.end(), {"--socket", sock});
  Child d{spawn(args, dir / "log")};
  REQUIRE(wait_for_socket(sock, 20s));
  const std::string name = "compl-" + std::to_string(::getpid());
  auto created =
      ctl(sock, {"create", name, "--machine", "none", "--memory", "16", "--pci-slots", "0"});
  INFO(created.err);
  REQUIRE(created.status == 0);

  using S = std::set<std::string>;
  CHECK(offered({"--socket", sock, "sh"}) == S{"show", "shutdown"});
  CHECK(offered({"--socket", sock, "show", ""}) == S{name});
  CHECK(offered({"--socket", sock, "destroy", "co"}) == S{name});
  CHECK(offered({"--socket", sock, "events", "--domain", ""}) == S{name});
  // The socket can come after the command, as the parser allows.
  CHECK(offered({"cdrom", "insert", "--socket", sock, ""}) == S{name});
  // A new domain's name is not completed from the existing ones.
  CHECK(offered({"--socket", sock, "create", ""}).empty());
  CHECK(offered({"disk", ""}) == S{"add", "remove"});
  CHECK(offered({"disk", "add", "vm", "d0", "/x", "--f"}) == S{"--format"});
  CHECK(offered({"disk", "add", "vm", "--bus", ""}) == S{"scsi", "virtio"});
  CHECK(offered({"--js"}) == S{"--json"});
  // No broker on the socket: no names, and no error on the terminal.
  CHECK(offered({"--socket", dir / "nowhere.sock", "show", ""}).empty());
  // A path is completed from the file system.
  CHECK(offered({"--socket", sock, "save", name, dir / "qbroker.so"}) == S{sock});

  REQUIRE(ctl(sock, {"destroy", name}).status == 0);
  ::kill(d.pid, SIGTERM);
  CHECK(d.wait(10s) == 0);
  remove_cgroup_base(kCompletion);
}
