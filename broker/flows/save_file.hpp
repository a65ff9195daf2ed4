// The broker's save file and the copy that fills or drains it (private to broker/flows).
//
// Layout, all integers little-endian:
//   preamble  "QBSAVE\r\n" | version u32 | header length u32
//   header    JSON {"format": "qbroker-save", "version": 1, "domain": {spec, devices, identities}}
//   stream    QEMU's migration stream, as QEMU wrote it into the broker's pipe
//   trailer   "QBSVEND\n" | stream length u64 | CRC-32 of header and stream u32 | 0 u32
// The trailer comes last, so a file cut short anywhere lacks it or disagrees with its size, and
// the checksum catches a file altered in place. The \r\n in the magic catches a text-mode copy.
#pragma once

#include <atomic>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/json/value.hpp>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>

#include "broker/core/error.hpp"
#include "fdpass/unique_fd.hpp"

namespace broker::flows::save_file {

inline constexpr std::uint32_t kVersion = 1;
inline constexpr std::size_t kPreambleSize = 16;
inline constexpr std::size_t kTrailerSize = 24;
inline constexpr std::size_t kMaxHeader = 1u << 20;

// CRC-32 (zlib's) of `n` bytes, continuing from `crc` (0 to start).
std::uint32_t checksum(std::uint32_t crc, const void* data, std::size_t n);

// The preamble and header for `domain` (the record's JSON, as broker/domain/state_file writes it).
std::string begin(const boost::json::value& domain);
std::string trailer(std::uint64_t stream_length, std::uint32_t crc);

// What read_layout found: where the stream is, what it should sum to, and the header's domain.
struct Layout {
  std::uint64_t stream_offset = 0;
  std::uint64_t stream_length = 0;
  std::uint32_t crc = 0;         // expected over header and stream
  std::uint32_t header_crc = 0;  // of the header alone: the copy continues from it
  boost::json::value domain;
};

// Reads the preamble, header and trailer of an open save file and checks that they agree with
// each other and with the file's size. invalid_argument naming `field` for a foreign, truncated
// or newer file. The stream itself is checked while it is copied (StreamCopy::crc).
Result<Layout> read_layout(fdpass::BorrowedFd fd, std::string_view field);

// Copies a stream between two fds on a thread of its own, so the io_context never waits on a
// disk or on QEMU: from `src` (read at `src_offset` with pread when set, else read to EOF) to
// `dst` (written in order), at most `limit` bytes, summing what passes. When the copy ends it
// cancels `wake`'s wait on `ex` (shared: the wake-up may run after the caller has gone). Both fds
// are borrowed: the caller keeps them open until the copy is done, which the destructor waits
// for.
class StreamCopy {
 public:
  struct Options {
    std::optional<std::uint64_t> src_offset;
    std::optional<std::uint64_t> limit;
    std::uint32_t crc = 0;  // the sum so far
    // `dst` is a file that will be fsynced: start its writeback every few MiB as the copy goes,
    // so that the disk writes alongside QEMU's stream and the final fsync waits only for the
    // tail.
    bool write_behind = false;
    // The pipe end that faces QEMU, held by the copy and closed as it ends, however it ends:
    // QEMU then reads EOF, or fails its next write with EPIPE instead of blocking on a pipe no
    // one drains. Used in place of an empty `src` or `dst`.
    fdpass::UniqueFd own_src;
    fdpass::UniqueFd own_dst;
  };
  StreamCopy(boost::asio::any_io_executor ex, std::shared_ptr<boost::asio::steady_timer> wake,
             fdpass::BorrowedFd src, fdpass::BorrowedFd dst, Options options);
  ~StreamCopy();
  StreamCopy(const StreamCopy&) = delete;
  StreamCopy& operator=(const StreamCopy&) = delete;

  // Asks the copy to end at its next chunk (it polls its source every 100 ms).
  void stop() { stop_ = true; }
  bool done() const { return done_; }
  std::uint64_t bytes() const { return bytes_; }
  // Valid once done(): the first errno that ended it (0 for a clean end), the sum.
  int error() const { return error_; }
  std::uint32_t crc() const { return crc_; }
  // Stopped by stop() before the end of the stream.
  bool stopped() const { return stopped_; }

 private:
  void run(boost::asio::any_io_executor ex, std::shared_ptr<boost::asio::steady_timer> wake);
  // Waits up to 100 ms for `fd` to be ready for `events`; false when not (yet), or on stop().
  bool ready(fdpass::BorrowedFd fd, short events);
  int write_all(const char* p, std::size_t n);

  fdpass::BorrowedFd src_;
  fdpass::BorrowedFd dst_;
  Options options_;
  fdpass::UniqueFd own_src_;
  fdpass::UniqueFd own_dst_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> done_{false};
  std::atomic<std::uint64_t> bytes_{0};
  int error_ = 0;
  bool stopped_ = false;
  std::uint32_t crc_ = 0;
  std::thread thread_;
};

}  // namespace broker::flows::save_file
