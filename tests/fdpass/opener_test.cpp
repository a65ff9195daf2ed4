#include "fdpass/opener.hpp"

#include <fcntl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

#include "fdpass/devices.hpp"
#include "fdpass/errc.hpp"
#include "support/support.hpp"

using fdpass::Access;
using fdpass::errc;
using fdpass::ImageRoots;

namespace {

struct Tree {
  qbtest::TempDir outside;
  qbtest::TempDir root;
  ImageRoots roots;

  Tree() : roots(*ImageRoots::open({root.path()})) {
    qbtest::write_file(root / "disk.img", "IMAGE");
    qbtest::write_file(outside / "secret", "SECRET");
    ::mkdir((root / "sub").c_str(), 0755);
    qbtest::write_file(root / "sub/inner.img", "INNER");
  }
};

ino_t inode_of(const std::string& path) {
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  return st.st_ino;
}

int access_mode(int fd) { return ::fcntl(fd, F_GETFL) & O_ACCMODE; }

}  // namespace

TEST_CASE("a regular file beneath a root opens with its inode identity", "[fdpass]") {
  qbtest::FdLeakCheck leaks;
  Tree t;
  auto ro = t.roots.open(t.root / "disk.img", {});
  REQUIRE(ro);
  CHECK(ro->identity.kind == fdpass::Identity::Kind::regular);
  CHECK(ro->identity.ino == inode_of(t.root / "disk.img"));
  CHECK(ro->identity.size == 5);
  CHECK(access_mode(ro->fd.get()) == O_RDONLY);
  CHECK((::fcntl(ro->fd.get(), F_GETFL) & O_NONBLOCK) == 0);
  CHECK((::fcntl(ro->fd.get(), F_GETFD) & FD_CLOEXEC) != 0);

  auto rw = t.roots.open(t.root / "sub/inner.img", {.access = Access::read_write});
  REQUIRE(rw);
  CHECK(access_mode(rw->fd.get()) == O_RDWR);
  CHECK(rw->identity.same_object(*fdpass::identify(rw->fd)));
  CHECK_FALSE(rw->identity.same_object(ro->identity));
}

