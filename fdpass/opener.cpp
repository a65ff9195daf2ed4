#include "fdpass/opener.hpp"

#include <fcntl.h>
#include <linux/cdrom.h>
#include <linux/fs.h>
#include <linux/openat2.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "fdpass/errc.hpp"

namespace fdpass {
namespace {

constexpr std::size_t kMaxPath = 4096;

constexpr std::uint64_t kResolve =
    RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV;

// glibc 2.36 has no openat2() wrapper.
int sys_openat2(int dirfd, const char* path, std::uint64_t flags,
                std::uint64_t resolve = kResolve) {
  open_how how{};
  how.flags = flags;
  how.resolve = resolve;
  return static_cast<int>(::syscall(SYS_openat2, dirfd, path, &how, sizeof(how)));
}

// EXDEV means either ".." out of the root or a mount point on the way. An O_PATH look without
// RESOLVE_NO_XDEV (no side effects) tells which, so the caller learns the real reason.
std::error_code exdev_reason(int dirfd, const char* path) {
  UniqueFd probe(sys_openat2(dirfd, path, O_PATH | O_CLOEXEC, kResolve & ~RESOLVE_NO_XDEV));
  return make_error_code(probe ? errc::crosses_mount : errc::escapes_root);
}

std::error_code open_error(int e) {
  switch (e) {
    case EXDEV: return make_error_code(errc::escapes_root);
    case ELOOP: return make_error_code(errc::symlink);
    case ENOENT: return make_error_code(errc::not_found);
    case ENAMETOOLONG: return make_error_code(errc::bad_path);
    default: return {e, std::system_category()};
  }
}

std::error_code type_error(mode_t mode) {
  switch (mode & S_IFMT) {
    case S_IFIFO: return make_error_code(errc::is_fifo);
    case S_IFSOCK: return make_error_code(errc::is_socket);
    case S_IFCHR: return make_error_code(errc::is_char_device);
    case S_IFDIR: return make_error_code(errc::is_directory);
    default: return make_error_code(errc::unsupported_type);
  }
}

bool valid_path(std::string_view p) {
  return !p.empty() && p.size() < kMaxPath && p.front() == '/' &&
         p.find('\0') == std::string_view::npos;
}

// `path` lies in `root` if root is a leading run of whole components of path.
bool component_prefix(std::string_view root, std::string_view path) {
  while (root.size() > 1 && root.back() == '/') root.remove_suffix(1);
  if (root == "/") return true;
  if (!path.starts_with(root)) return false;
  return path.size() == root.size() || path[root.size()] == '/';
}

}  // namespace

Result<std::uint64_t> disk_sequence(BorrowedFd fd) {
  std::uint64_t seq = 0;
  if (::ioctl(fd.get(), BLKGETDISKSEQ, &seq) != 0) {
    if (errno == ENOTTY || errno == EINVAL) return make_error_code(errc::diskseq_unsupported);
    return last_error();
  }
  return seq;
}

Result<Identity> identify(BorrowedFd fd) {
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return last_error();
  Identity id;
  if (S_ISREG(st.st_mode)) {
    id.kind = Identity::Kind::regular;
    id.dev = st.st_dev;
    id.ino = st.st_ino;
    id.size = static_cast<std::uint64_t>(st.st_size);
    return id;
  }
  if (!S_ISBLK(st.st_mode)) return type_error(st.st_mode);
  id.kind = Identity::Kind::block;
  id.rdev = st.st_rdev;
  auto seq = disk_sequence(fd);
  if (!seq) return seq.error();
  id.diskseq = *seq;
  if (::ioctl(fd.get(), BLKGETSIZE64, &id.size) != 0) return last_error();
  id.cdrom = ::ioctl(fd.get(), CDROM_GET_CAPABILITY, 0) >= 0;
  return id;
}

namespace {

// The policy's checks, made on the first look (nothing opened yet) and again on the open fd.
std::error_code policy_error(const RootPolicy& policy, const struct stat& st, Access access) {
  if (S_ISREG(st.st_mode) && st.st_nlink > 1 && !policy.allow_hardlinks) {
    return make_error_code(errc::hard_linked);
  }
  if (access == Access::read_write &&
      std::find(policy.write_owners.begin(), policy.write_owners.end(), st.st_uid) ==
          policy.write_owners.end()) {
    return make_error_code(errc::foreign_owner);
  }
  return {};
}

}  // namespace

Result<ImageRoots> ImageRoots::open(const std::vector<std::string>& paths, RootPolicy policy) {
  ImageRoots roots;
  roots.policy_ = std::move(policy);
  for (const auto& p : paths) {
    if (!valid_path(p)) return make_error_code(errc::bad_path);
    int fd = ::open(p.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return errno == ENOTDIR ? make_error_code(errc::unsupported_type) : last_error();
    roots.dirs_.emplace_back(fd);
    roots.paths_.push_back(p);
  }
  return roots;
}

std::optional<std::string_view> ImageRoots::root_of(std::string_view path) const {
  for (const auto& r : paths_) {
    if (component_prefix(r, path)) return std::string_view(r);
  }
  return std::nullopt;
}

Result<Opened> ImageRoots::open(std::string_view path, const OpenOptions& options) const {
  if (!valid_path(path)) return make_error_code(errc::bad_path);
  const UniqueFd* root = nullptr;
  std::string rel;
  for (std::size_t i = 0; i < paths_.size(); ++i) {
    if (!component_prefix(paths_[i], path)) continue;
    root = &dirs_[i];
    std::string_view r = paths_[i];
    while (r.size() > 1 && r.back() == '/') r.remove_suffix(1);
    rel.assign(r == "/" ? path : path.substr(r.size()));
    break;
  }
  if (root == nullptr) return make_error_code(errc::outside_roots);
  while (!rel.empty() && rel.front() == '/') rel.erase(0, 1);
  if (rel.empty()) return make_error_code(errc::is_directory);

  // First look: O_PATH opens nothing (no FIFO wait, no device open side effects).
  UniqueFd probe(sys_openat2(root->get(), rel.c_str(), O_PATH | O_CLOEXEC));
  if (!probe) return errno == EXDEV ? exdev_reason(root->get(), rel.c_str()) : open_error(errno);
  struct stat st {};
  if (::fstat(probe.get(), &st) != 0) return last_error();
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) return type_error(st.st_mode);
  if (auto ec = policy_error(policy_, st, options.access)) return ec;
  if (options.expect_diskseq && !S_ISBLK(st.st_mode)) {
    return make_error_code(errc::invalid_argument);
  }

  // Real open, same resolution rules. O_NONBLOCK guards against a swap to a FIFO in between.
  std::uint64_t flags = O_CLOEXEC | O_NOCTTY | O_NONBLOCK |
                        (options.access == Access::read_write ? O_RDWR : O_RDONLY) |
                        (options.direct ? O_DIRECT : 0);
  UniqueFd fd(sys_openat2(root->get(), rel.c_str(), flags));
  if (!fd) return open_error(errno);
  auto id = identify(fd);
  if (!id) return id.error();
  struct stat again {};
  if (::fstat(fd.get(), &again) != 0) return last_error();
  if (again.st_dev != st.st_dev || again.st_ino != st.st_ino ||
      (again.st_mode & S_IFMT) != (st.st_mode & S_IFMT)) {
    return make_error_code(errc::identity_changed);
  }
  // A link made or a chown done between the two looks counts as well.
  if (auto ec = policy_error(policy_, again, options.access)) return ec;
  if (options.expect_diskseq && *options.expect_diskseq != id->diskseq) {
    return make_error_code(errc::diskseq_mismatch);
  }
  int fl = ::fcntl(fd.get(), F_GETFL);
  if (fl < 0 || ::fcntl(fd.get(), F_SETFL, fl & ~O_NONBLOCK) != 0) return last_error();
  return Opened{std::move(fd), *id};
}

}  // namespace fdpass
