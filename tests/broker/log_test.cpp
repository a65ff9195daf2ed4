// broker/core/log: each format's record, and the journal when there is one.
#include "broker/core/log.hpp"

#include <fcntl.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/json.hpp>
#include <catch2/catch.hpp>

#include "support/support.hpp"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace json = boost::json;
using broker::log::Field;
using broker::log::Level;

TEST_CASE("a JSON record is one object on one line with the fields in lower case", "[log]") {
  const std::vector<Field> fields{{"DOMAIN", "vm1"}, {"UID", "3110001"}, {"CODE", "busy"}};
  auto line = broker::log::json_line(Level::warn, "disk \"d0\"\nadded", fields,
                                     1'700'000'000'000'042);
  REQUIRE(line.back() == '\n');
  CHECK(line.find('\n') == line.size() - 1);
  auto v = json::parse(line);
  auto& o = v.as_object();
  CHECK(o.at("level") == "warn");
  CHECK(o.at("msg") == "disk \"d0\"\nadded");
  CHECK(o.at("domain") == "vm1");
  CHECK(o.at("uid") == "3110001");
  CHECK(o.at("code") == "busy");
  CHECK(o.at("ts").as_double() == Approx(1'700'000'000.000042));
}

TEST_CASE("control characters are escaped in JSON records", "[log]") {
  auto v = json::parse(broker::log::json_line(Level::info, std::string("a\x01z\t"), {}, 0));
  CHECK(std::string(v.at("msg").as_string()) == std::string("a\x01z\t"));
}

TEST_CASE("a journal record has MESSAGE, PRIORITY, the identifier and the fields", "[log]") {
  const std::vector<Field> fields{{"DOMAIN", "vm1"}, {"JOB", "destroy"}};
  auto f = broker::log::journal_fields(Level::error, "teardown failed", fields);
  REQUIRE(f.size() == 5);
  CHECK(f[0] == "MESSAGE=teardown failed");
  CHECK(f[1] == "PRIORITY=3");
  CHECK(f[2] == "SYSLOG_IDENTIFIER=qbrokerd");
  CHECK(f[3] == "DOMAIN=vm1");
  CHECK(f[4] == "JOB=destroy");
  CHECK(broker::log::journal_fields(Level::info, "x", {})[1] == "PRIORITY=6");
}

TEST_CASE("a text record is one line with the fields after the message", "[log]") {
  const std::vector<Field> fields{{"UID", "0"}};
  CHECK(broker::log::text_line(Level::info, "GET /v1/version 200", fields) ==
        "qbroker[info] GET /v1/version 200 UID=0\n");
}

TEST_CASE("stderr is the journal only when JOURNAL_STREAM names its device and inode", "[log]") {
  struct stat st {};
  REQUIRE(::fstat(STDERR_FILENO, &st) == 0);
  const std::string mine = std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino);
  const char* old = std::getenv("JOURNAL_STREAM");
  const std::string saved = old != nullptr ? old : "";
  ::setenv("JOURNAL_STREAM", mine.c_str(), 1);
  CHECK(broker::log::stderr_is_journal());
  ::setenv("JOURNAL_STREAM", (std::to_string(st.st_dev) + ":1").c_str(), 1);
  CHECK_FALSE(broker::log::stderr_is_journal());  // stderr was redirected since
  ::setenv("JOURNAL_STREAM", "garbage", 1);
  CHECK_FALSE(broker::log::stderr_is_journal());
  ::unsetenv("JOURNAL_STREAM");
  CHECK_FALSE(broker::log::stderr_is_journal());
  if (old != nullptr) ::setenv("JOURNAL_STREAM", saved.c_str(), 1);
}

TEST_CASE("a record reaches the journal when one listens", "[log]") {
  if (::access("/run/systemd/journal/socket", W_OK) != 0) {
    WARN("skipped: no journal socket at /run/systemd/journal/socket (no systemd-journald here)");
    return;
  }
  const std::vector<Field> fields{{"CODE", "test"}};
  CHECK(broker::log::send_to_journal(
      broker::log::journal_fields(Level::debug, "qbroker log_test", fields)));
}

namespace {

// In a mount namespace of its own with a tmpfs on /run, listens where journald does, sends one
// record, and returns what arrived (or why nothing did). Runs in a child: the namespace and the
// socket go with it.
std::string journal_roundtrip() {
  if (::unshare(CLONE_NEWNS) != 0) return "unshare: " + std::string(std::strerror(errno));
  if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) return "mount private";
  if (::mount("tmpfs", "/run", "tmpfs", 0, "size=1m") != 0) return "mount tmpfs on /run";
  ::mkdir("/run/systemd", 0755);
  ::mkdir("/run/systemd/journal", 0755);
  int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strcpy(addr.sun_path, "/run/systemd/journal/socket");
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return "bind";
  const std::vector<Field> fields{{"DOMAIN", "vm1"}, {"UID", "3110001"}, {"CODE", "busy"}};
  if (!broker::log::send_to_journal(broker::log::journal_fields(Level::warn, "teardown", fields))) {
    return "send_to_journal failed";
  }
  char buf[4096];
  auto n = ::recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
  return n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : "nothing arrived";
}

}  // namespace

TEST_CASE("sd_journal_send puts the fields on the journal's socket as journal fields",
          "[log][privileged]") {
  QB_REQUIRE_ROOT();
  int out[2];
  REQUIRE(::pipe(out) == 0);
  pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    auto got = journal_roundtrip();
    [[maybe_unused]] auto n = ::write(out[1], got.data(), got.size());
    ::_exit(0);
  }
  ::close(out[1]);
  std::string got;
  char buf[4096];
  for (ssize_t n; (n = ::read(out[0], buf, sizeof(buf))) > 0;) got.append(buf, static_cast<std::size_t>(n));
  ::close(out[0]);
  int status = 0;
  ::waitpid(child, &status, 0);
  INFO(got);
  // The native protocol: one KEY=value per line.
  CHECK(got.find("MESSAGE=teardown\n") != std::string::npos);
  CHECK(got.find("PRIORITY=4\n") != std::string::npos);
  CHECK(got.find("SYSLOG_IDENTIFIER=qbrokerd\n") != std::string::npos);
  CHECK(got.find("DOMAIN=vm1\n") != std::string::npos);
  CHECK(got.find("UID=3110001\n") != std::string::npos);
  CHECK(got.find("CODE=busy\n") != std::string::npos);
}
