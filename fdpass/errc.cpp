#include "fdpass/errc.hpp"

namespace fdpass {
namespace {

class Category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "fdpass"; }
  std::string message(int ev) const override {
    switch (static_cast<errc>(ev)) {
      case errc::ok: return "success";
      case errc::bad_path: return "path is empty, not absolute, too long or holds a NUL byte";
      case errc::outside_roots: return "path is not beneath any configured image root";
      case errc::escapes_root: return "path resolution would leave the image root";
      case errc::symlink: return "path goes through a symbolic link";
      case errc::not_found: return "no such file";
      case errc::is_fifo: return "refused: the path names a FIFO";
      case errc::is_socket: return "refused: the path names a socket";
      case errc::is_char_device: return "refused: the path names a character device";
      case errc::is_directory: return "refused: the path names a directory";
      case errc::unsupported_type: return "refused: neither a regular file nor a block device";
      case errc::identity_changed: return "the file changed while it was being opened";
      case errc::diskseq_mismatch: return "block device disk sequence number does not match";
      case errc::diskseq_unsupported: return "the kernel reports no disk sequence number";
      case errc::crosses_mount: return "path resolution would cross a mount point";
      case errc::hard_linked: return "refused: the file has more than one hard link";
      case errc::foreign_owner:
        return "refused for read-write use: the file is not owned by an allowed image owner";
      case errc::control_truncated: return "file descriptors were truncated in transit";
      case errc::message_truncated: return "message was truncated";
      case errc::too_many_fds: return "peer sent more file descriptors than allowed";
      case errc::would_block: return "operation would block";
      case errc::peer_closed: return "peer closed the connection";
      case errc::invalid_argument: return "invalid argument";
    }
    return "unknown fdpass error";
  }
};

}  // namespace

const std::error_category& category() noexcept {
  static const Category instance;
  return instance;
}

}  // namespace fdpass
