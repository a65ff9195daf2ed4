// qbrokerctl's completion logic (ctl/complete.cpp) with a fake domain list: what it offers after
// each kind of word, and which socket it asks.
#include "ctl/complete.hpp"

#include <algorithm>
#include <catch2/catch.hpp>
#include <string>
#include <vector>

namespace {

struct Fake {
  std::vector<std::string> asked;  // the sockets the completion asked for domain names
  qbctl::Completion complete(std::vector<std::string> words, const std::string& env = {}) {
    return qbctl::complete(words, env, [this](const std::string& socket) {
      asked.push_back(socket);
      return std::vector<std::string>{"vm1", "vm2"};
    });
  }
};

bool has(const qbctl::Completion& c, const std::string& word) {
  return std::find(c.words.begin(), c.words.end(), word) != c.words.end();
}

}  // namespace

TEST_CASE("completion offers commands, then a group's verbs, then domains", "[api][ctl]") {
  Fake f;
  auto first = f.complete({""});
  CHECK(has(first, "create"));
  CHECK(has(first, "cdrom"));
  CHECK(has(first, "domain"));
  CHECK_FALSE(has(first, "cdrom insert"));
  CHECK(f.complete({"cdrom", ""}).words == std::vector<std::string>{"insert", "eject"});
  CHECK(has(f.complete({"domain", ""}), "list"));
  CHECK_FALSE(has(f.complete({"domain", ""}), "migrate"));  // no "domain migrate"
  CHECK(f.complete({"show", ""}).words == std::vector<std::string>{"vm1", "vm2"});
  CHECK(f.complete({"domain", "show", ""}).words == std::vector<std::string>{"vm1", "vm2"});
  CHECK(f.complete({"create", ""}).words.empty());
  CHECK(f.complete({"show", "vm1", ""}).words.empty());  // only one argument
  CHECK(f.asked ==
        std::vector<std::string>{"/run/qbroker/qbroker.sock", "/run/qbroker/qbroker.sock"});
}

TEST_CASE("completion asks the socket the command line or the environment names", "[api][ctl]") {
  Fake f;
  f.complete({"--socket", "/a.sock", "show", ""});
  f.complete({"show", "--socket=/b.sock", ""});
  f.complete({"events", "--domain", ""}, "/env.sock");
  CHECK(f.asked == std::vector<std::string>{"/a.sock", "/b.sock", "/env.sock"});
}

TEST_CASE("completion offers flags, a flag's choices, and files for paths", "[api][ctl]") {
  Fake f;
  auto flags = f.complete({"disk", "add", "vm1", "-"});
  CHECK(has(flags, "--format"));
  CHECK(has(flags, "--json"));  // a global flag, taken anywhere
  CHECK_FALSE(has(flags, "--memory"));
  CHECK(f.complete({"create", "x", "--machine", ""}).words ==
        std::vector<std::string>{"q35", "none"});
  CHECK(f.complete({"create", "x", "--accel", ""}).words ==
        std::vector<std::string>{"auto", "kvm", "tcg"});
  CHECK(f.complete({"create", "x", "--kernel", ""}).files);
  CHECK(f.complete({"--socket", ""}).files);
  auto path = f.complete({"cdrom", "insert", "vm1", "cd0", ""});
  CHECK(path.files);
  CHECK(path.words.empty());
  CHECK(f.complete({"migrate", "vm1", ""}).words == std::vector<std::string>{"local"});
  // The value of a flag is not an argument: after "--format raw", NAME is still the next one.
  CHECK(f.complete({"disk", "add", "--format", "raw", ""}).words ==
        std::vector<std::string>{"vm1", "vm2"});
  CHECK(f.asked.size() == 1);
}
