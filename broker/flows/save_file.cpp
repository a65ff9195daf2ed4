#include "broker/flows/save_file.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <boost/asio/post.hpp>
#include <boost/json.hpp>
#include <cerrno>
#include <cstring>
#include <vector>

#include "broker/core/errc.hpp"
#include "broker/domain/requests.hpp"

namespace broker::flows::save_file {
namespace json = boost::json;

namespace {

constexpr std::string_view kMagic{"QBSAVE\r\n", 8};
constexpr std::string_view kTrailerMagic{"QBSVEND\n", 8};
constexpr std::string_view kFormat = "qbroker-save";
constexpr std::size_t kChunk = 1u << 20;
constexpr std::uint64_t kWriteBehind = 4u << 20;  // Options::write_behind: bytes between starts

void put_le(std::string& out, std::uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

std::uint64_t get_le(const unsigned char* p, int bytes) {
  std::uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

bool pread_all(int fd, void* buf, std::size_t n, std::uint64_t offset) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    ssize_t r = ::pread(fd, p, n, static_cast<off_t>(offset));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<std::size_t>(r);
    offset += static_cast<std::uint64_t>(r);
  }
  return true;
}

}  // namespace

std::uint32_t checksum(std::uint32_t crc, const void* data, std::size_t n) {
  return static_cast<std::uint32_t>(::crc32_z(crc, static_cast<const Bytef*>(data), n));
}

std::string begin(const json::value& domain) {
  const std::string header =
      json::serialize(json::object{{"format", kFormat}, {"version", kVersion}, {"domain", domain}});
  std::string out(kMagic);
  put_le(out, kVersion, 4);
  put_le(out, header.size(), 4);
  return out + header;
}

std::string trailer(std::uint64_t stream_length, std::uint32_t crc) {
  std::string out(kTrailerMagic);
  put_le(out, stream_length, 8);
  put_le(out, crc, 4);
  put_le(out, 0, 4);
  return out;
}

Result<Layout> read_layout(fdpass::BorrowedFd fd, std::string_view field) {
  const std::string f(field);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) {
    return Error(std::error_code(errno, std::system_category()), f + ": cannot stat the save file");
  }
  const auto size = static_cast<std::uint64_t>(st.st_size);
  std::array<unsigned char, kPreambleSize> pre{};
  if (size < kPreambleSize || !pread_all(fd.get(), pre.data(), pre.size(), 0) ||
      std::memcmp(pre.data(), kMagic.data(), kMagic.size()) != 0) {
    return field_error(field, "not a qbroker save file (no QBSAVE header)");
  }
  const auto version = get_le(pre.data() + 8, 4);
  if (version != kVersion) {
    return field_error(field, "save file version " + std::to_string(version) +
                                  " is not supported (this broker reads version " +
                                  std::to_string(kVersion) + ")");
  }
  const auto header_len = get_le(pre.data() + 12, 4);
  if (header_len == 0 || header_len > kMaxHeader) {
    return field_error(field, "the save file's header length is implausible; the file is corrupt");
  }
  if (size < kPreambleSize + header_len + kTrailerSize) {
    return field_error(field, "the save file is truncated (" + std::to_string(size) + " bytes)");
  }
  std::array<unsigned char, kTrailerSize> tr{};
  if (!pread_all(fd.get(), tr.data(), tr.size(), size - kTrailerSize) ||
      std::memcmp(tr.data(), kTrailerMagic.data(), kTrailerMagic.size()) != 0) {
    return field_error(field, "the save file is truncated or corrupt (no trailer at its end)");
  }
  Layout out;
  out.stream_offset = kPreambleSize + header_len;
  out.stream_length = get_le(tr.data() + 8, 8);
  out.crc = static_cast<std::uint32_t>(get_le(tr.data() + 16, 4));
  if (out.stream_length != size - out.stream_offset - kTrailerSize) {
    return field_error(field, "the save file is truncated or corrupt: its trailer records " +
                                  std::to_string(out.stream_length) +
                                  " stream bytes, the file holds " +
                                  std::to_string(size - out.stream_offset - kTrailerSize));
  }
  std::string header(header_len, '\0');
  if (!pread_all(fd.get(), header.data(), header.size(), kPreambleSize)) {
    return field_error(field, "cannot read the save file's header");
  }
  out.header_crc = checksum(0, header.data(), header.size());
  boost::system::error_code ec;
  json::value h = json::parse(header, ec);
  const json::object* o = ec ? nullptr : h.if_object();
  const json::value* fmt = o != nullptr ? o->if_contains("format") : nullptr;
  const json::value* domain = o != nullptr ? o->if_contains("domain") : nullptr;
  if (fmt == nullptr || !fmt->is_string() || fmt->get_string() != kFormat || domain == nullptr ||
      !domain->is_object()) {
    return field_error(field, "the save file's header is corrupt");
  }
  out.domain = *domain;
  return out;
}

