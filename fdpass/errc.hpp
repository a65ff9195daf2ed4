// fdpass error codes. Everything in fdpass reports failure as a std::error_code: either one of
// these (a refusal the library decided on) or a system_category errno (the kernel said no).
#pragma once

#include <system_error>

namespace fdpass {

enum class errc {
  ok = 0,
  bad_path,            // empty, relative where absolute is needed, NUL byte, or too long
  outside_roots,       // the path is not under any configured root
  escapes_root,        // resolution would leave the root ("..", absolute link, magic link)
  symlink,             // a component is a symbolic link
  not_found,           // no such file
  is_fifo,             // refused: a FIFO
  is_socket,           // refused: a socket
  is_char_device,      // refused: a character device
  is_directory,        // refused: a directory
  unsupported_type,    // refused: anything else that is not a regular file or block device
  identity_changed,    // the object changed between the check and the open
  diskseq_mismatch,    // the block device is not the one the caller named
  diskseq_unsupported, // the kernel cannot report a disk sequence number for this device
  crosses_mount,       // resolution would cross a mount point inside the root
  hard_linked,         // refused: a regular file with more than one name (st_nlink > 1)
  foreign_owner,       // refused for read-write: the file's owner is not an allowed image owner
  control_truncated,   // MSG_CTRUNC: the sender passed more fds than fit; all were closed
  message_truncated,   // MSG_TRUNC on a datagram/seqpacket socket
  too_many_fds,        // more fds than the caller allowed; all were closed
  would_block,         // non-blocking socket has nothing to read or no room to write
  peer_closed,         // orderly shutdown by the peer
  invalid_argument,    // a caller error: bad port, bad mode, empty fd list where one is needed
};
// How many enumerators errc has: they run from 0 to the one named here, which must stay the
// last (tests/api/http_errors_test.cpp fails to compile otherwise).
inline constexpr int kErrcCount = static_cast<int>(errc::invalid_argument) + 1;

const std::error_category& category() noexcept;

inline std::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), category()};
}

// The errno of the current thread as an error_code.
inline std::error_code last_error() noexcept {
  return {errno, std::system_category()};
}

}  // namespace fdpass

template <>
struct std::is_error_code_enum<fdpass::errc> : std::true_type {};
