#include "fdpass/cmsg.hpp"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <array>
#include <thread>

#include "fdpass/devices.hpp"
#include "fdpass/errc.hpp"
#include "support/support.hpp"

using fdpass::BorrowedFd;
using fdpass::errc;
using fdpass::UniqueFd;

namespace {

std::span<const std::byte> bytes(std::string_view s) { return std::as_bytes(std::span(s)); }

UniqueFd open_null() { return UniqueFd(::open("/dev/null", O_RDONLY | O_CLOEXEC)); }

ino_t inode(int fd) {
  struct stat st {};
  REQUIRE(::fstat(fd, &st) == 0);
  return st.st_ino;
}

}  // namespace

TEST_CASE("an fd sent over a socketpair arrives as the same object, close-on-exec", "[fdpass]") {
  qbtest::FdLeakCheck leaks;
  for (int type : {SOCK_STREAM, SOCK_SEQPACKET}) {
    auto pair = fdpass::make_socketpair(type);
    REQUIRE(pair);
    qbtest::TempDir dir;
    qbtest::write_file(dir / "f", "x");
    UniqueFd file(::open((dir / "f").c_str(), O_RDONLY | O_CLOEXEC));
    REQUIRE(file);
    std::array<BorrowedFd, 1> fds{file};
    auto sent = fdpass::send_with_fds(pair->first, bytes("hello"), fds);
    REQUIRE(sent);
    CHECK(*sent == 5);

    std::array<std::byte, 16> buf{};
    auto got = fdpass::recv_with_fds(pair->second, buf);
    REQUIRE(got);
    CHECK(got->bytes == 5);
    REQUIRE(got->fds.size() == 1);
    CHECK(inode(got->fds[0].get()) == inode(file.get()));
    CHECK((::fcntl(got->fds[0].get(), F_GETFD) & FD_CLOEXEC) != 0);
  }
}

TEST_CASE("fds with no data bytes are refused before the kernel sees them", "[fdpass]") {
  qbtest::FdLeakCheck leaks;
  auto pair = fdpass::make_socketpair(SOCK_STREAM);
  REQUIRE(pair);
  UniqueFd f = open_null();
  std::array<BorrowedFd, 1> fds{f};
  auto r = fdpass::send_with_fds(pair->first, {}, fds);
  CHECK(r.error() == errc::invalid_argument);
}

TEST_CASE("more fds than the receiver allows are all closed", "[fdpass]") {
  qbtest::FdLeakCheck leaks;
  auto pair = fdpass::make_socketpair(SOCK_SEQPACKET);
  REQUIRE(pair);
  std::vector<UniqueFd> owned;
  std::vector<BorrowedFd> fds;
  for (int i = 0; i < 5; ++i) {
    owned.push_back(open_null());
    fds.emplace_back(owned.back());
  }
  REQUIRE(fdpass::send_with_fds(pair->first, bytes("x"), fds));
  owned.clear();
  std::array<std::byte, 8> buf{};
  auto got = fdpass::recv_with_fds(pair->second, buf, 2);
  CHECK(got.error() == errc::too_many_fds);
}

TEST_CASE("a 1000-fd flood is received, owned and released without a leak", "[fdpass]") {
  qbtest::FdLeakCheck leaks;
  for (int type : {SOCK_STREAM, SOCK_SEQPACKET}) {
    auto pair = fdpass::make_socketpair(type);
    REQUIRE(pair);
    constexpr int kFlood = 1000;
    std::thread sender([&] {
      UniqueFd f = open_null();
      std::array<BorrowedFd, 1> fds{f};
      for (int i = 0; i < kFlood; ++i) {
        auto r = fdpass::send_with_fds(pair->first, bytes("m"), fds);
        if (!r) break;
      }
      pair->first.reset();
    });
    std::size_t total = 0;
    std::size_t bytes_seen = 0;
    std::array<std::byte, 64> buf{};
    for (;;) {
      // Stream sockets never merge messages across fd boundaries, so each read holds at most
      // one fd; cap at 1 to prove the cap is honoured under load.
      auto got = fdpass::recv_with_fds(pair->second, buf, 1);
      REQUIRE(got);
      if (got->bytes == 0 && got->fds.empty()) break;
      bytes_seen += got->bytes;
      total += got->fds.size();
    }
    sender.join();
    CHECK(total == kFlood);
    CHECK(bytes_seen == kFlood);
  }
}

TEST_CASE("a truncated control message closes every fd that did arrive", "[fdpass]") {
  // The kernel sets MSG_CTRUNC when it cannot install the fds, e.g. at RLIMIT_NOFILE. Lower the
  // limit in a child so the test process keeps its own.
  qbtest::FdLeakCheck leaks;
  auto pair = fdpass::make_socketpair(SOCK_SEQPACKET);
  REQUIRE(pair);
  std::vector<UniqueFd> owned;
  std::vector<BorrowedFd> fds;
  for (int i = 0; i < 8; ++i) {
    owned.push_back(open_null());
    fds.emplace_back(owned.back());
  }
  REQUIRE(fdpass::send_with_fds(pair->first, bytes("x"), fds));
  owned.clear();

  pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    // Fill the fd table up to a small limit, then free three slots: the kernel installs three
    // of the eight fds and must report the rest as truncated.
    int highest = 0;
    for (int fd = 0; fd < 4096; ++fd) {
      if (::fcntl(fd, F_GETFD) != -1) highest = fd;
    }
    rlimit lim{static_cast<rlim_t>(highest + 16), static_cast<rlim_t>(highest + 16)};
    if (::setrlimit(RLIMIT_NOFILE, &lim) != 0) ::_exit(10);
    std::vector<UniqueFd> filler;
    for (;;) {
      UniqueFd d(::fcntl(0, F_DUPFD_CLOEXEC, 0));
      if (!d) break;
      filler.push_back(std::move(d));
    }
    filler.resize(filler.size() - 3);
    std::size_t before = qbtest::open_fd_count();
    std::array<std::byte, 8> buf{};
    auto got = fdpass::recv_with_fds(pair->second, buf, 64);
    if (got.error() != errc::control_truncated) ::_exit(11);
    if (qbtest::open_fd_count() != before) ::_exit(12);
    ::_exit(0);
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("a seqpacket message longer than the buffer is reported as truncated", "[fdpass]") {
  qbtest::FdLeakCheck leaks;
  auto pair = fdpass::make_socketpair(SOCK_SEQPACKET);
  REQUIRE(pair);
  UniqueFd f = open_null();
  std::array<BorrowedFd, 1> fds{f};
  REQUIRE(fdpass::send_with_fds(pair->first, bytes("0123456789"), fds));
  std::array<std::byte, 4> buf{};
  auto got = fdpass::recv_with_fds(pair->second, buf);
  CHECK(got.error() == errc::message_truncated);
}

TEST_CASE("a non-blocking socket with nothing to read would block", "[fdpass]") {
  qbtest::FdLeakCheck leaks;
  auto pair = fdpass::make_socketpair(SOCK_STREAM);
  REQUIRE(pair);
  REQUIRE(fdpass::set_nonblocking(pair->second, true));
  std::array<std::byte, 4> buf{};
  CHECK(fdpass::recv_with_fds(pair->second, buf).error() == errc::would_block);
  pair->first.reset();
  auto eof = fdpass::recv_with_fds(pair->second, buf);
  REQUIRE(eof);
  CHECK(eof->bytes == 0);
}
