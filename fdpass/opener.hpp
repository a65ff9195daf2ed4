// Opening user-named images safely.
//
// A caller names a host path; the broker opens it with its own credentials, but only beneath one
// of the configured roots, never through a symbolic or magic link, and only if it is a regular
// file or a block device. The result is the open fd plus the identity of what was opened, which
// is what gets checked, logged and compared later (never the path).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "fdpass/result.hpp"
#include "fdpass/unique_fd.hpp"

namespace fdpass {

enum class Access { read_only, read_write };

struct OpenOptions {
  Access access = Access::read_only;
  bool direct = false;                          // O_DIRECT
  std::optional<std::uint64_t> expect_diskseq;  // block devices: refuse any other disk
};

struct Identity {
  enum class Kind { regular, block };
  Kind kind = Kind::regular;
  dev_t dev = 0;              // regular: st_dev
  ino_t ino = 0;              // regular: st_ino
  dev_t rdev = 0;             // block: st_rdev
  std::uint64_t diskseq = 0;  // block: BLKGETDISKSEQ
  bool cdrom = false;         // block: a CD-ROM drive (CDROM_GET_CAPABILITY answers)
  std::uint64_t size = 0;     // bytes

  bool same_object(const Identity& o) const noexcept {
    return kind == o.kind &&
           (kind == Kind::regular ? dev == o.dev && ino == o.ino
                                  : rdev == o.rdev && diskseq == o.diskseq);
  }
};

struct Opened {
  UniqueFd fd;
  Identity identity;
};

// Reads the identity of an already open fd (regular file or block device).
Result<Identity> identify(BorrowedFd fd);

// Returns the disk sequence number of an open block device.
Result<std::uint64_t> disk_sequence(BorrowedFd fd);

// What an image root lets through beyond its path rules. A hard link inside a root can name a
// file anywhere on the same filesystem, so a file with more than one name is refused unless the
// host says hard links are trusted; and a file the broker would open read-write on a caller's
// behalf must belong to one of `write_owners`, so a link or a copy of someone else's file (a
// `nobody`-owned 0600 secret) is never handed to QEMU for writing.
struct RootPolicy {
  bool allow_hardlinks = false;
  std::vector<uid_t> write_owners{0};
};

// The set of directories user paths may name. Each root is held open as an O_PATH directory fd,
// so renaming or replacing a root after start-up does not widen what can be reached.
class ImageRoots {
 public:
  // Opens each root. Roots must be absolute, existing directories.
  static Result<ImageRoots> open(const std::vector<std::string>& paths, RootPolicy policy = {});

  // Opens `path` (absolute, beneath one of the roots). Resolution uses openat2 with
  // RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV: no link and
  // no mount point (a bind mount of another tree) is followed. The object is first opened O_PATH
  // (no side effects: a FIFO never blocks, a device is never opened), its type, link count and,
  // for read-write, its owner checked against the policy, then reopened with the requested
  // access and compared with the first look.
  Result<Opened> open(std::string_view path, const OpenOptions& options) const;

  // The root whose directory holds `path`, if any (component-wise prefix).
  std::optional<std::string_view> root_of(std::string_view path) const;

  const std::vector<std::string>& paths() const noexcept { return paths_; }
  const RootPolicy& policy() const noexcept { return policy_; }

 private:
  std::vector<std::string> paths_;
  RootPolicy policy_;
  std::vector<UniqueFd> dirs_;
};

}  // namespace fdpass
