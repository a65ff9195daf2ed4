#include "fdpass/devices.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <thread>

#include "fdpass/errc.hpp"
#include "fdpass/opener.hpp"
#include "support/support.hpp"

using fdpass::Access;
using fdpass::errc;
using fdpass::UniqueFd;

namespace {

bool exists(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0;
}

std::string sysfs_block(dev_t rdev) {
  return "/sys/dev/block/" + std::to_string(major(rdev)) + ":" + std::to_string(minor(rdev));
}

// Autoclear detaches in the kernel's release path; give it a bounded moment.
bool eventually(auto pred) {
  for (int i = 0; i < 500; ++i) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return pred();
}

}  // namespace

TEST_CASE("pipes and socketpairs are owned and close-on-exec", "[fdpass]") {
  qbtest::FdLeakCheck leaks;
  auto p = fdpass::make_pipe();
  REQUIRE(p);
  CHECK((::fcntl(p->first.get(), F_GETFD) & FD_CLOEXEC) != 0);
  CHECK((::fcntl(p->second.get(), F_GETFD) & FD_CLOEXEC) != 0);
  CHECK(::write(p->second.get(), "a", 1) == 1);
  char c = 0;
  CHECK(::read(p->first.get(), &c, 1) == 1);
  CHECK(fdpass::make_socketpair(SOCK_RAW).error() == errc::invalid_argument);
}

TEST_CASE("a Unix listener gets its mode and owner with no umask window", "[fdpass]") {
  qbtest::FdLeakCheck leaks;
  qbtest::TempDir dir;
  mode_t old = ::umask(0);  // the most permissive umask must not leak into the socket's mode
  auto l = fdpass::listen_unix(dir / "api.sock", 0660, ::getuid(), ::getgid());
  ::umask(old);
  REQUIRE(l);
  struct stat st {};
  REQUIRE(::stat((dir / "api.sock").c_str(), &st) == 0);
  CHECK(S_ISSOCK(st.st_mode));
  CHECK((st.st_mode & 07777) == 0660);
  auto c = fdpass::connect_unix(dir / "api.sock");
  CHECK(c);
  // Replacing an existing socket works, and no temporary name is left behind.
  auto again = fdpass::listen_unix(dir / "api.sock", 0600, ::getuid(), ::getgid());
  REQUIRE(again);
  int entries = 0;
  for (auto& name : {"api.sock"}) entries += exists(dir / name) ? 1 : 0;
  CHECK(entries == 1);
  CHECK(fdpass::listen_unix(dir / "x", 010000, 0, 0).error() == errc::invalid_argument);
  CHECK(fdpass::listen_unix(std::string(200, 'a'), 0600, 0, 0).error() == errc::bad_path);
}

TEST_CASE("a TCP listener binds loopback on a chosen or free port", "[fdpass]") {
  qbtest::FdLeakCheck leaks;
  auto l = fdpass::listen_tcp("127.0.0.1", 0);
  REQUIRE(l);
  auto port = fdpass::local_port(*l);
  REQUIRE(port);
  CHECK(*port != 0);
  CHECK(fdpass::listen_tcp("::1", 0));
  CHECK(fdpass::listen_tcp("localhost", 0).error() == errc::invalid_argument);
  CHECK(fdpass::listen_tcp("127.0.0.1", *port).error() == std::errc::address_in_use);
}

TEST_CASE("a loop device exists while its fd is held and vanishes after close",
          "[fdpass][privileged]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  qbtest::TempDir dir;
  qbtest::write_file(dir / "backing.img", std::string(1 << 20, 'L'));
  UniqueFd backing(::open((dir / "backing.img").c_str(), O_RDWR | O_CLOEXEC));
  REQUIRE(backing);

  auto loop = fdpass::attach_loop(backing, Access::read_write);
  REQUIRE(loop);
  backing.reset();  // the loop device holds its own reference to the file
  std::string sys = sysfs_block(loop->rdev);
  CHECK(exists(sys + "/loop/backing_file"));
  CHECK(loop->diskseq != 0);
  auto id = fdpass::identify(loop->fd);
  REQUIRE(id);
  CHECK(id->kind == fdpass::Identity::Kind::block);
  CHECK(id->diskseq == loop->diskseq);
  CHECK(id->size == (1 << 20));

  loop->fd.reset();
  CHECK(eventually([&] { return !exists(sys + "/loop/backing_file"); }));
}

TEST_CASE("a block device whose diskseq does not match is refused", "[fdpass][privileged]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  qbtest::TempDir dir;
  qbtest::write_file(dir / "b.img", std::string(1 << 20, 'D'));
  UniqueFd backing(::open((dir / "b.img").c_str(), O_RDONLY | O_CLOEXEC));
  auto loop = fdpass::attach_loop(backing, Access::read_only);
  REQUIRE(loop);
  auto dev = fdpass::ImageRoots::open({"/dev"});
  REQUIRE(dev);

  auto good = dev->open(loop->path, {.expect_diskseq = loop->diskseq});
  REQUIRE(good);
  CHECK(good->identity.rdev == loop->rdev);
  CHECK(good->identity.diskseq == loop->diskseq);

  auto bad = dev->open(loop->path, {.expect_diskseq = loop->diskseq + 1});
  CHECK(bad.error() == errc::diskseq_mismatch);
}

TEST_CASE("a tap shows up in /sys/class/net while open", "[fdpass][privileged]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  std::string name = "qbt" + std::to_string(::getpid() % 100000);
  {
    auto tap = fdpass::open_tap(name);
    REQUIRE(tap);
    CHECK(tap->name == name);
    CHECK(exists("/sys/class/net/" + name));
    std::ifstream flags("/sys/class/net/" + name + "/tun_flags");
    std::string hex;
    flags >> hex;
    CHECK((std::stoul(hex, nullptr, 16) & 0x4000U) != 0);  // IFF_VNET_HDR
  }
  CHECK(eventually([&] { return !exists("/sys/class/net/" + name); }));

  auto anon = fdpass::open_tap("");
  REQUIRE(anon);
  CHECK_FALSE(anon->name.empty());
  CHECK(exists("/sys/class/net/" + anon->name));
  CHECK(fdpass::open_tap("name/with/slash").error() == errc::invalid_argument);
  CHECK(fdpass::open_tap(std::string(20, 'x')).error() == errc::invalid_argument);
}