StreamCopy::StreamCopy(boost::asio::any_io_executor ex,
                       std::shared_ptr<boost::asio::steady_timer> wake, fdpass::BorrowedFd src,
                       fdpass::BorrowedFd dst, Options options)
    : src_(src.get() >= 0 ? src : fdpass::BorrowedFd(options.own_src)),
      dst_(dst.get() >= 0 ? dst : fdpass::BorrowedFd(options.own_dst)),
      options_{options.src_offset, options.limit, options.crc, options.write_behind, {}, {}},
      own_src_(std::move(options.own_src)),
      own_dst_(std::move(options.own_dst)),
      crc_(options.crc) {
  thread_ = std::thread([this, ex, wake] { run(ex, wake); });
}

StreamCopy::~StreamCopy() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

bool StreamCopy::ready(fdpass::BorrowedFd fd, short events) {
  pollfd p{fd.get(), events, 0};
  const int r = ::poll(&p, 1, 100);
  return r > 0 && !stop_;
}

int StreamCopy::write_all(const char* p, std::size_t n) {
  while (n > 0) {
    if (stop_) return 0;
    if (!ready(dst_, POLLOUT)) continue;
    ssize_t w = ::write(dst_.get(), p, n);
    if (w < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (w < 0) return errno;
    p += w;
    n -= static_cast<std::size_t>(w);
  }
  return 0;
}

void StreamCopy::run(boost::asio::any_io_executor ex,
                     std::shared_ptr<boost::asio::steady_timer> wake) {
  // QEMU may close its end of the pipe at any moment: that is an EPIPE for this thread, never a
  // SIGPIPE for the broker.
  sigset_t pipe_sig;
  sigemptyset(&pipe_sig);
  sigaddset(&pipe_sig, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe_sig, nullptr);
  std::vector<char> buf(kChunk);
  std::uint64_t offset = options_.src_offset.value_or(0);
  std::uint64_t started_at = 0;  // bytes_ when writeback was last started
  for (;;) {
    std::size_t want = buf.size();
    if (options_.limit) {
      const std::uint64_t left = *options_.limit - bytes_;
      if (left == 0) break;
      want = static_cast<std::size_t>(std::min<std::uint64_t>(left, want));
    }
    if (stop_) {
      stopped_ = true;
      break;
    }
    // A pipe is polled so that stop() is seen while QEMU sends nothing.
    if (!options_.src_offset && !ready(src_, POLLIN)) continue;
    ssize_t n = options_.src_offset
                    ? ::pread(src_.get(), buf.data(), want, static_cast<off_t>(offset))
                    : ::read(src_.get(), buf.data(), want);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n < 0) {
      error_ = errno;
      break;
    }
    if (n == 0) {
      if (options_.limit) error_ = ENODATA;  // the file ended before the length it promised
      break;
    }
    crc_ = checksum(crc_, buf.data(), static_cast<std::size_t>(n));
    if (int e = write_all(buf.data(), static_cast<std::size_t>(n)); e != 0) {
      error_ = e;
      break;
    }
    offset += static_cast<std::uint64_t>(n);
    bytes_ += static_cast<std::uint64_t>(n);
    if (options_.write_behind && bytes_ - started_at >= kWriteBehind) {
      // Pages already on their way are skipped; the whole file is a cheap walk of dirty pages.
      ::sync_file_range(dst_.get(), 0, 0, SYNC_FILE_RANGE_WRITE);
      started_at = bytes_;
    }
  }
  if (stop_ && error_ == 0 && (!options_.limit || bytes_ < *options_.limit)) stopped_ = true;
  own_src_.reset();
  own_dst_.reset();
  done_ = true;
  boost::asio::post(ex, [wake] { wake->cancel(); });
}

}  // namespace broker::flows::save_file