TEST_CASE("symlink escapes are refused", "[fdpass]") {
  qbtest::FdLeakCheck leaks;
  Tree t;
  SECTION("an absolute link") {
    REQUIRE(::symlink((t.outside / "secret").c_str(), (t.root / "abs").c_str()) == 0);
    CHECK(t.roots.open(t.root / "abs", {}).error() == errc::symlink);
  }
  SECTION("a relative link to a file inside the root is still a link") {
    REQUIRE(::symlink("disk.img", (t.root / "rel").c_str()) == 0);
    CHECK(t.roots.open(t.root / "rel", {}).error() == errc::symlink);
  }
  SECTION("dot-dot out of the root") {
    std::string rel = "/../" + t.outside.path().substr(5) + "/secret";  // strip "/tmp/"
    CHECK(t.roots.open(t.root.path() + rel, {}).error() == errc::escapes_root);
    CHECK(t.roots.open(t.root / "sub/../../x", {}).error() == errc::escapes_root);
  }
  SECTION("a link in a middle component") {
    REQUIRE(::symlink(t.outside.path().c_str(), (t.root / "mid").c_str()) == 0);
    CHECK(t.roots.open(t.root / "mid/secret", {}).error() == errc::symlink);
    REQUIRE(::symlink("sub", (t.root / "mid2").c_str()) == 0);
    CHECK(t.roots.open(t.root / "mid2/inner.img", {}).error() == errc::symlink);
  }
  SECTION("a /proc/self/fd magic link") {
    int fd = ::open((t.outside / "secret").c_str(), O_RDONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    std::string magic = "/proc/self/fd/" + std::to_string(fd);
    REQUIRE(::symlink(magic.c_str(), (t.root / "magic").c_str()) == 0);
    CHECK(t.roots.open(t.root / "magic", {}).error() == errc::symlink);
    CHECK(t.roots.open(magic, {}).error() == errc::outside_roots);
    ::close(fd);
  }
}

TEST_CASE("paths outside the roots or malformed are refused", "[fdpass]") {
  qbtest::FdLeakCheck leaks;
  Tree t;
  CHECK(t.roots.open(t.outside / "secret", {}).error() == errc::outside_roots);
  CHECK(t.roots.open(t.root.path() + "x/disk.img", {}).error() == errc::outside_roots);
  CHECK(t.roots.open("relative/disk.img", {}).error() == errc::bad_path);
  CHECK(t.roots.open("", {}).error() == errc::bad_path);
  CHECK(t.roots.open(std::string("/a\0b", 4), {}).error() == errc::bad_path);
  CHECK(t.roots.open(t.root / "missing.img", {}).error() == errc::not_found);
  CHECK(t.roots.open(t.root.path(), {}).error() == errc::is_directory);
  CHECK(t.roots.open(t.root / "sub", {}).error() == errc::is_directory);
  CHECK(t.roots.open(t.root / "disk.img", {.expect_diskseq = 7}).error() ==
        errc::invalid_argument);
  CHECK(ImageRoots::open({"relative"}).error() == errc::bad_path);
  CHECK(ImageRoots::open({t.root / "disk.img"}).error() == errc::unsupported_type);
}

TEST_CASE("a FIFO is refused without blocking", "[fdpass]") {
  qbtest::FdLeakCheck leaks;
  Tree t;
  REQUIRE(::mkfifo((t.root / "fifo").c_str(), 0600) == 0);
  // No writer exists: a plain open(O_RDONLY) would block forever here.
  CHECK(t.roots.open(t.root / "fifo", {}).error() == errc::is_fifo);
  CHECK(t.roots.open(t.root / "fifo", {.access = Access::read_write}).error() == errc::is_fifo);
}

TEST_CASE("sockets and character devices are refused with their own errors", "[fdpass]") {
  qbtest::FdLeakCheck leaks;
  Tree t;
  {
    auto sock = fdpass::listen_unix(t.root / "sock", 0600, ::getuid(), ::getgid());
    REQUIRE(sock);
    CHECK(t.roots.open(t.root / "sock", {}).error() == errc::is_socket);
  }
  auto dev = ImageRoots::open({"/dev"});
  REQUIRE(dev);
  CHECK(dev->open("/dev/null", {}).error() == errc::is_char_device);
}

TEST_CASE("a hard link is refused unless the policy trusts hard links", "[fdpass]") {
  qbtest::FdLeakCheck leaks;
  Tree t;
  // A link inside the root to a file outside it: the file has two names, one of them outside.
  REQUIRE(::link((t.outside / "secret").c_str(), (t.root / "linked.img").c_str()) == 0);
  CHECK(t.roots.open(t.root / "linked.img", {}).error() == errc::hard_linked);
  CHECK(t.roots.open(t.root / "linked.img", {.access = Access::read_write}).error() ==
        errc::hard_linked);
  // Both names are refused, the one inside as well as any other inside the root.
  REQUIRE(::link((t.root / "disk.img").c_str(), (t.root / "sub/again.img").c_str()) == 0);
  CHECK(t.roots.open(t.root / "disk.img", {}).error() == errc::hard_linked);

  auto trusting = ImageRoots::open({t.root.path()}, {.allow_hardlinks = true,
                                                      .write_owners = {::geteuid()}});
  REQUIRE(trusting);
  auto ok = trusting->open(t.root / "linked.img", {.access = Access::read_write});
  REQUIRE(ok);
  CHECK(ok->identity.ino == inode_of(t.outside / "secret"));
}

TEST_CASE("read-write use needs a file owned by an allowed image owner", "[fdpass]") {
  qbtest::FdLeakCheck leaks;
  Tree t;
  const uid_t me = ::geteuid();
  auto others = ImageRoots::open({t.root.path()}, {.write_owners = {me + 1}});
  REQUIRE(others);
  // Read-only use is not limited by owner; read-write is.
  CHECK(others->open(t.root / "disk.img", {}));
  CHECK(others->open(t.root / "disk.img", {.access = Access::read_write}).error() ==
        errc::foreign_owner);
  auto mine = ImageRoots::open({t.root.path()}, {.write_owners = {me + 1, me}});
  REQUIRE(mine);
  CHECK(mine->open(t.root / "disk.img", {.access = Access::read_write}));
  CHECK(ImageRoots::open({t.root.path()})->policy().write_owners == std::vector<uid_t>{0});
}

TEST_CASE("a nobody-owned file linked into the root is neither a disk nor a CD",
          "[fdpass][privileged]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  Tree t;
  const uid_t nobody = 65534;
  REQUIRE(::chown((t.outside / "secret").c_str(), nobody, nobody) == 0);
  REQUIRE(::chmod((t.outside / "secret").c_str(), 0600) == 0);
  REQUIRE(::link((t.outside / "secret").c_str(), (t.root / "linked.img").c_str()) == 0);
  CHECK(t.roots.open(t.root / "linked.img", {}).error() == errc::hard_linked);
  CHECK(t.roots.open(t.root / "linked.img", {.access = Access::read_write}).error() ==
        errc::hard_linked);

  // With hard links trusted, the owner still keeps it from read-write use.
  auto trusting = ImageRoots::open({t.root.path()}, {.allow_hardlinks = true});
  REQUIRE(trusting);
  CHECK(trusting->open(t.root / "linked.img", {.access = Access::read_write}).error() ==
        errc::foreign_owner);
  REQUIRE(::chown((t.root / "disk.img").c_str(), nobody, nobody) == 0);
  CHECK(t.roots.open(t.root / "disk.img", {.access = Access::read_write}).error() ==
        errc::foreign_owner);
}

TEST_CASE("a mount point inside the root is not crossed", "[fdpass][privileged]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  Tree t;
  REQUIRE(::mkdir((t.root / "mnt").c_str(), 0755) == 0);
  REQUIRE(::mount(t.outside.path().c_str(), (t.root / "mnt").c_str(), nullptr, MS_BIND, nullptr) ==
          0);
  auto through = t.roots.open(t.root / "mnt/secret", {});
  auto mount_point = t.roots.open(t.root / "mnt", {});
  ::umount2((t.root / "mnt").c_str(), MNT_DETACH);
  CHECK(through.error() == errc::crosses_mount);
  CHECK(mount_point.error() == errc::crosses_mount);
  // ".." out of the root keeps its own code.
  CHECK(t.roots.open(t.root / "sub/../../x", {}).error() == errc::escapes_root);
}
