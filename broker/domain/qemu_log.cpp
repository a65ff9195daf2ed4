#include "broker/domain/qemu_log.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <vector>

#include <boost/asio/buffer.hpp>

#include "broker/core/errc.hpp"
#include "broker/core/log.hpp"

namespace broker {
namespace asio = boost::asio;

namespace {

fdpass::UniqueFd open_log_file(const std::string& path) {
  return fdpass::UniqueFd(
      ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0600));
}

}  // namespace

QemuLog::QemuLog(asio::any_io_executor ex, fdpass::UniqueFd pipe, std::string path, LogLimits limits)
    : pipe_(ex), path_(std::move(path)), limits_(limits), file_(open_log_file(path_)) {
  const int fd = pipe.release();
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0) ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
  pipe_.assign(fd);
  struct stat st {};
  if (file_ && ::fstat(file_.get(), &st) == 0) file_size_ = static_cast<std::size_t>(st.st_size);
  if (!file_) log::warn("QEMU log " + path_ + ": " + std::error_code(errno, std::system_category()).message());
}

Result<fdpass::UniqueFd> QemuLog::reopen(const std::string& proc_root, pid_t pid,
                                          unsigned long long inode) {
  const std::string path = proc_root + "/" + std::to_string(pid) + "/fd/2";
  // O_NONBLOCK: opening a pipe for reading never waits for a writer.
  fdpass::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
  if (!fd) return make_error(std::error_code(errno, std::system_category()), "opening " + path);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0 || !S_ISFIFO(st.st_mode) || inode == 0 || st.st_ino != inode) {
    return Error(make_error_code(errc::wrong_state),
                 path + " is not the log pipe the broker gave this QEMU");
  }
  return fd;
}

void QemuLog::start() { read_more(); }

void QemuLog::read_more() {
  if (!pipe_.is_open()) return;
  pipe_.async_read_some(asio::buffer(buf_), [self = shared_from_this()](boost::system::error_code ec,
                                                                        std::size_t n) {
    if (n > 0) self->append({self->buf_, n});
    if (ec) return;  // EOF: every writer is gone; or closed
    self->read_more();
  });
}

void QemuLog::drain() {
  if (!pipe_.is_open()) return;
  for (;;) {
    const ssize_t n = ::read(pipe_.native_handle(), buf_, sizeof buf_);
    if (n > 0) {
      append({buf_, static_cast<std::size_t>(n)});
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    return;  // EOF, EAGAIN (nothing more now) or an error
  }
}

void QemuLog::append(std::string_view bytes) {
  ring_.append(bytes);
  if (ring_.size() > limits_.ring_bytes) ring_.erase(0, ring_.size() - limits_.ring_bytes);
  write_file(bytes);
}

void QemuLog::write_file(std::string_view bytes) {
  if (file_ && file_size_ + bytes.size() > limits_.file_bytes && file_size_ > 0) {
    // Rotate: the full file becomes NAME.log.1, replacing the older one.
    file_.reset();
    if (::rename(path_.c_str(), (path_ + ".1").c_str()) != 0) {
      log::warn("rotating QEMU log " + path_ + ": " +
                std::error_code(errno, std::system_category()).message());
    }
    file_ = open_log_file(path_);
    file_size_ = 0;
  }
  if (!file_) return;
  // A single write bigger than the cap keeps its last part only.
  if (bytes.size() > limits_.file_bytes) bytes.remove_prefix(bytes.size() - limits_.file_bytes);
  const ssize_t n = ::write(file_.get(), bytes.data(), bytes.size());
  if (n > 0) file_size_ += static_cast<std::size_t>(n);
}

std::string QemuLog::tail(std::size_t lines) const {
  std::vector<std::string_view> all;
  std::string_view rest = ring_;
  while (!rest.empty()) {
    const std::size_t nl = rest.find('\n');
    std::string_view line = rest.substr(0, nl);
    rest = nl == std::string_view::npos ? std::string_view() : rest.substr(nl + 1);
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.remove_suffix(1);
    if (!line.empty()) all.push_back(line);
  }
  std::string out;
  for (std::size_t i = all.size() > lines ? all.size() - lines : 0; i < all.size(); ++i) {
    if (!out.empty()) out += "; ";
    out += all[i];
  }
  return out;
}

void QemuLog::close() {
  boost::system::error_code ignored;
  pipe_.close(ignored);
  file_.reset();
}

}  // namespace broker
