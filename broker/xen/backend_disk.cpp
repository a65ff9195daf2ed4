#include "broker/xen/backend_disk.hpp"

#include <fcntl.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>

namespace broker::xen {
namespace {

std::error_code last_error() { return {errno, std::system_category()}; }

Result<std::uint64_t> diskseq_of(fdpass::BorrowedFd dev, const std::string& what) {
  std::uint64_t seq = 0;
  if (::ioctl(dev.get(), BLKGETDISKSEQ, &seq) != 0) {
    return make_error(last_error(), "reading the disk sequence number of " + what);
  }
  return seq;
}

// A free loop device bound to `image`. Another process may take the device GET_FREE offered
// before LOOP_CONFIGURE binds it (EBUSY): then ask again.
Result<BackendDisk> attach_loop(fdpass::BorrowedFd image, const std::string& path, bool read_only,
                                const std::string& dev_root) {
  fdpass::UniqueFd control(::open((dev_root + "/loop-control").c_str(), O_RDWR | O_CLOEXEC));
  if (!control) return make_error(last_error(), "opening " + dev_root + "/loop-control");
  for (int attempt = 0; attempt < 16; ++attempt) {
    const int n = ::ioctl(control.get(), LOOP_CTL_GET_FREE);
    if (n < 0) return make_error(last_error(), "finding a free loop device");
    BackendDisk disk;
    disk.loop = true;
    disk.node = dev_root + "/loop" + std::to_string(n);
    disk.fd = fdpass::UniqueFd(::open(disk.node.c_str(), (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC));
    if (!disk.fd) return make_error(last_error(), "opening " + disk.node);
    loop_config cfg{};
    cfg.fd = static_cast<__u32>(image.get());
    cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR | (read_only ? LO_FLAGS_READ_ONLY : 0);
    std::snprintf(reinterpret_cast<char*>(cfg.info.lo_file_name), LO_NAME_SIZE, "%s",
                  path.c_str());
    if (::ioctl(disk.fd.get(), LOOP_CONFIGURE, &cfg) != 0) {
      if (errno == EBUSY) continue;
      return make_error(last_error(), "binding " + disk.node + " to " + path);
    }
    struct stat st {};
    if (::fstat(disk.fd.get(), &st) != 0) return make_error(last_error(), "stat " + disk.node);
    disk.rdev = st.st_rdev;
    auto seq = diskseq_of(disk.fd, disk.node);
    if (!seq) return seq.error();
    disk.diskseq = *seq;
    return disk;
  }
  return Error(std::make_error_code(std::errc::device_or_resource_busy),
               "every free loop device was taken by another process before it could be bound");
}

}  // namespace

Result<BackendDisk> open_backend_disk(fdpass::BorrowedFd image, const std::string& path,
                                      bool read_only, const std::string& dev_root) {
  struct stat st {};
  if (::fstat(image.get(), &st) != 0) return make_error(last_error(), "stat " + path);
  if (S_ISREG(st.st_mode)) return attach_loop(image, path, read_only, dev_root);
  if (!S_ISBLK(st.st_mode)) {
    Error e(std::make_error_code(std::errc::invalid_argument),
            path + " is neither a regular file nor a block device");
    e.field = "disks";
    return e;
  }
  BackendDisk disk;
  disk.fd = fdpass::UniqueFd(::fcntl(image.get(), F_DUPFD_CLOEXEC, 3));
  if (!disk.fd) return make_error(last_error(), "holding " + path);
  disk.rdev = st.st_rdev;
  disk.node = path;
  auto seq = diskseq_of(disk.fd, path);
  if (!seq) return seq.error();
  disk.diskseq = *seq;
  return disk;
}

std::string backend_path(std::uint32_t domid, std::uint32_t devid) {
  return "/local/domain/0/backend/vbd/" + std::to_string(domid) + "/" + std::to_string(devid);
}

std::string physical_device(dev_t rdev) {
  char number[32];
  std::snprintf(number, sizeof number, "%x:%x", major(rdev), minor(rdev));
  return number;
}

std::string diskseq_hex(std::uint64_t diskseq) {
  char seq[17];
  std::snprintf(seq, sizeof seq, "%016llx", static_cast<unsigned long long>(diskseq));
  return seq;
}

Result<void> publish_backend_disk(Store& xs, const BackendDisk& disk, const std::string& backend) {
  const std::string number = physical_device(disk.rdev);
  const std::string seq = diskseq_hex(disk.diskseq);
  auto written = xs.transact([&](Tx tx) -> Result<void> {
    if (auto ok = xs.write(backend + "/params", disk.node, tx); !ok) return ok;
    if (auto ok = xs.write(backend + "/physical-device", number, tx); !ok) return ok;
    return xs.write(backend + "/diskseq", seq, tx);
  });
  if (!written) return written.error();
  return {};
}

Result<bool> backend_connected(Store& xs, const std::string& backend) {
  auto state = xs.read(backend + "/state");
  if (!state) return state.error();
  return *state && **state == kConnected;
}

}  // namespace broker::xen
