// The Xen mode's host side, as root: the private copies of the Xen device nodes, and the loop
// devices and block devices handed to blkback. [privileged]
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <fstream>
#include <string>
#include <thread>

#include "broker/xen/backend_disk.hpp"
#include "broker/xen/device_model.hpp"
#include "support/support.hpp"

using namespace broker::xen;
using namespace std::chrono_literals;

namespace {

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::string s;
  std::getline(in, s);
  return s;
}

std::string sys_block(const BackendDisk& d, const std::string& leaf) {
  return "/sys/dev/block/" + std::to_string(major(d.rdev)) + ":" + std::to_string(minor(d.rdev)) +
         "/" + leaf;
}

// A loop device with autoclear goes once its last fd is closed; the kernel may finish the
// detach a moment after the close returns.
bool detached(const std::string& backing_file) {
  for (int i = 0; i < 200; ++i) {
    struct stat st {};
    if (::stat(backing_file.c_str(), &st) != 0) return true;
    std::this_thread::sleep_for(5ms);
  }
  return false;
}

}  // namespace

TEST_CASE("the Xen device nodes are private copies owned by the domain uid", "[xen][privileged]") {
  QB_REQUIRE_ROOT();
  qbtest::TempDir host;
  qbtest::TempDir copies;
  struct stat null_st {};
  REQUIRE(::stat("/dev/null", &null_st) == 0);
  // A stand-in /dev/xen: two of the nodes, with /dev/null's number; one file that is no device.
  for (const char* name : {"privcmd", "evtchn"}) {
    REQUIRE(::mknod((host / name).c_str(), S_IFCHR | 0600, null_st.st_rdev) == 0);
  }
  qbtest::write_file(host / "gntdev", "not a device");
  const std::string dir = copies / "7";
  auto nodes = make_device_nodes(host.path(), dir, 3112007);
  REQUIRE(nodes.has_value());
  REQUIRE(nodes->size() == 2);
  CHECK((*nodes)[0].second == "/dev/xen/privcmd");
  CHECK((*nodes)[1].second == "/dev/xen/evtchn");
  for (const auto& [copy, in_jail] : *nodes) {
    struct stat st {};
    REQUIRE(::stat(copy.c_str(), &st) == 0);
    CHECK(S_ISCHR(st.st_mode));
    CHECK(st.st_rdev == null_st.st_rdev);
    CHECK(st.st_uid == 3112007u);
    CHECK(st.st_gid == 3112007u);
    CHECK((st.st_mode & 07777) == 0600);
  }
  struct stat d {};
  REQUIRE(::stat(dir.c_str(), &d) == 0);
  CHECK((d.st_mode & 07777) == 0700);
  remove_device_nodes(dir);
  CHECK(::access(dir.c_str(), F_OK) != 0);
}

TEST_CASE("a host with none of Xen's device nodes is refused, leaving nothing", "[xen][privileged]") {
  QB_REQUIRE_ROOT();
  qbtest::TempDir host;
  qbtest::TempDir copies;
  auto nodes = make_device_nodes(host.path(), copies / "3", 3112003);
  REQUIRE(nodes.has_error());
  CHECK(nodes.error().message.find("privcmd") != std::string::npos);
  CHECK(::access((copies / "3").c_str(), F_OK) != 0);
}

TEST_CASE("a regular file reaches blkback as an autoclear loop device named by its diskseq",
          "[xen][privileged]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  qbtest::TempDir dir;
  const std::string image = dir / "disk.img";
  {
    std::ofstream out(image);
    out << std::string(1 << 20, 'x');
  }
  fdpass::UniqueFd file(::open(image.c_str(), O_RDWR | O_CLOEXEC));
  REQUIRE(file.valid());
  auto disk = open_backend_disk(file, image, false);
  REQUIRE(disk.has_value());
  CHECK(disk->loop);
  CHECK(disk->node.starts_with("/dev/loop"));
  struct stat st {};
  REQUIRE(::stat(disk->node.c_str(), &st) == 0);
  CHECK(st.st_rdev == disk->rdev);
  CHECK(slurp(sys_block(*disk, "loop/backing_file")) == image);
  CHECK(slurp(sys_block(*disk, "loop/autoclear")) == "1");
  CHECK(slurp(sys_block(*disk, "ro")) == "0");
  CHECK(slurp(sys_block(*disk, "diskseq")) == std::to_string(disk->diskseq));
  CHECK(disk->diskseq > 0);

  // The same device opened again as a block device: the same number and sequence.
  fdpass::UniqueFd again(::open(disk->node.c_str(), O_RDONLY | O_CLOEXEC));
  REQUIRE(again.valid());
  auto blk = open_backend_disk(again, disk->node, true);
  REQUIRE(blk.has_value());
  CHECK_FALSE(blk->loop);
  CHECK(blk->rdev == disk->rdev);
  CHECK(blk->diskseq == disk->diskseq);

  // Closing every fd detaches it: nothing outlives its holders.
  const std::string backing = sys_block(*disk, "loop/backing_file");
  blk->fd.reset();
  again.reset();
  disk->fd.reset();
  CHECK(detached(backing));
}

TEST_CASE("a read-only disk gets a read-only loop device", "[xen][privileged]") {
  QB_REQUIRE_ROOT();
  qbtest::TempDir dir;
  const std::string image = dir / "cd.iso";
  {
    std::ofstream out(image);
    out << std::string(1 << 16, 'y');
  }
  fdpass::UniqueFd file(::open(image.c_str(), O_RDONLY | O_CLOEXEC));
  auto disk = open_backend_disk(file, image, true);
  REQUIRE(disk.has_value());
  CHECK(slurp(sys_block(*disk, "ro")) == "1");
  const std::string backing = sys_block(*disk, "loop/backing_file");
  disk->fd.reset();
  CHECK(detached(backing));
}

TEST_CASE("neither a file nor a block device is refused by field", "[xen][privileged]") {
  QB_REQUIRE_ROOT();
  fdpass::UniqueFd null(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  auto disk = open_backend_disk(null, "/dev/null", true);
  REQUIRE(disk.has_error());
  CHECK(disk.error().field == "disks");
}
