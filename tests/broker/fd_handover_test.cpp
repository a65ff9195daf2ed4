// FdHandover: the spawn arguments, the closing of the broker's copies and the rollback, without
// QEMU (the lifecycle and flow tests hand real fds to real QEMUs through it).
#include "broker/lifecycle/fd_handover.hpp"

#include <fcntl.h>

#include <catch2/catch.hpp>

#include "support/support.hpp"

namespace {

fdpass::UniqueFd dev_null() { return fdpass::UniqueFd(::open("/dev/null", O_RDONLY | O_CLOEXEC)); }

}  // namespace

TEST_CASE("an fd handover names each fd for -add-fd in order and closes the copies once spawned",
          "[lifecycle]") {
  qbtest::FdLeakCheck leaks;
  broker::lifecycle::FdHandover fds;
  fds.add_to_fdset(dev_null(), "qb:d0-backing", 3);
  fds.add_to_fdset(dev_null(), "qb:d0", 4);
  CHECK(fds.spawn_args(5) == std::vector<std::string>{"-add-fd", "fd=5,set=3,opaque=qb:d0-backing",
                                                      "-add-fd", "fd=6,set=4,opaque=qb:d0"});
  auto passed = fds.spawn_fds();
  REQUIRE(passed.size() == 2);
  CHECK(passed[0].get() == fds.entries()[0].fd.get());
  CHECK(fds.rollback().empty());  // nothing is in QEMU yet
  fds.spawned();
  for (const auto& e : fds.entries()) {
    CHECK_FALSE(e.fd);
    CHECK(e.in_qemu);
  }
  auto undo = fds.rollback();
  REQUIRE(undo.size() == 2);
  // Newest first: the image's fdset goes before its backing file's.
  CHECK(undo[0].name == "remove-fd");
  CHECK(undo[0].args.at("fdset-id") == 4);
  CHECK(undo[1].args.at("fdset-id") == 3);
}

TEST_CASE("an fd handover at run time rolls back only what QEMU took, with the ids QEMU gave",
          "[lifecycle]") {
  qbtest::FdLeakCheck leaks;
  broker::lifecycle::FdHandover fds;
  auto tap = fds.add_named(dev_null(), "qb-tap-n0");
  auto image = fds.add_to_fdset(dev_null(), "qb:d1");
  auto never = fds.add_to_fdset(dev_null(), "qb:d2");
  CHECK(fds.fdset(image) == -1);
  fds.taken(tap);
  fds.taken(image, 17);
  CHECK(fds.fdset(image) == 17);
  CHECK_FALSE(fds.entries()[tap].fd);
  CHECK(fds.entries()[never].fd);  // still the broker's: it was never sent
  auto undo = fds.rollback();
  REQUIRE(undo.size() == 2);
  CHECK(undo[0].name == "remove-fd");
  CHECK(undo[0].args.at("fdset-id") == 17);
  CHECK(undo[1].name == "closefd");
  CHECK(undo[1].args.at("fdname") == "qb-tap-n0");
}
