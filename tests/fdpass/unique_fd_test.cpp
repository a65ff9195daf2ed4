#include "fdpass/unique_fd.hpp"

#include <fcntl.h>

#include <type_traits>

#include "support/support.hpp"

using fdpass::UniqueFd;

static bool is_open(int fd) { return ::fcntl(fd, F_GETFD) != -1; }

TEST_CASE("UniqueFd is move-only and has no implicit int conversion", "[fdpass]") {
  STATIC_REQUIRE(!std::is_copy_constructible_v<UniqueFd>);
  STATIC_REQUIRE(!std::is_copy_assignable_v<UniqueFd>);
  STATIC_REQUIRE(std::is_nothrow_move_constructible_v<UniqueFd>);
  STATIC_REQUIRE(!std::is_convertible_v<UniqueFd, int>);
  STATIC_REQUIRE(!std::is_convertible_v<int, UniqueFd>);
  STATIC_REQUIRE(std::is_convertible_v<const UniqueFd&, fdpass::BorrowedFd>);
}

TEST_CASE("UniqueFd closes on destruction, move and reset", "[fdpass]") {
  qbtest::FdLeakCheck leaks;
  int raw = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  REQUIRE(raw >= 0);
  {
    UniqueFd a(raw);
    UniqueFd b(std::move(a));
    CHECK_FALSE(a.valid());  // NOLINT(bugprone-use-after-move): checking the moved-from state
    CHECK(b.get() == raw);
    CHECK(is_open(raw));
  }
  CHECK_FALSE(is_open(raw));

  UniqueFd c(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  int first = c.get();
  errno = EPERM;
  c.reset();
  CHECK(errno == EPERM);  // reset() keeps errno for error paths
  CHECK_FALSE(is_open(first));
}

TEST_CASE("UniqueFd::release hands ownership away", "[fdpass]") {
  qbtest::FdLeakCheck leaks;
  UniqueFd a(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  int raw = a.release();
  CHECK_FALSE(a.valid());
  CHECK(is_open(raw));
  ::close(raw);
}
