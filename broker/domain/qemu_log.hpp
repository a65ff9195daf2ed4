// QEMU's stdout and stderr: a pipe the broker reads, never a file QEMU writes.
//
// A QEMU that writes without end (compromised, or stuck in a warning loop) cannot fill the run
// directory: the broker appends what it reads to RUN/log/NAME.log and, past `file_bytes`, renames
// that file to NAME.log.1 (replacing the older one) and starts a new one, so a domain's log takes
// at most twice `file_bytes`. The last `ring_bytes` stay in memory, so an error can quote QEMU's
// last lines after it exited ("qemu: invalid kernel header" rather than "QMP handshake: reset by
// peer").
//
// A restarted broker reads on from QEMU's own fd 2 (/proc/PID/fd/2 opens the same pipe), once it
// has checked that the fd is the pipe the launcher made. What QEMU wrote while no broker read is
// lost: QEMU ignores SIGPIPE, and its writes failed with EPIPE.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <memory>
#include <string>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>

#include "broker/core/error.hpp"
#include "fdpass/unique_fd.hpp"

namespace broker {

struct LogLimits {
  std::size_t file_bytes = 1u << 20;  // NAME.log rotates to NAME.log.1 past this
  std::size_t ring_bytes = 8u << 10;  // kept in memory for errors
};

class QemuLog : public std::enable_shared_from_this<QemuLog> {
 public:
  // `pipe`: the read end. `path`: the log file, appended to (created when missing).
  QemuLog(boost::asio::any_io_executor ex, fdpass::UniqueFd pipe, std::string path,
          LogLimits limits = {});

  // Re-opens the pipe a running QEMU (pid) has as its fd 2, when it is the pipe `inode`.
  static Result<fdpass::UniqueFd> reopen(const std::string& proc_root, pid_t pid,
                                         unsigned long long inode);

  // Reads until every writer has closed the pipe, or close().
  void start();
  // Reads what the pipe holds now, without waiting: QEMU exited, its last words are in it.
  void drain();
  // The last `lines` complete or partial lines read, trimmed, joined with "; ".
  std::string tail(std::size_t lines) const;
  // Stops reading and closes the pipe and the file.
  void close();

 private:
  void read_more();
  void append(std::string_view bytes);
  void write_file(std::string_view bytes);

  boost::asio::posix::stream_descriptor pipe_;
  std::string path_;
  LogLimits limits_;
  fdpass::UniqueFd file_;
  std::size_t file_size_ = 0;
  std::string ring_;
  char buf_[4096];
};

}  // namespace broker
