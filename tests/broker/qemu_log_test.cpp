// QemuLog: QEMU's output read from a pipe into a capped, rotated file and a ring for errors.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include <catch2/catch.hpp>

#include <boost/asio/io_context.hpp>

#include "broker/core/errc.hpp"
#include "broker/domain/qemu_log.hpp"
#include "support/support.hpp"

namespace fs = std::filesystem;

namespace {

struct Pipe {
  fdpass::UniqueFd read, write;
  Pipe() {
    int ends[2];
    REQUIRE(::pipe2(ends, O_CLOEXEC) == 0);
    read.reset(ends[0]);
    write.reset(ends[1]);
  }
};

void put(const fdpass::UniqueFd& fd, const std::string& s) {
  REQUIRE(::write(fd.get(), s.data(), s.size()) == static_cast<ssize_t>(s.size()));
}

std::uintmax_t size_or_zero(const std::string& p) {
  std::error_code ec;
  auto n = fs::file_size(p, ec);
  return ec ? 0 : n;
}

}  // namespace

TEST_CASE("a QEMU that writes without end fills two capped files, and the ring keeps its last lines",
          "[qemu_log]") {
  qbtest::TempDir dir;
  const std::string path = dir.path() + "/d.log";
  boost::asio::io_context io;
  Pipe p;
  broker::LogLimits limits{.file_bytes = 16 * 1024, .ring_bytes = 1024};
  auto log = std::make_shared<broker::QemuLog>(io.get_executor(), std::move(p.read), path, limits);
  // 200 KiB in 1 KiB lines, drained as it comes (a pipe holds 64 KiB).
  for (int i = 0; i < 200; ++i) {
    put(p.write, std::string(1000, 'x') + " line " + std::to_string(i) + "\n");
    log->drain();
    CHECK(size_or_zero(path) <= limits.file_bytes);
    CHECK(size_or_zero(path + ".1") <= limits.file_bytes);
  }
  CHECK(size_or_zero(path) > 0);
  CHECK(size_or_zero(path + ".1") > 0);
  CHECK_FALSE(fs::exists(path + ".2"));
  const std::string last = log->tail(1);
  CHECK(last.ends_with("line 199"));
  // The ring holds at most ring_bytes: fewer lines than asked come back.
  CHECK(log->tail(50).find("line 198") != std::string::npos);
  CHECK(log->tail(50).find("line 150") == std::string::npos);
}

TEST_CASE("the log is read asynchronously until every writer is gone, and tail quotes the last lines",
          "[qemu_log]") {
  qbtest::TempDir dir;
  const std::string path = dir.path() + "/d.log";
  boost::asio::io_context io;
  Pipe p;
  auto log = std::make_shared<broker::QemuLog>(io.get_executor(), std::move(p.read), path);
  log->start();
  put(p.write, "qemu-system-x86_64: warning: one\r\n\nqemu: invalid kernel header\n");
  p.write.reset();
  io.run();  // returns once the read saw EOF
  CHECK(log->tail(5) == "qemu-system-x86_64: warning: one; qemu: invalid kernel header");
  CHECK(log->tail(1) == "qemu: invalid kernel header");
  log->close();
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK(text == "qemu-system-x86_64: warning: one\r\n\nqemu: invalid kernel header\n");
}

TEST_CASE("a restarted broker re-opens QEMU's log pipe only when it is the recorded one", "[qemu_log]") {
  qbtest::TempDir proc;
  Pipe p;
  Pipe other;
  struct stat st {};
  REQUIRE(::fstat(p.write.get(), &st) == 0);
  // A /proc of our own whose process 42 has the pipe's write end as fd 2.
  fs::create_directories(proc.path() + "/42/fd");
  fs::create_symlink("/proc/self/fd/" + std::to_string(p.write.get()), proc.path() + "/42/fd/2");
  auto reopened = broker::QemuLog::reopen(proc.path(), 42, st.st_ino);
  REQUIRE(reopened.has_value());
  put(p.write, "after the restart\n");
  char buf[64] = {};
  CHECK(::read(reopened->get(), buf, sizeof buf) == 18);

  auto wrong = broker::QemuLog::reopen(proc.path(), 42, st.st_ino + 1);
  REQUIRE_FALSE(wrong.has_value());
  CHECK(wrong.error().code == broker::errc::wrong_state);
  CHECK_FALSE(broker::QemuLog::reopen(proc.path(), 42, 0).has_value());  // no inode recorded
  CHECK_FALSE(broker::QemuLog::reopen(proc.path(), 43, st.st_ino).has_value());  // no such process
  // A regular file where the pipe should be is refused too.
  fs::remove(proc.path() + "/42/fd/2");
  { std::ofstream(proc.path() + "/42/fd/2") << "x"; }
  CHECK_FALSE(broker::QemuLog::reopen(proc.path(), 42, st.st_ino).has_value());
}
